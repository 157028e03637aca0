"""The pure localizer: real MapBundle + SIFT + D2SNet + poselib, never raising on a bad frame."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.features import make_extractor
from d2s_nerf_ros.features.base import Features
from d2s_nerf_ros.geometry import pose_error, transform_points
from d2s_nerf_ros.localizer import (KEYPOINT_INLIER, KEYPOINT_UNUSED, LocalizationResult, Localizer,
                                    LocalizerConfig)
from d2s_nerf_ros.map_bundle import MapBundle
from d2s_nerf_ros.models.d2s import D2SConfig, D2SNet, reliability

torch.set_num_threads(2)

CAMERA = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0)
SMALL_D2S = D2SConfig(descriptor_dim=128, n_layers=2, n_heads=4, head_dims=(256, 256))
OVERFIT_D2S = D2SConfig(descriptor_dim=128, n_layers=1, n_heads=4, head_dims=(256, 256))
STAGES = {"extract", "d2s", "pnp", "total"}


def textured_image(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def random_bundle() -> MapBundle:
    torch.manual_seed(0)
    model = D2SNet(SMALL_D2S)
    extractor = make_extractor("sift", max_keypoints=512, device="cpu")
    return MapBundle.create(model, extractor=extractor.config(), camera=CAMERA)


@pytest.fixture(scope="module")
def random_localizer(random_bundle: MapBundle) -> Localizer:
    return Localizer(random_bundle, LocalizerConfig(max_keypoints=512, device="cpu"))


def assert_failed_cleanly(result: LocalizationResult, expected: str) -> None:
    assert isinstance(result, LocalizationResult)
    assert result.success is False
    assert result.T_world_cam is None and result.covariance is None
    assert expected in result.reason, result.reason
    assert "total" in result.timings_ms and result.timings_ms["total"] >= 0


@pytest.mark.parametrize("name, make_input, expected", [
    ("none", lambda: (None, CAMERA), "no image"),
    ("list", lambda: ([[0, 1], [2, 3]], CAMERA), "numpy array"),
    ("float image", lambda: (np.zeros((480, 640, 3), np.float32), CAMERA), "dtype float32"),
    ("int64 image", lambda: (np.zeros((480, 640), np.int64), CAMERA), "dtype int64"),
    ("four channels", lambda: (np.zeros((480, 640, 4), np.uint8), CAMERA), "shape (480, 640, 4)"),
    ("4-d array", lambda: (np.zeros((1, 480, 640, 3), np.uint8), CAMERA), "shape"),
    ("1-d array", lambda: (np.zeros(640, np.uint8), CAMERA), "shape"),
    ("empty", lambda: (np.zeros((0, 640, 3), np.uint8), CAMERA), "empty"),
    ("1x1", lambda: (np.zeros((1, 1, 3), np.uint8), CAMERA.scaled_to(1, 1)), "too small"),
    ("size mismatch", lambda: (textured_image(320, 240), CAMERA),
     "image size 320x240 does not match camera info 640x480"),
    ("transposed", lambda: (textured_image(480, 640), CAMERA), "image size 480x640 does not match"),
    ("no camera", lambda: (textured_image(), None), "CameraIntrinsics"),
    ("zeros image", lambda: (np.zeros((480, 640, 3), np.uint8), CAMERA), "only 0 keypoints"),
    ("constant grey", lambda: (np.full((480, 640), 128, np.uint8), CAMERA), "only 0 keypoints"),
])
def test_garbage_inputs_fail_with_a_reason(random_localizer: Localizer, name, make_input, expected):
    image, camera = make_input()
    result = random_localizer.localize(image, camera)
    assert_failed_cleanly(result, expected)


def test_untrained_map_fails_on_a_textured_image_and_says_why(random_localizer: Localizer):
    result = random_localizer.localize(textured_image(seed=3), CAMERA)
    assert_failed_cleanly(result, "inliers")
    assert result.n_keypoints > 100
    assert set(result.timings_ms) == STAGES
    assert all(v >= 0 for v in result.timings_ms.values())
    assert result.timings_ms["total"] >= result.timings_ms["extract"] + result.timings_ms["d2s"]
    # A randomly initialised head predicts |u| far from 0, so few predictions pass r >= 0.5:
    # the localizer falls back to the most reliable ones and says so.
    assert result.n_reliable < 15
    assert result.used_fallback
    assert "most reliable" in result.reason
    # A refused frame still says which keypoints PnP got (~/debug_image draws them).
    assert (result.keypoint_roles != KEYPOINT_UNUSED).sum() == result.n_correspondences > 0


def test_uint16_and_grey_images_are_accepted(random_localizer: Localizer):
    grey = cv2.cvtColor(textured_image(seed=4), cv2.COLOR_RGB2GRAY)
    for image in (grey, grey.astype(np.uint16) * 16, grey[:, :, None]):
        result = random_localizer.localize(image, CAMERA)
        assert result.n_keypoints > 100, result.reason  # reached extraction and D2S
        assert "d2s" in result.timings_ms


def test_an_exception_inside_becomes_a_failure(random_bundle: MapBundle):
    localizer = Localizer(random_bundle, LocalizerConfig(max_keypoints=512, device="cpu"))

    class BrokenModel(torch.nn.Module):
        def forward(self, descriptors, mask):
            raise RuntimeError("CUDA out of memory (simulated)")

    localizer.model = BrokenModel()  # a real fault path: the model call raising at run time
    result = localizer.localize(textured_image(), CAMERA)
    assert_failed_cleanly(result, "RuntimeError: CUDA out of memory (simulated)")
    assert result.n_keypoints > 0


def test_bad_config_and_mismatched_map_raise_at_construction(random_bundle: MapBundle):
    with pytest.raises(ValueError, match="reliability_threshold"):
        Localizer(random_bundle, LocalizerConfig(reliability_threshold=2.0, device="cpu"))
    with pytest.raises(ValueError, match="min_inliers"):
        Localizer(random_bundle, LocalizerConfig(min_inliers=3, device="cpu"))
    with pytest.raises(ValueError, match="extractor_backend"):
        Localizer(random_bundle, LocalizerConfig(extractor_backend="openvino", device="cpu"))
    with pytest.raises(ValueError, match="num_threads"):
        Localizer(random_bundle, LocalizerConfig(num_threads=-1, device="cpu"))
    with pytest.raises(ValueError, match="has no onnxruntime backend"):
        Localizer(random_bundle, LocalizerConfig(extractor_backend="onnxruntime", device="cpu"))
    # A map whose model expects 64-d descriptors cannot run with SIFT's 128-d ones.
    wrong = MapBundle.create(D2SNet(D2SConfig(descriptor_dim=64, n_layers=1, head_dims=(32,))),
                             extractor=random_bundle.extractor_config, camera=CAMERA)
    with pytest.raises(ValueError, match="64-d descriptors"):
        Localizer(wrong, LocalizerConfig(device="cpu"))


def test_from_path_and_warmup(random_bundle: MapBundle, tmp_path: Path):
    random_bundle.save(tmp_path / "map")
    localizer = Localizer.from_path(tmp_path / "map", LocalizerConfig(max_keypoints=256, device="cpu", num_threads=2))
    assert localizer.extractor.max_keypoints == 256
    assert torch.get_num_threads() == 2 and localizer.extractor.num_threads == 2
    result = localizer.warmup()
    assert isinstance(result, LocalizationResult) and not result.success
    assert result.n_keypoints > 0 and "pnp" in result.timings_ms


# ----------------------------------------------------------------------------- real data, end to end


def _depth_labels(frame_dir: Path, index: int, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points of the keypoints from the 7-Scenes depth (colour intrinsics, as the README advises)."""
    T = np.loadtxt(frame_dir / f"frame-{index:06d}.pose.txt")
    depth_raw = cv2.imread(str(frame_dir / f"frame-{index:06d}.depth.png"), cv2.IMREAD_UNCHANGED)
    cols = np.clip(np.rint(keypoints[:, 0]).astype(int), 0, 639)
    rows = np.clip(np.rint(keypoints[:, 1]).astype(int), 0, 479)
    raw = depth_raw[rows, cols]
    valid = (raw > 0) & (raw != 65535)
    z = raw.astype(np.float64) / 1000.0
    p_cam = np.stack([(keypoints[:, 0] - CAMERA.cx) / CAMERA.fx * z, (keypoints[:, 1] - CAMERA.cy) / CAMERA.fy * z, z],
                     axis=1)
    return transform_points(T, p_cam), valid, T


