"""PnP-RANSAC against synthetic cameras with known poses, and its covariance against Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import (invert_pose, make_pose, matrix_from_rotvec, pose_error, project_points,
                                   rotvec_from_matrix, transform_points)
from d2s_nerf_ros.pnp import (PnPConfig, pose_jacobian, reprojection_residuals, scaled_threshold_px,
                              solve_pnp_ransac)

CAMERA = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0)
T_TRUE = make_pose(matrix_from_rotvec([0.3, -0.5, 0.2]), [1.2, -0.4, 0.8])


def scene(n: int, rng: np.random.Generator, camera: CameraIntrinsics = CAMERA, T_world_cam: np.ndarray = T_TRUE,
          depth=(1.5, 4.0)) -> tuple[np.ndarray, np.ndarray]:
    """n world points seen by ``camera`` at ``T_world_cam``, and their exact pixels."""
    z = rng.uniform(*depth, n)
    u = rng.uniform(0, camera.width - 1, n)
    v = rng.uniform(0, camera.height - 1, n)
    p_cam = np.stack([(u - camera.cx) / camera.fx * z, (v - camera.cy) / camera.fy * z, z], axis=1)
    X = transform_points(T_world_cam, p_cam)
    uv, _ = project_points(invert_pose(T_world_cam), camera.K, X)
    return uv, X


def world_delta(T_est: np.ndarray, T_ref: np.ndarray) -> np.ndarray:
    """(dc, w) with c_est = c_ref + dc and R_est = Exp(w) R_ref: the covariance's parametrisation."""
    dc = T_est[:3, 3] - T_ref[:3, 3]
    w = rotvec_from_matrix(T_est[:3, :3] @ T_ref[:3, :3].T)
    return np.concatenate([dc, w])


def test_exact_correspondences_recover_the_pose():
    rng = np.random.default_rng(1)
    uv, X = scene(100, rng)
    result = solve_pnp_ransac(uv, X, CAMERA, PnPConfig(seed=3))
    assert result.success, result.reason
    assert result.reason == ""
    assert np.abs(result.T_world_cam - T_TRUE).max() < 1e-6
    assert result.n_inliers == 100 and result.inlier_mask.all()
    assert result.reprojection_rmse_px < 1e-6
    assert result.threshold_px == pytest.approx(12.0)


def test_outliers_and_noise():
    rng = np.random.default_rng(2)
    n = 600
    uv, X = scene(n, rng, depth=(1.0, 3.0))
    uv = uv + rng.normal(0.0, 0.5, uv.shape)
    outlier = rng.random(n) < 0.4
    # Outliers: pixels anywhere in the image, far from where the point projects.
    uv[outlier] = rng.uniform([0, 0], [CAMERA.width - 1, CAMERA.height - 1], (int(outlier.sum()), 2))
    result = solve_pnp_ransac(uv, X, CAMERA, PnPConfig(seed=0))
    assert result.success, result.reason
    dt, dr = pose_error(result.T_world_cam, T_TRUE)
    assert dt < 1e-3, dt
    assert dr < 0.05, dr
    # Every true inlier is found; the few outliers that land within 12 px by chance may be kept.
    assert result.inlier_mask[~outlier].all()
    assert (result.inlier_mask & outlier).sum() <= 0.05 * outlier.sum()
    # The reported RMS is that of the inliers' residual norms, recomputed here independently.
    uv_hat, _ = project_points(invert_pose(result.T_world_cam), CAMERA.K, X[result.inlier_mask])
    rms = np.sqrt(np.mean(np.sum((uv_hat - uv[result.inlier_mask]) ** 2, axis=1)))
    assert result.reprojection_rmse_px == pytest.approx(rms, rel=1e-9)
    # A few chance outliers within 12 px push it a little above 0.5 * sqrt(2) for the noise alone.
    assert 0.6 < result.reprojection_rmse_px < 1.2


