"""The demo scene: deterministic, geometrically exact, textured, and written as a real bag."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import invert_pose, make_pose
from offline.demo_scene import (
    DEMO_CAMERA,
    OBSTACLES,
    ROOM,
    START_NS,
    DemoScene,
    base_pose_at,
    base_to_camera,
    cached_scene,
    render_demo_frames,
    write_demo_bag,
)

# Optical axes looking along world +x (z forward = +x, x right = -y, y down = -z).
R_LOOK_PLUS_X = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
CENTRED = CameraIntrinsics(width=64, height=48, fx=50.0, fy=50.0, cx=32.0, cy=24.0)


@pytest.fixture(scope="module")
def scene() -> DemoScene:
    return cached_scene(0)


def backproject(depth: np.ndarray, camera: CameraIntrinsics, T_world_cam: np.ndarray) -> np.ndarray:
    v, u = np.mgrid[0 : camera.height, 0 : camera.width]
    z = depth.ravel().astype(np.float64)
    pc = np.stack([(u.ravel() - camera.cx) / camera.fx * z, (v.ravel() - camera.cy) / camera.fy * z, z], 1)
    return pc @ T_world_cam[:3, :3].T + T_world_cam[:3, 3]


def test_hand_computed_depths(scene):
    # From (1, 0, 1.3) looking along +x, the optical axis meets the wall x = 3 at 2 m.
    T = make_pose(R_LOOK_PLUS_X, [1.0, 0.0, 1.3])
    _, depth = scene.render(T, CENTRED)
    assert depth[24, 32] == pytest.approx(2.0, abs=1e-5)
    # Looking straight down from 1.3 m: the floor at 1.3 m everywhere on the optical axis.
    R_down = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # z forward = -z world
    _, depth = scene.render(make_pose(R_down, [1.0, 0.0, 1.3]), CENTRED)
    assert depth[24, 32] == pytest.approx(1.3, abs=1e-5)
    # Facing the pillar (|x|, |y| <= 0.2) from x = -1: its face x = -0.2 is 0.8 m ahead.
    _, depth = scene.render(make_pose(R_LOOK_PLUS_X, [-1.0, 0.0, 1.3]), CENTRED)
    assert depth[24, 32] == pytest.approx(0.8, abs=1e-5)


def test_every_pixel_lands_on_a_surface_of_the_scene(scene):
    T = base_pose_at(3.0) @ base_to_camera()
    _, depth = scene.render(T, DEMO_CAMERA)
    pts = backproject(depth, DEMO_CAMERA, T)
    lo, hi = np.array(ROOM.lo), np.array(ROOM.hi)
    assert np.all(pts >= lo - 1e-4) and np.all(pts <= hi + 1e-4)
    on_surface = np.any(np.abs(pts - lo) < 1e-4, axis=1) | np.any(np.abs(pts - hi) < 1e-4, axis=1)
    for box in OBSTACLES:
        blo, bhi = np.array(box.lo), np.array(box.hi)
        inside = np.all((pts > blo + 1e-4) & (pts < bhi - 1e-4), axis=1)
        assert not inside.any(), "a depth lands inside an obstacle"
        within = np.all((pts >= blo - 1e-4) & (pts <= bhi + 1e-4), axis=1)
        on_face = np.any((np.abs(pts - blo) < 1e-4) | (np.abs(pts - bhi) < 1e-4), axis=1)
        on_surface |= within & on_face
    assert on_surface.all()


def test_two_views_agree_where_they_overlap(scene):
    """Points seen in frame A, projected into frame B, have B's rendered depth (unless occluded)."""
    Ta = base_pose_at(4.0) @ base_to_camera()
    Tb = base_pose_at(4.4) @ base_to_camera()
    _, da = scene.render(Ta, DEMO_CAMERA)
    _, db = scene.render(Tb, DEMO_CAMERA)
    pts = backproject(da, DEMO_CAMERA, Ta)
    T_b_world = invert_pose(Tb)
    pb = pts @ T_b_world[:3, :3].T + T_b_world[:3, 3]
    u = DEMO_CAMERA.fx * pb[:, 0] / pb[:, 2] + DEMO_CAMERA.cx
    v = DEMO_CAMERA.fy * pb[:, 1] / pb[:, 2] + DEMO_CAMERA.cy
    ok = (pb[:, 2] > 0) & (u >= 0) & (u <= DEMO_CAMERA.width - 1) & (v >= 0) & (v <= DEMO_CAMERA.height - 1)
    assert ok.mean() > 0.5
    shape = (DEMO_CAMERA.height, DEMO_CAMERA.width)
    db_at = cv2.remap(db, u.reshape(shape).astype(np.float32), v.reshape(shape).astype(np.float32), cv2.INTER_LINEAR).ravel()
    agree = np.abs(db_at - pb[:, 2]) < 0.01 * pb[:, 2]
    occluded = db_at < 0.99 * pb[:, 2]  # B sees something in front (the pillar moves across the wall)
    seen_through = db_at > 1.01 * pb[:, 2]  # B sees past a surface A saw: only at depth edges (interpolation)
    assert agree[ok].mean() > 0.75
    assert (agree | occluded)[ok].mean() > 0.97
    assert seen_through[ok].mean() < 0.03