def _train_step(model: D2SNet, optimiser: torch.optim.Optimizer, descriptors: torch.Tensor, target: torch.Tensor,
                valid: torch.Tensor) -> float:
    xyz, u = model(descriptors)
    coordinate_loss = (xyz[0][valid] - target[valid]).norm(dim=1).mean()
    reliability_loss = ((reliability(u[0]) - valid.float()) ** 2).mean()
    optimiser.zero_grad()
    (coordinate_loss + reliability_loss).backward()
    optimiser.step()
    return float(coordinate_loss.detach())


@pytest.mark.builds  # trains a D2S model: minutes on 2 cores
def test_overfit_map_localizes_its_own_frame(redkitchen_dir: Path):
    """A D2S net overfitted to one real frame's depth labels must give that frame's pose back."""
    frame_dir = redkitchen_dir / "seq-01"
    image = cv2.cvtColor(cv2.imread(str(frame_dir / "frame-000000.color.jpg")), cv2.COLOR_BGR2RGB)
    extractor = make_extractor("sift", max_keypoints=400, device="cpu")
    features = extractor.extract(image)
    points, valid, T_gt = _depth_labels(frame_dir, 0, features.keypoints.astype(np.float64))
    assert valid.sum() > 150

    torch.manual_seed(0)
    model = D2SNet(OVERFIT_D2S)
    centre = points[valid].mean(axis=0)
    model.set_coordinate_frame(torch.tensor(centre, dtype=torch.float32), float(np.abs(points[valid] - centre).max()))
    descriptors = torch.from_numpy(features.descriptors)[None]
    target = torch.from_numpy(points.astype(np.float32))
    valid_t = torch.from_numpy(valid)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 500
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    # One thread: on a shared 2-core machine, more threads only fight over the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            coordinate_loss = _train_step(model, optimiser, descriptors, target, valid_t)
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    assert coordinate_loss < 0.05, coordinate_loss

    bundle = MapBundle.create(model, extractor=extractor.config(), camera=CAMERA)
    localizer = Localizer(bundle, LocalizerConfig(max_keypoints=400, device="cpu"))
    result = localizer.localize(image, CAMERA)
    assert result.success, result.reason
    assert result.reason == "" and not result.used_fallback
    dt, dr = pose_error(result.T_world_cam, T_gt)
    assert dt < 0.05 and dr < 2.0, (dt, dr)
    # From the same features extracted beforehand (an evaluation's query cache): the same pose.
    cached = localizer.localize_features(features, CAMERA)
    assert cached.success and cached.n_keypoints == result.n_keypoints and "extract" not in cached.timings_ms
    assert np.allclose(cached.T_world_cam, result.T_world_cam, atol=1e-6)
    assert_failed_cleanly(localizer.localize_features(features, CameraIntrinsics(320, 240, 262.5, 262.5, 160, 120)),
                          "do not match camera info")
    short = Features(features.keypoints, features.descriptors[:, :64], features.scores, features.image_size)
    assert_failed_cleanly(localizer.localize_features(short, CAMERA), "64-d descriptors")
    assert_failed_cleanly(localizer.localize_features(image, CAMERA), "must be Features")
    assert result.n_inliers >= 100 and result.n_reliable >= result.n_inliers
    # Every keypoint's role, for ~/debug_image: as many inliers and PnP correspondences as counted.
    roles = result.keypoint_roles
    assert result.keypoints_px.shape == (result.n_keypoints, 2) and roles.shape == (result.n_keypoints,)
    assert (roles == KEYPOINT_INLIER).sum() == result.n_inliers
    assert (roles != KEYPOINT_UNUSED).sum() == result.n_correspondences
    assert set(result.timings_ms) == STAGES
    cov = result.covariance
    assert cov.shape == (6, 6) and np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0
    # The position uncertainty is a few millimetres to centimetres, not a constant placeholder.
    assert 1e-4 < np.sqrt(np.diag(cov)[:3]).max() < 0.1

    # The viewpoint gate: a pose needs a mapping camera near it looking the same way.
    def with_mapping_camera(T_world_cam: np.ndarray, **config) -> LocalizationResult:
        mapped = MapBundle.create(model, extractor=extractor.config(), camera=CAMERA,
                                  frames=[{"name": "mapping", "T_world_cam": T_world_cam.tolist()}])
        return Localizer(mapped, LocalizerConfig(max_keypoints=400, device="cpu", **config)).localize_features(
            features, CAMERA)

    nearby = T_gt.copy()
    nearby[:3, 3] += [0.3, 0.0, 0.4]  # 0.5 m away, same direction
    assert with_mapping_camera(nearby).success
    far = T_gt.copy()
    far[:3, 3] += [1.2, 0.0, 1.6]  # 2 m away
    refused = with_mapping_camera(far)
    assert not refused.success and "2.00 m from the nearest mapping camera" in refused.reason, refused.reason
    assert with_mapping_camera(far, max_distance_to_mapping_m=0.0).success  # 0: the gate is off
    turned = T_gt @ np.diag([-1.0, 1.0, -1.0, 1.0])  # same place, looking the other way
    refused = with_mapping_camera(turned)
    assert not refused.success and "inf m" in refused.reason, refused.reason
    assert with_mapping_camera(turned, max_angle_to_mapping_deg=180.0).success