def test_threshold_scales_with_image_diagonal():
    config = PnPConfig()
    assert scaled_threshold_px(config, 640, 480) == pytest.approx(12.0)
    assert scaled_threshold_px(config, 1280, 960) == pytest.approx(24.0)
    assert scaled_threshold_px(config, 320, 240) == pytest.approx(6.0)
    assert scaled_threshold_px(PnPConfig(threshold_px=5.0), 1920, 1080) == pytest.approx(5.0 * math.hypot(1920, 1080) / 800)

    # Behaviour: points displaced by 18 px are outliers at 640x480 (12 px) but inliers for the
    # same scene seen by a 1280x960 camera (24 px).
    rng = np.random.default_rng(4)
    for camera, expect_inliers in ((CAMERA, False), (CAMERA.scaled_to(1280, 960), True)):
        uv, X = scene(200, rng, camera=camera)
        shifted = np.zeros(200, dtype=bool)
        shifted[:20] = True
        angle = rng.uniform(0, 2 * np.pi, 20)
        uv[shifted] += 18.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        result = solve_pnp_ransac(uv, X, camera, PnPConfig(seed=0))
        assert result.success, result.reason
        assert result.threshold_px == pytest.approx(12.0 * camera.width / 640)
        if expect_inliers:
            assert result.inlier_mask[shifted].all()
        else:
            assert not result.inlier_mask[shifted].any()
            assert result.inlier_mask[~shifted].all()


@pytest.mark.parametrize("case", ["three_points", "nan_2d", "inf_3d", "collinear", "shape_2d", "shape_3d",
                                  "length_mismatch", "none", "not_a_camera", "empty", "scalar", "strings"])
def test_degenerate_inputs_fail_with_a_reason(case):
    rng = np.random.default_rng(5)
    uv, X = scene(50, rng)
    camera = CAMERA
    if case == "three_points":
        uv, X = uv[:3], X[:3]
    elif case == "nan_2d":
        uv[7, 1] = np.nan
    elif case == "inf_3d":
        X[3, 0] = np.inf
    elif case == "collinear":
        X = np.linspace([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], 50)
        uv, _ = project_points(invert_pose(T_TRUE), CAMERA.K, X)
    elif case == "shape_2d":
        uv = np.zeros((50, 3))
    elif case == "shape_3d":
        X = X[:, :2]
    elif case == "length_mismatch":
        X = X[:40]
    elif case == "none":
        uv = None
    elif case == "not_a_camera":
        camera = CAMERA.K
    elif case == "empty":
        uv, X = np.zeros((0, 2)), np.zeros((0, 3))
    elif case == "scalar":
        uv = np.float64(1.0)
    elif case == "strings":
        X = [["a", "b", "c"]] * 50
    result = solve_pnp_ransac(uv, X, camera, PnPConfig())
    assert not result.success
    assert result.reason
    assert result.T_world_cam is None and result.covariance is None
    assert result.n_inliers == 0 or case == "collinear"
    expected_word = {"three_points": "at least 4", "nan_2d": "non-finite", "inf_3d": "non-finite",
                     "collinear": "collinear", "shape_2d": "(N, 2)", "shape_3d": "(N, 3)",
                     "length_mismatch": "differ in length", "none": "required", "not_a_camera": "CameraIntrinsics",
                     "empty": "at least 4", "scalar": "(N, 2)", "strings": "numeric"}[case]
    assert expected_word in result.reason


def test_too_few_inliers_is_a_failure():
    rng = np.random.default_rng(6)
    uv, X = scene(40, rng)
    uv[12:] = rng.uniform([0, 0], [639, 479], (28, 2))  # 12 true correspondences, 15 needed
    result = solve_pnp_ransac(uv, X, CAMERA, PnPConfig(min_inliers=15))
    assert not result.success
    assert "inliers" in result.reason
    assert result.T_world_cam is None


def test_bad_config_raises():
    uv, X = scene(20, np.random.default_rng(0))
    with pytest.raises(ValueError, match="threshold_px"):
        solve_pnp_ransac(uv, X, CAMERA, PnPConfig(threshold_px=-1.0))
    with pytest.raises(ValueError, match="min_inliers"):
        solve_pnp_ransac(uv, X, CAMERA, PnPConfig(min_inliers=2))