def test_deterministic_textured_and_fast():
    start = time.perf_counter()
    _, _, _, _, cams, images, depths = render_demo_frames(20, seed=0)
    elapsed = time.perf_counter() - start
    _, _, _, _, _, again, _ = render_demo_frames(20, seed=0, scene=DemoScene(0))
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    _, _, _, _, _, other, _ = render_demo_frames(2, seed=1)
    assert not np.array_equal(images[0], other[0])
    for image in images:
        assert image.shape == (240, 320, 3) and image.dtype == np.uint8
        corners = cv2.goodFeaturesToTrack(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 1000, 0.01, 5)
        assert corners is not None and len(corners) > 150, "too little texture for feature extraction"
    assert all(np.isfinite(d).all() and d.min() > 0.3 for d in depths)
    # Rendering (scene already cached) is vectorised: well under a second per frame even on a busy CPU.
    assert elapsed < 20.0


def test_trajectory_moves_turns_and_stays_in_free_space(scene):
    T_base_cam = base_to_camera()
    # The camera looks forward and 12 degrees down from the base.
    forward = T_base_cam[:3, :3] @ np.array([0, 0, 1.0])
    np.testing.assert_allclose(forward, [math.cos(math.radians(12)), 0, -math.sin(math.radians(12))], atol=1e-12)
    poses = [base_pose_at(t) @ T_base_cam for t in np.linspace(0, 20, 201)]
    assert all(scene.inside_free_space(T[:3, 3], margin=0.2) for T in poses)
    centres = np.array([T[:3, 3] for T in poses])
    assert np.ptp(centres[:, 0]) > 2.5 and np.ptp(centres[:, 1]) > 1.5  # a loop through the room
    np.testing.assert_allclose(poses[0], poses[-1], atol=1e-9)  # one period closes the loop


def test_write_demo_bag_returns_the_truth_it_wrote(tmp_path):
    from rosbags.highlevel import AnyReader

    gt = write_demo_bag(tmp_path / "demo", n_frames=5, storage="mcap")
    assert len(gt.images) == len(gt.stamps_ns) == len(gt.T_world_cam) == 5
    for Tb, Tc in zip(gt.T_map_base, gt.T_world_cam):
        np.testing.assert_allclose(Tb @ gt.T_base_cam, Tc, atol=1e-12)
    with AnyReader([tmp_path / "demo"]) as reader:
        topics = reader.topics
        assert topics["/camera/image_raw"].msgcount == 5
        assert topics["/camera/camera_info"].msgcount == 5
        assert topics["/tf_static"].msgcount == 1
        # 100 Hz from the start of the recording until just past the last image.
        span_s = (gt.stamps_ns[-1] - START_NS) / 1e9
        assert 100 * span_s < topics["/tf"].msgcount < 100 * span_s + 5
        conns = [c for c in reader.connections if c.topic == "/camera/image_raw"]
        for i, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
            msg = reader.deserialize(raw, conn.msgtype)
            assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == gt.stamps_ns[i]
            assert np.array_equal(np.asarray(msg.data).reshape(240, 320, 3), gt.images[i])
    with pytest.raises(ValueError, match="exists"):
        write_demo_bag(tmp_path / "demo", n_frames=2)
