"""Robust absolute pose (PnP-RANSAC) from 2D-3D correspondences, with a pose covariance.

The solver is PoseLib's LO-RANSAC (P3P hypotheses, local optimisation) followed by a
least-squares refinement on the inliers (PoseLib's bundle adjustment with a truncated
loss at the inlier threshold). The covariance of the result is then computed here from
the inlier reprojection residuals.

Covariance convention (what ``PnPResult.covariance`` means)
-----------------------------------------------------------
The estimated pose is ``T_world_cam = [R_wc | c]`` (camera-to-world; ``c`` the camera centre
in the world frame). A perturbed pose is parametrised by ``delta = (dx, dy, dz, rx, ry, rz)``:

    c'    = c + (dx, dy, dz)                    # camera centre moved in world axes
    R_wc' = Exp([rx, ry, rz]) @ R_wc            # small rotation about the fixed WORLD axes

which is the convention of ROS ``geometry_msgs/PoseWithCovariance`` (x, y, z, then rotation
about the fixed X, Y and Z axes of the parent frame). Units: metres and radians.

With ``r_i(delta)`` the 2-vector reprojection residual (pixels) of inlier i and
``J = d r / d delta`` at ``delta = 0`` (analytic, stacked over the n inliers), the Gauss-Newton
information matrix is ``J^T J / sigma^2``; the covariance is

    Sigma = sigma^2 (J^T J)^-1,    sigma^2 = sum_i |r_i|^2 / (2 n - 6)

floored at ``PnPConfig.min_sigma_px`` so that a perfect fit still gives a positive definite
matrix. This is the reprojection-noise covariance only; ``d2s_nerf_ros.error_model`` adds
the error of the regressed 3D coordinates and the map's calibration to it. Because J is taken directly with respect to the camera-in-world parametrisation,
no further propagation is needed (it equals propagating the covariance of a camera-frame
perturbation through the adjoint of the pose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics

# 640x480, the resolution at which ``threshold_px`` is specified.
REFERENCE_DIAGONAL_PX = 800.0


@dataclass
class PnPConfig:
    threshold_px: float = 12.0                       # inlier threshold at the reference resolution
    reference_diagonal_px: float = REFERENCE_DIAGONAL_PX  # the threshold scales with the image diagonal
    iterations: int = 10000                          # RANSAC max iterations
    min_iterations: int = 100                        # RANSAC min iterations (dynamic stop after that)
    min_inliers: int = 15
    refine: bool = True                              # least-squares refinement on the inliers
    confidence: float = 0.9999                       # RANSAC success probability for the dynamic stop
    seed: int = 0
    min_sigma_px: float = 0.25                       # floor of the residual std. dev. used in the covariance

    def validate(self) -> None:
        if not (math.isfinite(self.threshold_px) and self.threshold_px > 0):
            raise ValueError(f"threshold_px must be positive, got {self.threshold_px}")
        if not (math.isfinite(self.reference_diagonal_px) and self.reference_diagonal_px > 0):
            raise ValueError(f"reference_diagonal_px must be positive, got {self.reference_diagonal_px}")
        if int(self.iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if int(self.min_iterations) < 0:
            raise ValueError(f"min_iterations must be >= 0, got {self.min_iterations}")
        if int(self.min_inliers) < 4:
            raise ValueError(f"min_inliers must be >= 4, got {self.min_inliers}")
        if not (0.0 < self.confidence < 1.0):
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not (math.isfinite(self.min_sigma_px) and self.min_sigma_px > 0):
            raise ValueError(f"min_sigma_px must be positive, got {self.min_sigma_px}")


@dataclass
class PnPResult:
    success: bool
    reason: str                          # "" on success
    T_world_cam: np.ndarray | None       # 4x4 camera-to-world; None on failure
    inlier_mask: np.ndarray              # (N,) bool over the input correspondences (empty for malformed input)
    n_inliers: int
    covariance: np.ndarray | None        # 6x6, (x y z rx ry rz), see the module docstring
    reprojection_rmse_px: float          # RMS of the inlier reprojection error norms; nan on failure
    threshold_px: float = float("nan")   # the inlier threshold actually used (after scaling)
    iterations: int = 0                  # RANSAC iterations run
    extra: dict = field(default_factory=dict)


def scaled_threshold_px(config: PnPConfig, width: int, height: int) -> float:
    """The inlier threshold for an image of ``width`` x ``height`` pixels."""
    diagonal = math.hypot(float(width), float(height))
    return float(config.threshold_px) * diagonal / float(config.reference_diagonal_px)


def _failure(reason: str, n: int, threshold_px: float = float("nan"), iterations: int = 0,
             inlier_mask: np.ndarray | None = None) -> PnPResult:
    mask = np.zeros(max(n, 0), dtype=bool) if inlier_mask is None else inlier_mask
    return PnPResult(
        success=False, reason=reason, T_world_cam=None, inlier_mask=mask,
        n_inliers=int(mask.sum()), covariance=None, reprojection_rmse_px=float("nan"),
        threshold_px=threshold_px, iterations=iterations,
    )


def reprojection_residuals(T_world_cam: np.ndarray, K: np.ndarray, points2D: np.ndarray,
                           points3D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residuals ``projection - observation`` (N,2) in pixels and depths (N,) in the camera."""
    R_wc = T_world_cam[:3, :3]
    c = T_world_cam[:3, 3]
    p_cam = (points3D - c) @ R_wc  # rows: R_wc^T (X - c)
    z = p_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * p_cam[:, 0] / z + K[0, 2]
        v = K[1, 1] * p_cam[:, 1] / z + K[1, 2]
    return np.stack([u, v], axis=1) - points2D, z


