"""Posed mapping frames, the common currency of every source and stage.

Every source (7-Scenes folder, bag, nerfstudio or COLMAP folder) is imported into a
``FrameSet`` on disk once: ``frames.json`` beside the images it names. Later stages
only ever read a FrameSet, so they never care where the frames came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics

FRAMESET_FORMAT = "d2s_nerf_frames"
FRAMESET_VERSION = 1


def load_rgb(path: Path) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class Frame:
    name: str
    image_path: Path
    T_world_cam: np.ndarray
    camera: CameraIntrinsics
    depth_path: Path | None = None
    depth_scale: float = 1000.0
    stamp_ns: int | None = None

    def load_rgb(self) -> np.ndarray:
        return load_rgb(self.image_path)

    def load_depth_m(self) -> np.ndarray | None:
        """Depth in metres (NaN where invalid), or None when the frame has no depth."""
        if self.depth_path is None:
            return None
        import cv2

        raw = cv2.imread(str(self.depth_path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ValueError(f"cannot read depth image {self.depth_path}")
        depth = raw.astype(np.float32) / float(self.depth_scale)
        depth[(raw == 0) | (raw == 65535)] = np.nan
        return depth

    def to_json(self, root: Path) -> dict[str, Any]:
        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            p = Path(p)
            try:
                return str(p.resolve().relative_to(root.resolve()))
            except ValueError:
                return str(p.resolve())

        return {
            "name": self.name,
            "image": rel(self.image_path),
            "depth": rel(self.depth_path),
            "depth_scale": self.depth_scale,
            "T_world_cam": np.asarray(self.T_world_cam, dtype=np.float64).tolist(),
            "camera": self.camera.to_dict(),
            "stamp_ns": self.stamp_ns,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Path) -> "Frame":
        def resolve(p: str | None) -> Path | None:
            if p is None:
                return None
            q = Path(p)
            return q if q.is_absolute() else root / q

        T = np.asarray(d["T_world_cam"], dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"frame {d.get('name')!r}: T_world_cam must be a finite 4x4 matrix")
        return cls(
            name=str(d["name"]),
            image_path=resolve(d["image"]),
            T_world_cam=T,
            camera=CameraIntrinsics.from_dict(d["camera"]),
            depth_path=resolve(d.get("depth")),
            depth_scale=float(d.get("depth_scale", 1000.0)),
            stamp_ns=d.get("stamp_ns"),
        )


@dataclass
class FrameSet:
    frames: list[Frame]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __getitem__(self, i: int) -> Frame:
        return self.frames[i]

    def names(self) -> list[str]:
        return [f.name for f in self.frames]

    def subset(self, indices: list[int]) -> "FrameSet":
        return FrameSet([self.frames[i] for i in indices], dict(self.metadata))

    def save(self, path: Path) -> None:
        """Write ``path`` (a frames.json) atomically; image paths are stored relative to its folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FRAMESET_FORMAT,
            "version": FRAMESET_VERSION,
            "metadata": self.metadata,
            "frames": [f.to_json(path.parent) for f in self.frames],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "FrameSet":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read frame set {path}: {exc}") from exc
        if doc.get("format") != FRAMESET_FORMAT:
            raise ValueError(f"{path} is not a d2s_nerf frame set")
        if doc.get("version") != FRAMESET_VERSION:
            raise ValueError(f"{path}: frame set version {doc.get('version')} is not supported (expected {FRAMESET_VERSION})")
        return cls([Frame.from_json(d, path.parent) for d in doc["frames"]], doc.get("metadata", {}))


def even_indices(n: int, *, fraction: float | None = None, every: int | None = None) -> list[int]:
    """Indices of an even sample: ``fraction`` of n frames spread evenly, or every N-th frame."""
    if (fraction is None) == (every is None):
        raise ValueError("give exactly one of fraction or every")
    if n <= 0:
        return []
    if every is not None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        return list(range(0, n, every))
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(n * fraction)))
    # Centre the samples in k equal bins so 20 of 500 frames is every 25th, starting at 12.
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})