def test_jacobian_matches_finite_differences():
    rng = np.random.default_rng(7)
    uv, X = scene(10, rng)
    J = pose_jacobian(T_TRUE, CAMERA.K, X)
    eps = 1e-6
    for k in range(6):
        delta = np.zeros(6)
        delta[k] = eps
        plus, minus = T_TRUE.copy(), T_TRUE.copy()
        plus[:3, 3] += delta[:3]
        minus[:3, 3] -= delta[:3]
        plus[:3, :3] = matrix_from_rotvec(delta[3:]) @ T_TRUE[:3, :3]
        minus[:3, :3] = matrix_from_rotvec(-delta[3:]) @ T_TRUE[:3, :3]
        r_plus, _ = reprojection_residuals(plus, CAMERA.K, uv, X)
        r_minus, _ = reprojection_residuals(minus, CAMERA.K, uv, X)
        numeric = (r_plus - r_minus) / (2 * eps)
        np.testing.assert_allclose(J[:, :, k], numeric, rtol=1e-5, atol=1e-4)


def test_covariance_is_spd_and_matches_monte_carlo():
    rng = np.random.default_rng(8)
    uv_true, X = scene(60, rng, depth=(1.5, 5.0))
    sigma_px = 1.0
    config = PnPConfig(seed=1)
    deltas, covariances = [], []
    for _ in range(300):
        uv = uv_true + rng.normal(0.0, sigma_px, uv_true.shape)
        result = solve_pnp_ransac(uv, X, CAMERA, config)
        assert result.success, result.reason
        cov = result.covariance
        assert cov.shape == (6, 6)
        np.testing.assert_allclose(cov, cov.T, atol=1e-15)
        assert np.linalg.eigvalsh(cov).min() > 0
        deltas.append(world_delta(result.T_world_cam, T_TRUE))
        covariances.append(cov)
    deltas = np.array(deltas)
    empirical = np.cov(deltas.T)
    predicted = np.mean(covariances, axis=0)
    ratio = np.diag(empirical) / np.diag(predicted)
    assert np.all(ratio > 1 / 1.5) and np.all(ratio < 1.5), ratio
    # The correlations agree too (position and rotation are strongly coupled in PnP).
    corr_e = empirical / np.sqrt(np.outer(np.diag(empirical), np.diag(empirical)))
    corr_p = predicted / np.sqrt(np.outer(np.diag(predicted), np.diag(predicted)))
    assert np.abs(corr_e - corr_p).max() < 0.2
    # The estimator is unbiased at this noise level.
    assert np.all(np.abs(deltas.mean(axis=0)) < 4 * np.sqrt(np.diag(empirical) / len(deltas)))


def test_covariance_is_in_the_world_frame():
    """Rotating the whole scene (world frame) rotates the position covariance with it."""
    rng = np.random.default_rng(9)
    uv, X = scene(80, rng)
    uv = uv + rng.normal(0, 1.0, uv.shape)
    R_turn = matrix_from_rotvec([0.0, 0.0, np.pi / 2])
    T_turn = make_pose(R_turn, [0.0, 0.0, 0.0])
    a = solve_pnp_ransac(uv, X, CAMERA, PnPConfig(seed=0))
    b = solve_pnp_ransac(uv, transform_points(T_turn, X), CAMERA, PnPConfig(seed=0))
    assert a.success and b.success
    np.testing.assert_allclose(b.T_world_cam, T_turn @ a.T_world_cam, atol=1e-8)
    np.testing.assert_allclose(b.covariance[:3, :3], R_turn @ a.covariance[:3, :3] @ R_turn.T, rtol=1e-5, atol=1e-14)
    np.testing.assert_allclose(b.covariance[3:, 3:], R_turn @ a.covariance[3:, 3:] @ R_turn.T, rtol=1e-5, atol=1e-14)