def pose_jacobian(T_world_cam: np.ndarray, K: np.ndarray, points3D: np.ndarray) -> np.ndarray:
    """d(projection)/d(delta) as (N, 2, 6) for the world-frame perturbation of the module docstring."""
    R_wc = T_world_cam[:3, :3]
    R_cw = R_wc.T
    c = T_world_cam[:3, 3]
    v = points3D - c                       # (N,3) world vectors from the centre to the points
    p_cam = v @ R_wc                       # (N,3) = R_cw v
    x, y, z = p_cam[:, 0], p_cam[:, 1], p_cam[:, 2]
    fx, fy = K[0, 0], K[1, 1]
    n = len(points3D)
    # Derivative of the pinhole projection w.r.t. the camera-frame point.
    d_proj = np.zeros((n, 2, 3))
    d_proj[:, 0, 0] = fx / z
    d_proj[:, 0, 2] = -fx * x / z**2
    d_proj[:, 1, 1] = fy / z
    d_proj[:, 1, 2] = -fy * y / z**2
    # p_cam = R_wc^T Exp(-w) (X - c - dc):  d/d(dc) = -R_cw,  d/dw = R_cw [v]_x.
    d_point = np.zeros((n, 3, 6))
    d_point[:, :, :3] = -R_cw
    skew_v = np.zeros((n, 3, 3))
    skew_v[:, 0, 1], skew_v[:, 0, 2] = -v[:, 2], v[:, 1]
    skew_v[:, 1, 0], skew_v[:, 1, 2] = v[:, 2], -v[:, 0]
    skew_v[:, 2, 0], skew_v[:, 2, 1] = -v[:, 1], v[:, 0]
    d_point[:, :, 3:] = R_cw @ skew_v
    return d_proj @ d_point