def test_mapping_viewpoints_skip_frames_without_a_usable_pose():
    from d2s_nerf_ros.localizer import distance_to_mapping, mapping_viewpoints

    T = np.eye(4)
    T[:3, 3] = [1.0, 2.0, 3.0]
    manifest = {"frames": [{"name": "a", "T_world_cam": T.tolist()}, {"name": "no pose"},
                           {"name": "nan", "T_world_cam": np.full((4, 4), np.nan).tolist()},
                           {"name": "3x3", "T_world_cam": np.eye(3).tolist()}, {"name": "text", "T_world_cam": "eye"}]}
    centres, axes = mapping_viewpoints(manifest)
    assert centres.tolist() == [[1.0, 2.0, 3.0]] and axes.tolist() == [[0.0, 0.0, 1.0]]
    assert mapping_viewpoints({})[0].shape == (0, 3)
    query = np.eye(4)
    assert distance_to_mapping(query, centres, axes, 45.0) == pytest.approx(np.sqrt(14.0))
    # 60 degrees off the mapping camera's axis: outside 45, inside 90.
    c, s = np.cos(np.radians(60)), np.sin(np.radians(60))
    query[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    assert distance_to_mapping(query, centres, axes, 45.0) == np.inf
    assert distance_to_mapping(query, centres, axes, 90.0) == pytest.approx(np.sqrt(14.0))
    with pytest.raises(ValueError, match="max_distance_to_mapping_m"):
        LocalizerConfig(max_distance_to_mapping_m=-1.0).validate()
    with pytest.raises(ValueError, match="max_angle_to_mapping_deg"):
        LocalizerConfig(max_angle_to_mapping_deg=0.0).validate()
