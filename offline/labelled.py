"""Keypoints with 3D labels: what D2S trains on, from real frames or from renders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics


@dataclass
class LabelledImage:
    name: str
    keypoints: np.ndarray    # (N, 2) float32 pixels
    descriptors: np.ndarray  # (N, D) float32
    points3D: np.ndarray     # (N, 3) float32 world coordinates, undefined where not valid
    valid: np.ndarray        # (N,) bool
    camera: CameraIntrinsics
    T_world_cam: np.ndarray  # (4, 4) float64
    source: str = "real"     # "real" | "synthetic" | "augmented"

    def __post_init__(self) -> None:
        n = len(self.keypoints)
        if self.descriptors.shape[0] != n or self.points3D.shape != (n, 3) or self.valid.shape != (n,):
            raise ValueError(f"{self.name}: inconsistent labelled image arrays")

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


def save_labelled(path: Path, images: list[LabelledImage]) -> None:
    """One npz for a list of images (no pickle); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"count": np.array(len(images))}
    for i, im in enumerate(images):
        c = im.camera
        arrays[f"{i}/name"] = np.array(im.name)
        arrays[f"{i}/source"] = np.array(im.source)
        arrays[f"{i}/keypoints"] = im.keypoints.astype(np.float32)
        arrays[f"{i}/descriptors"] = im.descriptors.astype(np.float32)
        arrays[f"{i}/points3D"] = im.points3D.astype(np.float32)
        arrays[f"{i}/valid"] = im.valid.astype(bool)
        arrays[f"{i}/T_world_cam"] = im.T_world_cam.astype(np.float64)
        arrays[f"{i}/camera"] = np.array([c.width, c.height, c.fx, c.fy, c.cx, c.cy], dtype=np.float64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_labelled(path: Path) -> list[LabelledImage]:
    with np.load(path, allow_pickle=False) as z:
        out = []
        for i in range(int(z["count"])):
            w, h, fx, fy, cx, cy = z[f"{i}/camera"]
            out.append(LabelledImage(
                name=str(z[f"{i}/name"]),
                keypoints=z[f"{i}/keypoints"], descriptors=z[f"{i}/descriptors"],
                points3D=z[f"{i}/points3D"], valid=z[f"{i}/valid"],
                camera=CameraIntrinsics(int(w), int(h), fx, fy, cx, cy),
                T_world_cam=z[f"{i}/T_world_cam"], source=str(z[f"{i}/source"]),
            ))
        return out