def pose_covariance(T_world_cam: np.ndarray, K: np.ndarray, points2D: np.ndarray, points3D: np.ndarray,
                    min_sigma_px: float = 0.25, coordinate_sigma_m: float = 0.0) -> tuple[np.ndarray, float]:
    """(6x6 covariance, sigma in px) of ``T_world_cam`` from these inlier correspondences.

    ``coordinate_sigma_m`` > 0 adds the error of the 3D points themselves (regressed scene
    coordinates are far noisier than detected keypoints): point i's reprojection covariance is
    then ``sigma^2 I + coordinate_sigma_m^2 D_i D_i^T`` (``D_i`` = d pixel / d point), so near
    points, whose coordinate error moves their projection most, add the most uncertainty
    (``d2s_nerf_ros.error_model``).

    Raises ``np.linalg.LinAlgError`` when the information matrix is singular (degenerate geometry).
    """
    n = len(points3D)
    residuals, _ = reprojection_residuals(T_world_cam, K, points2D, points3D)
    dof = max(2 * n - 6, 1)
    sigma = max(math.sqrt(float(np.sum(residuals**2)) / dof), float(min_sigma_px))
    J = pose_jacobian(T_world_cam, K, points3D).reshape(-1, 6)      # (2n, 6)
    info = J.T @ J
    # Scale columns so the conditioning test is unit-free (metres vs radians).
    d = np.sqrt(np.clip(np.diag(info), 1e-300, None))
    info_n = info / np.outer(d, d)
    if np.linalg.cond(info_n) > 1e10:
        raise np.linalg.LinAlgError("information matrix is singular: the pose is not observable")
    A_inv = np.linalg.inv(info_n) / np.outer(d, d)
    # The refinement is an unweighted least-squares fit, so with unequal point variances its
    # covariance is the sandwich A^-1 (J^T V J) A^-1, not the (smaller) weighted-fit bound;
    # with equal variances it reduces to sigma^2 (J^T J)^-1.
    pixel_cov = sigma**2 * np.eye(2) + float(coordinate_sigma_m) ** 2 * _projection_outer(T_world_cam, K, points3D)
    J3 = J.reshape(n, 2, 6)
    middle = np.einsum("nai,nab,nbj->ij", J3, pixel_cov, J3)
    cov = A_inv @ middle @ A_inv
    cov = 0.5 * (cov + cov.T)
    return cov, sigma


def _projection_outer(T_world_cam: np.ndarray, K: np.ndarray, points3D: np.ndarray) -> np.ndarray:
    """(n, 2, 2) ``D D^T`` with ``D`` = d(pixel)/d(world point): the pixel covariance that an
    isotropic unit 3D error of each point causes (rotation-invariant, so camera-frame D serves)."""
    p_cam = (points3D - T_world_cam[:3, 3]) @ T_world_cam[:3, :3]
    x, y, z = p_cam[:, 0], p_cam[:, 1], np.maximum(p_cam[:, 2], 1e-6)
    D = np.zeros((len(points3D), 2, 3))
    D[:, 0, 0], D[:, 0, 2] = K[0, 0] / z, -K[0, 0] * x / z**2
    D[:, 1, 1], D[:, 1, 2] = K[1, 1] / z, -K[1, 1] * y / z**2
    return D @ D.transpose(0, 2, 1)


