"""Learning curves of a D2S training: what the model predicts, measured on labelled images.

One curve point scores the model on two sets of labelled images:

- ``train``: a few of the real mapping frames the model trains on (their depth or
  triangulation labels), to see whether it fits them at all (underfitting);
- ``validation``: real frames of the recording that are neither mapping frames nor benchmark
  queries (``offline/validation.py`` picks them and labels them from depth), to see whether
  what it fits carries over to unseen views (overfitting).

Per set: the median 3D error of the labelled keypoints (every prediction, reliable or not),
how many predictions pass the localizer's reliability threshold per image, the share of the
reliable labelled ones within 10 cm of their label (outliers that would reach PnP), and the
pose error of PnP-RANSAC with the localizer's default settings but ``CURVE_RANSAC_ITERATIONS``
(failures count as infinite).
Together they tell apart wrong coordinates, outliers that pass the threshold, too few
reliable points and PnP settings as the cause of a large pose error.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from d2s_nerf_ros.geometry import pose_error
from d2s_nerf_ros.localizer import LocalizerConfig
from d2s_nerf_ros.models.d2s import D2SNet, reliability
from d2s_nerf_ros.pnp import solve_pnp_ransac
from offline.labelled import LabelledImage

INLIER_RADIUS_M = 0.10
# RANSAC iterations of a curve point's PnP: the localizer's 10,000 cost seconds per frame on a
# loaded 2-core CPU when the predictions are still mostly wrong (early in training), which a
# wall-clock budget would pay for in training steps. 1,000 finds a pose whenever a third or more
# of the predictions are inliers (99.9 % confidence for the 4-point minimal sample).
CURVE_RANSAC_ITERATIONS = 1000


def _predict(model: D2SNet, image: LabelledImage, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    descriptors = torch.from_numpy(np.ascontiguousarray(image.descriptors, dtype=np.float32)).to(device)[None]
    mask = torch.ones(descriptors.shape[:2], dtype=torch.bool, device=device)
    xyz, u = model(descriptors, mask)
    return xyz[0].float().cpu().numpy().astype(np.float64), reliability(u[0]).float().cpu().numpy().astype(np.float64)


def _pose(image: LabelledImage, xyz: np.ndarray, r: np.ndarray, config: LocalizerConfig) -> tuple[float, float]:
    """Translation (m) and rotation (deg) error of PnP on the reliable predictions, as the
    localizer selects them (the most reliable ones when too few pass); inf on failure."""
    finite = np.isfinite(xyz).all(axis=1) & np.isfinite(r)
    reliable = finite & (r >= config.reliability_threshold)
    if reliable.sum() >= config.min_inliers:
        selected = np.flatnonzero(reliable)
    else:
        candidates = np.flatnonzero(finite)
        selected = candidates[np.argsort(-r[candidates], kind="stable")[: config.fallback_top_k]]
    points2D = image.camera.undistort_points(np.asarray(image.keypoints, dtype=np.float64)[selected])
    result = solve_pnp_ransac(points2D, xyz[selected], image.camera, config.pnp_config())
    if not result.success or result.n_inliers < config.min_inliers:
        return math.inf, math.inf
    return pose_error(result.T_world_cam, np.asarray(image.T_world_cam, dtype=np.float64))


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def score_images(model: D2SNet, images: Sequence[LabelledImage], device: torch.device,
                 config: LocalizerConfig | None = None) -> dict[str, Any]:
    """The curve metrics of ``model`` on ``images`` (see the module docstring)."""
    config = config or LocalizerConfig(ransac_iterations=CURVE_RANSAC_ITERATIONS)
    errors, reliable_ok, reliable_labelled, n_reliable, pose_t, pose_r = [], 0, 0, [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for image in images:
                if len(image.keypoints) == 0:
                    continue
                xyz, r = _predict(model, image, device)
                valid = np.asarray(image.valid, dtype=bool)
                err = np.linalg.norm(xyz - np.asarray(image.points3D, dtype=np.float64), axis=1)
                errors.append(err[valid])
                reliable = r >= config.reliability_threshold
                n_reliable.append(int(reliable.sum()))
                reliable_labelled += int((reliable & valid).sum())
                reliable_ok += int((reliable & valid & (err <= INLIER_RADIUS_M)).sum())
                dt, dr = _pose(image, xyz, r, config)
                pose_t.append(dt)
                pose_r.append(dr)
    finally:
        model.train(was_training)
    all_errors = np.concatenate(errors) if errors else np.zeros(0)
    return {
        "n_images": len(pose_t),
        "n_labelled": int(len(all_errors)),
        "median_error_m": float(np.median(all_errors)) if len(all_errors) else None,
        "reliable_per_image": float(np.mean(n_reliable)) if n_reliable else None,
        "reliable_within_10cm": reliable_ok / reliable_labelled if reliable_labelled else None,
        # JSON has no inf: a median over mostly failed poses is None, pose_failed says so.
        "median_pose_t_m": _finite_or_none(np.median(pose_t)) if pose_t else None,
        "median_pose_r_deg": _finite_or_none(np.median(pose_r)) if pose_r else None,
        "pose_failed": int(sum(not math.isfinite(t) for t in pose_t)),
    }


def train_probe(images: Sequence[LabelledImage], n: int = 6) -> list[LabelledImage]:
    """Up to ``n`` real (not augmented, not synthetic) training images, evenly spread."""
    real = [im for im in images if im.source == "real" and len(im.keypoints)]
    if len(real) <= n:
        return real
    return [real[int(i)] for i in np.linspace(0, len(real) - 1, n).round()]
