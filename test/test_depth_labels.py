"""Depth labels against analytic planes, depth edges and holes, plus one real 7-Scenes frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import invert_pose, make_pose, project_points, transform_points
from offline.depth_labels import DepthLabelConfig, depth_labels
from offline.sources.frames import Frame

CAM = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0)


def posed_frame(camera: CameraIntrinsics = CAM) -> Frame:
    R, _ = cv2.Rodrigues(np.array([0.2, -0.4, 0.1]))
    return Frame("f", None, make_pose(R, [0.5, -1.0, 2.0]), camera)


def plane_depth(camera: CameraIntrinsics, normal_cam: np.ndarray, offset: float, width: int, height: int) -> np.ndarray:
    """z-depth of the plane n . X = d (camera frame) at every pixel of a width x height map of the same camera."""
    cam = camera.scaled_to(width, height)
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays = np.stack([(u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones_like(u)], axis=-1)
    return offset / (rays @ normal_cam)


def random_keypoints(n: int, rng: np.random.Generator, margin: float = 2.0) -> np.ndarray:
    return np.stack([rng.uniform(margin, 639 - margin, n), rng.uniform(margin, 479 - margin, n)], axis=1)


def test_fronto_parallel_plane_exact() -> None:
    frame = posed_frame()
    rng = np.random.default_rng(0)
    kp = random_keypoints(200, rng)
    depth = np.full((480, 640), 2.5)
    pts, valid = depth_labels(frame, kp, depth)
    assert pts.dtype == np.float32 and pts.shape == (200, 3) and valid.all()
    # Independent truth: the ray through each pixel at z = 2.5, moved into the world.
    expected_cam = np.stack([(kp[:, 0] - 320) / 525 * 2.5, (kp[:, 1] - 240) / 525 * 2.5, np.full(200, 2.5)], axis=1)
    expected = transform_points(frame.T_world_cam, expected_cam)
    np.testing.assert_allclose(pts, expected, atol=1e-5)
    # And they project back onto the keypoints.
    uv, z = project_points(invert_pose(frame.T_world_cam), CAM.K, pts.astype(np.float64))
    np.testing.assert_allclose(uv, kp, atol=1e-3)
    np.testing.assert_allclose(z, 2.5, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_tilted_plane_points_lie_on_plane(interpolation: str) -> None:
    frame = posed_frame()
    n = np.array([0.3, -0.2, 1.0])
    n /= np.linalg.norm(n)
    d = 2.0
    depth = plane_depth(CAM, n, d, 640, 480)
    rng = np.random.default_rng(1)
    kp = random_keypoints(300, rng)
    pts, valid = depth_labels(frame, kp, depth, DepthLabelConfig(interpolation=interpolation))
    assert valid.all()
    pc = transform_points(invert_pose(frame.T_world_cam), pts.astype(np.float64))
    # On the plane (bilinear: within a fraction of a mm; nearest: the neighbouring pixel's depth).
    tol = 1e-3 if interpolation == "bilinear" else 2e-2
    assert np.abs(pc @ n - d).max() < tol
    if interpolation == "bilinear":
        # Also along the right ray: reprojects to the keypoint.
        uv, _ = project_points(invert_pose(frame.T_world_cam), CAM.K, pts.astype(np.float64))
        np.testing.assert_allclose(uv, kp, atol=1e-3)


def test_half_resolution_depth_map() -> None:
    frame = posed_frame()
    n = np.array([0.0, 0.2, 1.0])
    n /= np.linalg.norm(n)
    depth_small = plane_depth(CAM, n, 1.8, 320, 240)
    kp = random_keypoints(100, np.random.default_rng(2), margin=4.0)
    pts, valid = depth_labels(frame, kp, depth_small)
    assert valid.all()
    pc = transform_points(invert_pose(frame.T_world_cam), pts.astype(np.float64))
    assert np.abs(pc @ n - 1.8).max() < 2e-3


def test_depth_edge_holes_range_and_outside() -> None:
    frame = posed_frame()
    depth = np.full((480, 640), 1.0)
    depth[:, 320:] = 3.0            # a depth step between columns 319 and 320
    depth[100:110, 100:110] = np.nan  # a hole
    depth[400:, :100] = 0.05        # closer than min_depth
    depth[400:, 540:] = 20.0        # farther than max_depth
    kp = np.array([
        [319.5, 240.0],   # straddles the step: invalid
        [319.0, 240.0],   # bilinear stencil 319..320 still straddles: invalid
        [318.0, 240.0],   # 318..319, all 1 m: valid
        [322.0, 240.0],   # valid at 3 m
        [105.0, 105.0],   # in the hole
        [99.5, 105.0],    # stencil touches the hole
        [50.0, 450.0],    # too close
        [600.0, 450.0],   # too far
        [-1.0, 200.0],    # outside the image
        [200.0, 480.5],   # outside the image
        [639.0, 0.0],     # the corner pixel centre: valid
    ])
    pts, valid = depth_labels(frame, kp, depth)
    assert valid.tolist() == [False, False, True, True, False, False, False, False, False, False, True]
    assert np.all(pts[~valid] == 0.0)
    pc = transform_points(invert_pose(frame.T_world_cam), pts[valid].astype(np.float64))
    np.testing.assert_allclose(pc[:, 2], [1.0, 3.0, 3.0], atol=1e-5)

    # Nearest: the 3x3 neighbourhood of 319 includes column 320 -> invalid; 317 does not.
    near = DepthLabelConfig(interpolation="nearest")
    _, valid = depth_labels(frame, np.array([[319.2, 240.0], [317.0, 240.0], [322.4, 240.0]]), depth, near)
    assert valid.tolist() == [False, True, True]

    # A loose discontinuity limit accepts the step (and then interpolates across it).
    _, valid = depth_labels(frame, kp[:1], depth, DepthLabelConfig(max_discontinuity=5.0))
    assert valid.tolist() == [True]


def test_bad_inputs() -> None:
    frame = posed_frame()
    with pytest.raises(ValueError, match="no depth image"):
        depth_labels(frame, np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        depth_labels(frame, np.zeros((3, 3)), np.ones((480, 640)))
    with pytest.raises(ValueError, match="2-D"):
        depth_labels(frame, np.zeros((3, 2)), np.ones((480, 640, 1)))
    with pytest.raises(ValueError, match="interpolation"):
        depth_labels(frame, np.zeros((3, 2)), np.ones((480, 640)), DepthLabelConfig(interpolation="cubic"))
    pts, valid = depth_labels(frame, np.zeros((0, 2)), np.ones((480, 640)))
    assert pts.shape == (0, 3) and valid.shape == (0,)


def test_real_redkitchen_frame(redkitchen_dir) -> None:
    from offline.sources.sevenscenes import load_sevenscenes

    frame = load_sevenscenes(redkitchen_dir)[120]
    raw = cv2.imread(str(frame.depth_path), cv2.IMREAD_UNCHANGED)
    # np.linalg.inv, not invert_pose: 7-Scenes rotations are orthonormal only to ~4e-4.
    # Integer pixels with nearest sampling: the label's camera z is exactly the depth png value.
    rng = np.random.default_rng(5)
    kp = np.stack([rng.integers(1, 639, 500), rng.integers(1, 479, 500)], axis=1).astype(np.float64)
    pts, valid = depth_labels(frame, kp, config=DepthLabelConfig(interpolation="nearest"))
    assert valid.mean() > 0.5  # most of a kitchen view has depth
    pc = transform_points(np.linalg.inv(frame.T_world_cam), pts[valid].astype(np.float64))
    mm = raw[kp[valid, 1].astype(int), kp[valid, 0].astype(int)]
    np.testing.assert_allclose(pc[:, 2], mm / 1000.0, atol=1e-5)
    # Back-projected with the colour camera (525), the points reproject onto the keypoints.
    uv, _ = project_points(np.linalg.inv(frame.T_world_cam), frame.camera.K, pts[valid].astype(np.float64))
    np.testing.assert_allclose(uv, kp[valid], atol=1e-3)
    assert not np.any(valid & ((raw[kp[:, 1].astype(int), kp[:, 0].astype(int)] == 0)
                               | (raw[kp[:, 1].astype(int), kp[:, 0].astype(int)] == 65535)))