def _validate_inputs(points2D, points3D, camera) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    if points2D is None or points3D is None:
        return "points2D and points3D are required", None, None
    if not isinstance(camera, CameraIntrinsics):
        return f"camera must be CameraIntrinsics, got {type(camera).__name__}", None, None
    try:
        p2 = np.asarray(points2D, dtype=np.float64)
        p3 = np.asarray(points3D, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return f"points are not numeric arrays: {exc}", None, None
    if p2.ndim != 2 or p2.shape[1] != 2:
        return f"points2D must have shape (N, 2), got {p2.shape}", None, None
    if p3.ndim != 2 or p3.shape[1] != 3:
        return f"points3D must have shape (N, 3), got {p3.shape}", None, None
    if len(p2) != len(p3):
        return f"points2D and points3D differ in length ({len(p2)} vs {len(p3)})", None, None
    if len(p2) < 4:
        return f"need at least 4 correspondences, got {len(p2)}", p2, None
    if not (np.isfinite(p2).all() and np.isfinite(p3).all()):
        n_bad = int((~np.isfinite(p2).all(axis=1) | ~np.isfinite(p3).all(axis=1)).sum())
        return f"{n_bad} correspondences have non-finite coordinates", p2, None
    return "", p2, p3


def _is_collinear(points3D: np.ndarray) -> bool:
    centred = points3D - points3D.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    return bool(s[0] <= 0 or s[1] / s[0] < 1e-6)


def solve_pnp_ransac(points2D: np.ndarray, points3D: np.ndarray, camera: CameraIntrinsics,
                     config: PnPConfig | None = None) -> PnPResult:
    """Camera pose from 2D pixels (already undistorted, pinhole ``camera.K``) and 3D world points.

    Never raises on bad data: shapes, non-finite values, fewer than 4 points, degenerate
    geometry or too few inliers give ``success=False`` and a reason. A bad ``config`` is a
    programming error and raises ``ValueError``.
    """
    import poselib  # onboard dependency; imported here so the module imports cheaply

    config = config or PnPConfig()
    config.validate()
    reason, p2, p3 = _validate_inputs(points2D, points3D, camera)
    if reason:
        return _failure(reason, 0 if p2 is None else len(p2))
    n = len(p2)
    threshold = scaled_threshold_px(config, camera.width, camera.height)
    if _is_collinear(p3):
        return _failure("degenerate input: all 3D points are (nearly) collinear", n, threshold)

    cam = {"model": "PINHOLE", "width": int(camera.width), "height": int(camera.height),
           "params": [float(camera.fx), float(camera.fy), float(camera.cx), float(camera.cy)]}
    ransac_opt = {
        "max_iterations": int(config.iterations),
        "min_iterations": int(min(config.min_iterations, config.iterations)),
        "success_prob": float(config.confidence),
        "max_reproj_error": threshold,
        "seed": int(config.seed),
    }
    # Truncated least squares at the inlier threshold: the refined pose is the least-squares
    # estimate on the inliers, which is what the covariance below describes.
    bundle_opt = {"loss_type": "TRUNCATED", "loss_scale": threshold,
                  "max_iterations": 100 if config.refine else 0}
    try:
        pose, info = poselib.estimate_absolute_pose(p2, p3, cam, ransac_opt, bundle_opt)
    except Exception as exc:  # noqa: BLE001 - data poselib cannot digest is a failed frame, not a crash
        return _failure(f"poselib failed: {type(exc).__name__}: {exc}", n, threshold)
    iterations = int(info.get("iterations", 0))
    R_cw = np.asarray(pose.R, dtype=np.float64)
    t_cw = np.asarray(pose.t, dtype=np.float64).reshape(3)
    if not (np.isfinite(R_cw).all() and np.isfinite(t_cw).all()) or int(info.get("num_inliers", 0)) == 0:
        return _failure("RANSAC found no pose", n, threshold, iterations)
    T_world_cam = np.eye(4)
    T_world_cam[:3, :3] = R_cw.T
    T_world_cam[:3, 3] = -R_cw.T @ t_cw

    # Inliers re-decided on the final pose: in front of the camera and within the threshold.
    K = camera.K
    residuals, depth = reprojection_residuals(T_world_cam, K, p2, p3)
    err = np.linalg.norm(residuals, axis=1)
    inliers = (depth > 0) & np.isfinite(err) & (err <= threshold)
    n_inliers = int(inliers.sum())
    if n_inliers < config.min_inliers:
        return _failure(f"only {n_inliers} inliers (minimum {config.min_inliers})", n, threshold,
                        iterations, inlier_mask=inliers)
    if _is_collinear(p3[inliers]):
        return _failure("degenerate solution: the inlier 3D points are (nearly) collinear", n, threshold,
                        iterations, inlier_mask=inliers)
    try:
        cov, sigma = pose_covariance(T_world_cam, K, p2[inliers], p3[inliers], config.min_sigma_px)
    except np.linalg.LinAlgError as exc:
        return _failure(f"degenerate solution: {exc}", n, threshold, iterations, inlier_mask=inliers)
    rmse = float(np.sqrt(np.mean(err[inliers] ** 2)))
    return PnPResult(
        success=True, reason="", T_world_cam=T_world_cam, inlier_mask=inliers, n_inliers=n_inliers,
        covariance=cov, reprojection_rmse_px=rmse, threshold_px=threshold, iterations=iterations,
        extra={"sigma_px": sigma},
    )
