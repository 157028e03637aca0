"""How wrong the regressed scene coordinates are, and the pose covariance that follows from it.

PnP's own covariance (``d2s_nerf_ros.pnp``) treats the 3D points as exact and the pixels as
the only noise. For scene-coordinate regression it is the other way round: a predicted
coordinate is off by centimetres, and neighbouring predictions err together, so that
covariance is far too small. The error model, measured when the map is built
(``offline/error_model_fit.py``) and stored in the bundle's manifest under ``error_model``,
has two numbers:

- ``coordinate_sigma_m``: the per-axis standard deviation of the regressed coordinates of
  PnP inliers across their viewing ray, measured on posed frames the map was not trained on
  (the distance of each predicted point from the ray through its keypoint under the
  ground-truth pose). PnP weighs point i with ``1 / (sigma_fit^2 + (f sigma_c / z_i)^2)``.
- ``covariance_scale``: the factor that makes the median NEES of those frames' pose errors
  equal the median of a chi-square with 6 degrees of freedom. It absorbs what the
  independent-points model cannot see (correlated errors, the inlier selection).

Maps built before the error model existed have no ``error_model``. They load and get the
fallback ``FALLBACK_ERROR_MODEL``: the coordinate sigma and scale measured on RedKitchen
(docs/BENCHMARKS.md, covariance), i.e. a calibration borrowed from another map, which
``source: "fallback"`` says. ``d2s-nerf calibrate`` adds a measured model to such a map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.pnp import pose_covariance

ERROR_MODEL_VERSION = 1
# Median of the chi-square distribution with 6 degrees of freedom: the median NEES of a
# calibrated 6-DoF covariance.
CHI2_6_MEDIAN = 5.348120627447122


@dataclass(frozen=True)
class ErrorModel:
    coordinate_sigma_m: float
    covariance_scale: float
    source: str = "calibrated"          # "calibrated" (measured for this map) | "fallback"
    n_frames: int = 0                   # calibration frames that localised
    n_points: int = 0                   # inlier coordinates measured on them
    frames: tuple[str, ...] = field(default_factory=tuple)  # their names (keep them out of evaluations)
    min_sigma_px: float = 0.25

    def __post_init__(self) -> None:
        if not (math.isfinite(self.coordinate_sigma_m) and self.coordinate_sigma_m >= 0):
            raise ValueError(f"error model coordinate_sigma_m must be >= 0, got {self.coordinate_sigma_m}")
        if not (math.isfinite(self.covariance_scale) and self.covariance_scale > 0):
            raise ValueError(f"error model covariance_scale must be positive, got {self.covariance_scale}")
        if not (math.isfinite(self.min_sigma_px) and self.min_sigma_px > 0):
            raise ValueError(f"error model min_sigma_px must be positive, got {self.min_sigma_px}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": ERROR_MODEL_VERSION, "coordinate_sigma_m": float(self.coordinate_sigma_m),
                "covariance_scale": float(self.covariance_scale), "source": self.source,
                "n_frames": int(self.n_frames), "n_points": int(self.n_points), "frames": list(self.frames),
                "min_sigma_px": float(self.min_sigma_px)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ErrorModel":
        """Raises ``ValueError`` naming what is wrong with a stored model."""
        if not isinstance(d, dict):
            raise ValueError(f"error_model must be a mapping, got {type(d).__name__}")
        if d.get("version") != ERROR_MODEL_VERSION:
            raise ValueError(f"error_model version {d.get('version')!r} is not {ERROR_MODEL_VERSION}")
        try:
            return cls(coordinate_sigma_m=float(d["coordinate_sigma_m"]), covariance_scale=float(d["covariance_scale"]),
                       source=str(d.get("source", "calibrated")), n_frames=int(d.get("n_frames", 0)),
                       n_points=int(d.get("n_points", 0)), frames=tuple(str(f) for f in d.get("frames", ())),
                       min_sigma_px=float(d.get("min_sigma_px", 0.25)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"error_model is incomplete: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "ErrorModel":
        """The map's model, or ``FALLBACK_ERROR_MODEL`` for a map built without one."""
        stored = manifest.get("error_model")
        return FALLBACK_ERROR_MODEL if stored is None else cls.from_dict(stored)

    def unscaled_covariance(self, T_world_cam: np.ndarray, inliers_2d: np.ndarray, inliers_3d: np.ndarray,
                            camera: CameraIntrinsics) -> np.ndarray:
        """The independent-points covariance (``covariance_scale`` not applied), 6x6, see ``pnp``."""
        cov, _ = pose_covariance(T_world_cam, camera.K, inliers_2d, inliers_3d, self.min_sigma_px,
                                 self.coordinate_sigma_m)
        return cov

    def pose_covariance(self, T_world_cam: np.ndarray, inliers_2d: np.ndarray, inliers_3d: np.ndarray,
                        camera: CameraIntrinsics) -> np.ndarray:
        """The calibrated 6x6 covariance (x y z rx ry rz, pnp.py's convention) of a PnP pose from
        its inliers (undistorted pixels, regressed world points). Raises ``np.linalg.LinAlgError``
        for degenerate geometry."""
        return self.covariance_scale * self.unscaled_covariance(T_world_cam, inliers_2d, inliers_3d, camera)


# Measured on RedKitchen (a 20-frame fast-profile ALIKED map, 12 held-out frames; docs/BENCHMARKS.md,
# covariance): borrowed by maps without their own model. Another scene's D2S errors differ, so
# `d2s-nerf calibrate` is better; without the error model PnP's covariance had a median NEES in
# the thousands there (overconfident by ~30x in standard deviation).
FALLBACK_ERROR_MODEL = ErrorModel(coordinate_sigma_m=0.066, covariance_scale=15.2, source="fallback")


def pose_error_vector(T_est: np.ndarray, T_true: np.ndarray) -> np.ndarray:
    """(dx dy dz rx ry rz) taking ``T_true`` to ``T_est`` in the covariance's convention: camera
    centre difference in world axes, rotation ``R_est = Exp(r) R_true`` about the world axes."""
    from d2s_nerf_ros.geometry import rotvec_from_matrix

    T_est, T_true = np.asarray(T_est, dtype=np.float64), np.asarray(T_true, dtype=np.float64)
    delta = np.empty(6)
    delta[:3] = T_est[:3, 3] - T_true[:3, 3]
    delta[3:] = rotvec_from_matrix(T_est[:3, :3] @ T_true[:3, :3].T)
    return delta


def nees(delta: np.ndarray, covariance: np.ndarray) -> float:
    """Normalised estimation error squared ``delta^T C^-1 delta`` (6 on average when C is right)."""
    delta = np.asarray(delta, dtype=np.float64)
    return float(delta @ np.linalg.solve(np.asarray(covariance, dtype=np.float64), delta))
