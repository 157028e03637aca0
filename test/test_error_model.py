"""The error model of regressed coordinates (d2s_nerf_ros.error_model): covariance never zero,
its weighting and scale, its round trip through a saved bundle, and old maps without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.error_model import FALLBACK_ERROR_MODEL, ErrorModel, nees, pose_error_vector
from d2s_nerf_ros.geometry import make_pose, matrix_from_rotvec
from d2s_nerf_ros.map_bundle import MapBundle, MapBundleError
from d2s_nerf_ros.pnp import PnPConfig, solve_pnp_ransac
from d2s_nerf_ros.tf_math import checked_pose_covariance
from offline.error_model_fit import across_ray_distances

CAMERA = CameraIntrinsics(640, 480, 525.0, 525.0, 319.5, 239.5)
T_TRUE = make_pose(matrix_from_rotvec(np.array([0.1, -0.2, 0.05])), np.array([0.3, -0.1, 0.2]))


def exact_scene(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.uniform([20, 20], [620, 460], (n, 2))
    depth = rng.uniform(1.0, 4.0, n)
    rays = np.concatenate([pixels, np.ones((n, 1))], axis=1) @ np.linalg.inv(CAMERA.K).T
    points = (rays * depth[:, None]) @ T_TRUE[:3, :3].T + T_TRUE[:3, 3]
    return pixels, points


def test_covariance_of_a_perfect_fit_is_positive_definite_not_zero():
    pixels, points = exact_scene()
    pnp = solve_pnp_ransac(pixels, points, CAMERA, PnPConfig())
    assert pnp.success and pnp.reprojection_rmse_px < 1e-6
    for model in (FALLBACK_ERROR_MODEL, ErrorModel(coordinate_sigma_m=0.0, covariance_scale=1.0)):
        cov = model.pose_covariance(pnp.T_world_cam, pixels, points, CAMERA)
        checked_pose_covariance(cov)  # raises unless finite, symmetric, positive definite
        assert np.linalg.eigvalsh(cov).min() > 0


@pytest.mark.parametrize("bad, fragment", [
    (None, "has no covariance"), (np.zeros((6, 6)), "not positive definite"),
    (np.full((6, 6), np.nan), "non-finite"), (np.eye(3), "must be 6x6"),
    (np.triu(np.ones((6, 6))), "not symmetric"),
])
def test_unpublishable_covariances_are_refused(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        checked_pose_covariance(bad)


def test_coordinate_sigma_and_scale_enlarge_the_covariance_as_documented():
    pixels, points = exact_scene()
    base = ErrorModel(coordinate_sigma_m=0.0, covariance_scale=1.0).pose_covariance(T_TRUE, pixels, points, CAMERA)
    noisy = ErrorModel(coordinate_sigma_m=0.05, covariance_scale=1.0).pose_covariance(T_TRUE, pixels, points, CAMERA)
    scaled = ErrorModel(coordinate_sigma_m=0.05, covariance_scale=4.0).pose_covariance(T_TRUE, pixels, points, CAMERA)
    assert np.all(np.linalg.eigvalsh(noisy - base) > 0)  # more uncertain in every direction
    np.testing.assert_allclose(scaled, 4.0 * noisy, rtol=1e-12)


def test_coordinate_noise_matches_the_model_by_monte_carlo():
    """Points perturbed with the modelled coordinate error: the refitted poses scatter as the
    model's covariance says (mean NEES about 6)."""
    pixels, points = exact_scene(150)
    sigma = 0.03
    model = ErrorModel(coordinate_sigma_m=sigma, covariance_scale=1.0, min_sigma_px=1e-3)
    rng = np.random.default_rng(1)
    values = []
    for _ in range(60):
        noisy = points + rng.normal(0.0, sigma, points.shape)
        pnp = solve_pnp_ransac(pixels, noisy, CAMERA, PnPConfig(threshold_px=1000.0))
        assert pnp.success
        # The model at the true pose (its residual sigma is the floor: coordinate noise is the only noise).
        cov = model.pose_covariance(T_TRUE, pixels, points, CAMERA)
        values.append(nees(pose_error_vector(pnp.T_world_cam, T_TRUE), cov))
    # 6 for an exact model; measured 7.4 over these 60 draws (the sampling spread of the mean is ~0.5).
    assert 2.0 < np.mean(values) < 9.0, np.mean(values)


def test_across_ray_distance_ignores_depth_error():
    pixels, points = exact_scene(20)
    centre = T_TRUE[:3, 3]
    further = centre + (points - centre) * 1.7  # slid along their rays
    np.testing.assert_allclose(across_ray_distances(T_TRUE, CAMERA.K, pixels, further), 0.0, atol=1e-9)
    sideways = points + T_TRUE[:3, :3] @ np.array([0.02, 0.0, 0.0])  # camera x: across every ray
    d = across_ray_distances(T_TRUE, CAMERA.K, pixels, sideways)
    assert np.all(d > 0.01) and np.all(d <= 0.02 + 1e-12)


def _small_bundle() -> MapBundle:
    import torch

    from d2s_nerf_ros.models.d2s import D2SConfig, D2SNet

    torch.manual_seed(0)
    model = D2SNet(D2SConfig(descriptor_dim=32, n_layers=1, head_dims=(32,)))
    return MapBundle.create(model, extractor={"name": "sift", "max_keypoints": 64, "descriptor_dim": 32}, camera=CAMERA)


def test_error_model_round_trip_through_a_saved_bundle(tmp_path: Path):
    bundle = _small_bundle()
    model = ErrorModel(coordinate_sigma_m=0.042, covariance_scale=7.5, n_frames=11, n_points=2345,
                       frames=("seq-01/frame-000010", "seq-01/frame-000030"))
    bundle.set_error_model(model)
    loaded = MapBundle.load(bundle.save(tmp_path / "map"))
    assert loaded.error_model == model and loaded.error_model.source == "calibrated"


def test_old_map_without_error_model_gets_the_fallback(tmp_path: Path):
    path = _small_bundle().save(tmp_path / "map")
    assert "error_model" not in json.loads((path / "manifest.json").read_text())
    assert MapBundle.load(path).error_model is FALLBACK_ERROR_MODEL
    assert FALLBACK_ERROR_MODEL.source == "fallback"


@pytest.mark.parametrize("stored, fragment", [
    ({"version": 99, "coordinate_sigma_m": 0.1, "covariance_scale": 1.0}, "version 99"),
    ({"version": 1, "coordinate_sigma_m": -0.1, "covariance_scale": 1.0}, "coordinate_sigma_m must be >= 0"),
    ({"version": 1, "coordinate_sigma_m": 0.1, "covariance_scale": 0.0}, "covariance_scale must be positive"),
    ({"version": 1, "covariance_scale": 1.0}, "incomplete"),
    ("0.1", "must be a mapping"),
])
def test_a_broken_error_model_says_so(tmp_path: Path, stored, fragment):
    path = _small_bundle().save(tmp_path / "map")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["error_model"] = stored
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapBundleError, match=f"invalid error_model section: .*{fragment}"):
        MapBundle.load(path)
