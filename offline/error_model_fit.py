"""Measuring a map's error model (``d2s_nerf_ros.error_model``) on posed frames it was not trained on.

The build runs it on ``BuildConfig.error_model_frames`` frames of the source that are not
mapping frames, and ``d2s-nerf calibrate`` on any posed frames of the same scene. The frames
are localised exactly as onboard (same gates); for every accepted pose:

- each inlier's regressed coordinate is compared with the ray through its keypoint under the
  ground-truth pose: the distance across the ray is the part of the coordinate error that
  moves the projection (depth error along the ray does not), measured without any depth;
- the pose error against ground truth gives the NEES under the independent-points covariance.

``coordinate_sigma_m`` = RMS of the across-ray distances / sqrt(2) (two axes), and
``covariance_scale`` = median NEES / median of chi-square(6), so that the calibrated covariance
has the median NEES of a correct one. The median, not the mean: one gross failure among a
dozen frames would otherwise set the scale alone.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from d2s_nerf_ros.error_model import CHI2_6_MEDIAN, ErrorModel, nees, pose_error_vector
from offline.sources.frames import Frame, even_indices

MIN_CALIBRATION_POSES = 3


def calibration_frames(frames: Sequence[Frame], exclude_names: set[str], count: int) -> list[Frame]:
    """``count`` frames spread evenly over ``frames`` leaving out ``exclude_names`` (the mapping frames)."""
    candidates = [f for f in frames if f.name not in exclude_names]
    if count <= 0 or not candidates:
        return []
    return [candidates[i] for i in even_indices(len(candidates), fraction=min(count, len(candidates)) / len(candidates))]


def across_ray_distances(T_world_cam: np.ndarray, K: np.ndarray, pixels: np.ndarray, points_world: np.ndarray) -> np.ndarray:
    """Distance (m) of each world point from the viewing ray through its (undistorted) pixel."""
    rays_cam = np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1) @ np.linalg.inv(K).T
    rays_world = rays_cam @ T_world_cam[:3, :3].T
    rays_world /= np.linalg.norm(rays_world, axis=1, keepdims=True)
    v = points_world - T_world_cam[:3, 3]
    along = np.sum(v * rays_world, axis=1, keepdims=True)
    return np.linalg.norm(v - along * rays_world, axis=1)


def fit_error_model(localizer: Any, frames: Sequence[Frame], log: Callable[[str], None] = print) -> ErrorModel:
    """The error model of ``localizer``'s map measured on ``frames`` (posed, not mapping frames).

    Raises ``ValueError`` when fewer than ``MIN_CALIBRATION_POSES`` frames localise.
    """
    distances: list[np.ndarray] = []
    accepted: list[tuple[Frame, Any]] = []
    for frame in frames:
        result = localizer.localize(frame.load_rgb(), frame.camera)
        if not result.success:
            continue
        T_true = np.asarray(frame.T_world_cam, dtype=np.float64)
        distances.append(across_ray_distances(T_true, frame.camera.K, result.inliers_2d, result.inliers_3d))
        accepted.append((frame, result))
    if len(accepted) < MIN_CALIBRATION_POSES:
        raise ValueError(f"only {len(accepted)} of {len(frames)} calibration frames localised "
                         f"(at least {MIN_CALIBRATION_POSES} needed to measure the error model)")
    all_d = np.concatenate(distances)
    coordinate_sigma = float(math.sqrt(np.mean(all_d**2) / 2.0))
    unit = ErrorModel(coordinate_sigma_m=coordinate_sigma, covariance_scale=1.0)
    nees_unit = []
    for frame, result in accepted:
        cov = unit.unscaled_covariance(result.T_world_cam, result.inliers_2d, result.inliers_3d, frame.camera)
        nees_unit.append(nees(pose_error_vector(result.T_world_cam, frame.T_world_cam), cov))
    scale = max(float(np.median(nees_unit)) / CHI2_6_MEDIAN, 1e-6)
    log(f"error model: coordinate sigma {coordinate_sigma * 100:.1f} cm from {len(all_d)} inliers of "
        f"{len(accepted)}/{len(frames)} localised frames; covariance scale {scale:.2f}")
    return ErrorModel(coordinate_sigma_m=coordinate_sigma, covariance_scale=scale, source="calibrated",
                      n_frames=len(accepted), n_points=int(len(all_d)), frames=tuple(f.name for f in frames))
