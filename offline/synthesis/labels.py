"""3D labels for keypoints found on renders.

Modes:
- ``matches`` (the paper): a render keypoint matched to a reference-frame keypoint takes that
  keypoint's 3D label (when it has one); every other keypoint is invalid.
- ``depth``: back-project the keypoint with the rendered z-depth and the novel camera pose,
  kept only where the NeRF is opaque (accumulation >= ``min_accumulation``), the depth is not
  on an edge, and the depth agrees with the map's triangulated points: the matched reference
  keypoint's 3D point when there is one, else the map points that project near the keypoint.
  Keypoints with no map evidence either way are kept only with ``keep_unverified``.
- ``both``: ``matches`` where available, ``depth`` for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import invert_pose, project_points, transform_points
from offline.depth_labels import DepthLabelConfig, sample_depth
from offline.labelled import LabelledImage

LABEL_MODES = ("matches", "depth", "both")


@dataclass
class SyntheticLabelConfig:
    mode: str = "matches"
    min_accumulation: float = 0.9
    depth_agreement_m: float = 0.05         # absolute tolerance ...
    depth_agreement_relative: float = 0.03  # ... or this fraction of the depth, whichever is larger
    map_point_radius_px: float = 3.0        # map points projecting this close to a keypoint are its evidence
    keep_unverified: bool = False
    min_depth_m: float = 0.05
    max_depth_m: float = 50.0
    max_discontinuity: float = 0.05         # relative depth spread allowed around a keypoint

    def __post_init__(self) -> None:
        if self.mode not in LABEL_MODES:
            raise ValueError(f"synthetic label mode must be one of {', '.join(LABEL_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.min_accumulation <= 1.0:
            raise ValueError(f"min_accumulation must be in [0, 1], got {self.min_accumulation}")
        if self.depth_agreement_m < 0 or self.depth_agreement_relative < 0 or self.map_point_radius_px <= 0:
            raise ValueError("depth agreement tolerances must be >= 0 and map_point_radius_px > 0")

    def tolerance(self, depth: np.ndarray) -> np.ndarray:
        return np.maximum(self.depth_agreement_m, self.depth_agreement_relative * np.asarray(depth))


def _to_map_pixels(pixels: np.ndarray, from_wh: tuple[int, int], to_wh: tuple[int, int]) -> np.ndarray:
    """Pixel coordinates of one image in another of a different size (pixel centres at integers)."""
    if tuple(from_wh) == tuple(to_wh):
        return np.asarray(pixels, dtype=np.float64)
    scale = np.array([to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]])
    return (np.asarray(pixels, dtype=np.float64) + 0.5) * scale - 0.5


def backproject(pixels: np.ndarray, depth: np.ndarray, camera: CameraIntrinsics, T_world_cam: np.ndarray) -> np.ndarray:
    """World points of pixels (camera's pixels) at z-depths ``depth``."""
    uv = camera.undistort_points(np.asarray(pixels, dtype=np.float64))
    rays = np.stack([(uv[:, 0] - camera.cx) / camera.fx, (uv[:, 1] - camera.cy) / camera.fy, np.ones(len(uv))], 1)
    return transform_points(T_world_cam, rays * np.asarray(depth, dtype=np.float64)[:, None])


def _map_point_evidence(pixels: np.ndarray, depth: np.ndarray, camera: CameraIntrinsics, T_world_cam: np.ndarray,
                        map_points: np.ndarray, config: SyntheticLabelConfig) -> np.ndarray:
    """Per keypoint: +1 a nearby map point agrees in depth, -1 nearby points exist but none agrees, 0 none nearby."""
    out = np.zeros(len(pixels), dtype=np.int8)
    pts = np.asarray(map_points, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0 or len(pixels) == 0:
        return out
    uv, z = project_points(invert_pose(T_world_cam), camera.K, pts)
    # Map points are ideal pinhole projections; keypoints are in (possibly distorted) image pixels.
    kp = camera.undistort_points(np.asarray(pixels, dtype=np.float64))
    in_front = (z > 1e-6) & np.all(np.isfinite(uv), axis=1)
    uv, z = uv[in_front], z[in_front]
    if len(z) == 0:
        return out
    r2 = config.map_point_radius_px ** 2
    tol = config.tolerance(depth)
    for start in range(0, len(kp), 512):  # chunks bound the (keypoints x points) distance matrix
        sl = slice(start, start + 512)
        d2 = np.sum((kp[sl, None, :] - uv[None, :, :]) ** 2, axis=-1)
        near = d2 <= r2
        agree = near & (np.abs(z[None, :] - np.asarray(depth)[sl, None]) <= tol[sl, None])
        out[sl] = np.where(agree.any(1), 1, np.where(near.any(1), -1, 0))
    return out


def synthetic_labels(
    name: str,
    keypoints: np.ndarray,
    descriptors: np.ndarray,
    camera: CameraIntrinsics,
    T_world_cam: np.ndarray,
    reference: LabelledImage,
    matches: np.ndarray,
    config: SyntheticLabelConfig,
    depth_m: np.ndarray | None = None,
    accumulation: np.ndarray | None = None,
    map_points: np.ndarray | None = None,
) -> tuple[LabelledImage, dict[str, Any]]:
    """Labels for one render's keypoints.

    ``keypoints`` are in ``camera``'s pixels (the camera the render's features live in);
    ``depth_m`` / ``accumulation`` may be at another resolution of the same camera.
    ``matches`` (M, 2): rows (render keypoint index, reference keypoint index).
    Returns the ``LabelledImage`` (source "synthetic") and counts of what happened.
    """
    kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    n = len(kps)
    matches = np.asarray(matches, dtype=np.int64).reshape(-1, 2)
    if len(matches) and (matches[:, 0].max() >= n or matches[:, 1].max() >= len(reference.keypoints)
                         or matches.min() < 0):
        raise ValueError(f"{name}: match indices out of range ({n} render, {len(reference.keypoints)} reference keypoints)")
    points = np.zeros((n, 3), dtype=np.float64)
    valid = np.zeros(n, dtype=bool)
    stats = {"n_keypoints": n, "n_matches": int(len(matches)), "n_from_matches": 0, "n_from_depth": 0,
             "n_low_accumulation": 0, "n_depth_disagrees": 0, "n_unverified": 0}

    # Matched render keypoint -> its reference keypoint's 3D label (only where that one is valid).
    ref_label = np.full((n, 3), np.nan)
    ref_valid = np.zeros(n, dtype=bool)
    if len(matches):
        ok = reference.valid[matches[:, 1]]
        ref_label[matches[ok, 0]] = reference.points3D[matches[ok, 1]]
        ref_valid[matches[ok, 0]] = True

    if config.mode in ("matches", "both"):
        points[ref_valid] = ref_label[ref_valid]
        valid |= ref_valid
        stats["n_from_matches"] = int(ref_valid.sum())

    if config.mode in ("depth", "both"):
        if depth_m is None or accumulation is None:
            raise ValueError(f"{name}: label mode {config.mode!r} needs the rendered depth and accumulation")
        todo = np.flatnonzero(~valid)
        dh, dw = depth_m.shape
        if accumulation.shape != depth_m.shape:
            raise ValueError(f"{name}: depth {depth_m.shape} and accumulation {accumulation.shape} differ in size")
        px = _to_map_pixels(kps[todo], (camera.width, camera.height), (dw, dh))
        sampler = DepthLabelConfig(min_depth_m=config.min_depth_m, max_depth_m=config.max_depth_m,
                                   interpolation="bilinear", max_discontinuity=config.max_discontinuity)
        z = sample_depth(np.asarray(depth_m, dtype=np.float32), px, sampler)
        # The accumulation must be high over the whole bilinear stencil, so take its minimum.
        xi = np.clip(np.floor(px[:, 0]).astype(np.int64), 0, dw - 1)
        yi = np.clip(np.floor(px[:, 1]).astype(np.int64), 0, dh - 1)
        xj, yj = np.minimum(xi + 1, dw - 1), np.minimum(yi + 1, dh - 1)
        acc = np.minimum.reduce([accumulation[yi, xi], accumulation[yi, xj], accumulation[yj, xi], accumulation[yj, xj]])
        opaque = acc >= config.min_accumulation
        stats["n_low_accumulation"] = int((~opaque).sum())
        with np.errstate(invalid="ignore"):
            usable = opaque & np.isfinite(z) & (z >= config.min_depth_m) & (z <= config.max_depth_m)
        todo, z = todo[usable], z[usable]
        X = backproject(kps[todo], z, camera, T_world_cam)

        # Evidence 1: the matched reference keypoint's triangulated point, seen from the novel camera.
        verdict = np.zeros(len(todo), dtype=np.int8)
        has_ref = ref_valid[todo]
        if has_ref.any():
            z_ref = transform_points(invert_pose(T_world_cam), ref_label[todo[has_ref]])[:, 2]
            verdict[has_ref] = np.where(np.abs(z_ref - z[has_ref]) <= config.tolerance(z[has_ref]), 1, -1)
        # Evidence 2: map points projecting near the keypoint.
        rest = verdict == 0
        if map_points is not None and rest.any():
            verdict[rest] = _map_point_evidence(kps[todo[rest]], z[rest], camera, T_world_cam, map_points, config)
        stats["n_depth_disagrees"] = int((verdict < 0).sum())
        stats["n_unverified"] = int((verdict == 0).sum())
        keep = (verdict > 0) | ((verdict == 0) & config.keep_unverified)
        points[todo[keep]] = X[keep]
        valid[todo[keep]] = True
        stats["n_from_depth"] = int(keep.sum())

    points[~valid] = 0.0  # zeros, not NaN, where invalid (as the real labels)
    image = LabelledImage(
        name=name, keypoints=kps.astype(np.float32), descriptors=np.asarray(descriptors, dtype=np.float32),
        points3D=points.astype(np.float32), valid=valid, camera=camera,
        T_world_cam=np.asarray(T_world_cam, dtype=np.float64), source="synthetic")
    stats["n_valid"] = int(valid.sum())
    return image, stats
