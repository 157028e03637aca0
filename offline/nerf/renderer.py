"""The renderer interface synthesis depends on, and its nerfacto implementation.

Synthesis takes a *list* of renderers (e.g. one NeRF per part of a large map); each says
which mapping frames it was trained on and where their cameras are, and
:func:`choose_renderer` picks one per novel pose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.device import resolve_device
from offline.nerf.nerfacto import (
    NerfactoModelHandle,
    make_cameras,
    pixel_coords_for_nerfstudio,
    psnr,
    ray_z_factor,
)
from offline.sources.frames import Frame


@dataclass
class RenderResult:
    rgb: np.ndarray            # (H, W, 3) uint8
    depth_m: np.ndarray        # (H, W) float32 z-depth along the optical axis, map units
    accumulation: np.ndarray   # (H, W) float32 in [0, 1]
    seconds: float = 0.0


@runtime_checkable
class Renderer(Protocol):
    name: str
    frame_names: frozenset[str]   # mapping frames this renderer was trained on
    camera_positions: np.ndarray  # (N, 3) their camera centres, map frame

    def render(self, T_world_cam: np.ndarray, camera: CameraIntrinsics) -> RenderResult: ...

    def render_batch(self, poses: Sequence[np.ndarray], cameras: Sequence[CameraIntrinsics]) -> list[RenderResult]: ...


def choose_renderer(renderers: Sequence[Renderer], T_world_cam: np.ndarray,
                    frame_names: Sequence[str] = ()) -> int:
    """Index of the renderer for a novel pose: among those trained on all of ``frame_names``
    (when any is), the one whose nearest training camera is nearest to the pose."""
    if not renderers:
        raise ValueError("synthesis needs at least one renderer")
    position = np.asarray(T_world_cam, dtype=np.float64)[:3, 3]
    wanted = set(frame_names)
    candidates = [i for i, r in enumerate(renderers) if wanted and wanted <= set(r.frame_names)]
    if not candidates:
        candidates = list(range(len(renderers)))

    def nearest(i: int) -> float:
        pos = np.asarray(renderers[i].camera_positions, dtype=np.float64).reshape(-1, 3)
        return float(np.min(np.linalg.norm(pos - position, axis=1))) if len(pos) else np.inf

    return min(candidates, key=nearest)


class NerfactoRenderer:
    """Renders a trained nerfacto (:class:`NerfactoModelHandle`) at any pose of the map frame."""

    def __init__(self, handle: NerfactoModelHandle | Path | str, device: str = "auto",
                 chunk_rays: int | None = None, name: str | None = None):
        if not isinstance(handle, NerfactoModelHandle):
            handle = NerfactoModelHandle.load(Path(handle))
        if not handle.complete:
            raise ValueError(f"nerfacto in {handle.work_dir} is not fully trained "
                             f"({handle.iterations_done}/{handle.config.n_iterations} iterations)")
        self.handle = handle
        self.device = resolve_device(device)
        self.chunk_rays = int(chunk_rays or handle.config.render_chunk_rays)
        self.name = name or handle.work_dir.name
        self.frame_names = frozenset(handle.frame_names)
        self.camera_positions = np.asarray(handle.camera_positions, dtype=np.float64)
        self.model = handle.load_model(self.device)

    @torch.no_grad()
    def render(self, T_world_cam: np.ndarray, camera: CameraIntrinsics) -> RenderResult:
        t0 = time.perf_counter()
        transform = self.handle.transform
        h, w = int(camera.height), int(camera.width)
        cams = make_cameras([T_world_cam], [camera], transform, self.device)
        v, u = np.mgrid[0:h, 0:w]
        coords = torch.from_numpy(pixel_coords_for_nerfstudio(camera, u, v)).to(self.device, torch.float32)
        zero = torch.zeros((h * w, 1), dtype=torch.long, device=self.device)
        rgb = torch.empty((h * w, 3), device=self.device)
        dist = torch.empty((h * w,), device=self.device)
        acc = torch.empty((h * w,), device=self.device)
        for start in range(0, h * w, self.chunk_rays):
            end = min(start + self.chunk_rays, h * w)
            rays = cams.generate_rays(camera_indices=zero[start:end], coords=coords[start:end])
            out = self.model(rays)
            rgb[start:end] = out["rgb"]
            # nerfacto's "depth" is the median of the ray's weight distribution: a distance along
            # the unit ray direction in nerf units (robust to floaters, unlike the expectation).
            dist[start:end] = out["depth"].reshape(-1)
            acc[start:end] = out["accumulation"].reshape(-1)
        z_factor = ray_z_factor(camera, u, v)
        depth = dist.double().cpu().numpy() * z_factor / transform.scale
        return RenderResult(
            rgb=np.clip(np.round(rgb.cpu().numpy() * 255.0), 0, 255).astype(np.uint8).reshape(h, w, 3),
            depth_m=depth.astype(np.float32).reshape(h, w),
            accumulation=acc.cpu().numpy().astype(np.float32).reshape(h, w),
            seconds=time.perf_counter() - t0,
        )

    def render_batch(self, poses: Sequence[np.ndarray], cameras: Sequence[CameraIntrinsics]) -> list[RenderResult]:
        if len(poses) != len(cameras):
            raise ValueError("render_batch needs one camera per pose")
        return [self.render(T, c) for T, c in zip(poses, cameras)]


def render_psnr(renderer: Renderer, frames: Sequence[Frame], resolution_fraction: float = 1.0) -> dict[str, float]:
    """PSNR of renders against real images at the frames' poses (e.g. held-out frames)."""
    import cv2

    values, coverage = [], []
    for f in frames:
        cam = f.camera
        if resolution_fraction != 1.0:
            cam = cam.scaled_to(max(1, round(cam.width * resolution_fraction)),
                                max(1, round(cam.height * resolution_fraction)))
        real = f.load_rgb()
        if (cam.width, cam.height) != (real.shape[1], real.shape[0]):
            real = cv2.resize(real, (cam.width, cam.height), interpolation=cv2.INTER_AREA)
        result = renderer.render(f.T_world_cam, cam)
        values.append(psnr(result.rgb, real))
        coverage.append(float(np.mean(result.accumulation > 0.5)))
    arr = np.asarray(values, dtype=np.float64)
    # Coverage: the share of pixels the renderer claims (accumulation > 0.5); a warp renderer's
    # holes count as errors in the PSNR, and this says how many there were.
    return {"n": len(values), "psnr_mean": float(arr.mean()) if len(arr) else float("nan"),
            "psnr_median": float(np.median(arr)) if len(arr) else float("nan"),
            "coverage_mean": float(np.mean(coverage)) if coverage else float("nan")}
