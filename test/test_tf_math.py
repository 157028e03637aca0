"""Pose/message conversions, REP-105 composition, covariance transport and the TF buffer, on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, Transform

from d2s_nerf_ros.geometry import invert_pose, make_pose, matrix_from_rotvec
from d2s_nerf_ros.tf_math import (
    TransformBuffer,
    TransformLookupError,
    covariance_of_offset_pose,
    covariance_to_msg_list,
    map_to_odom,
    ns_to_stamp_fields,
    pose_from_msg,
    pose_to_msg_fields,
    quat_xyzw_from_matrix,
    stamp_to_ns,
    transform_from_msg,
    transform_to_msg_fields,
)

S = math.sqrt(0.5)


def rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_quaternion_is_ros_order_xyzw():
    np.testing.assert_allclose(quat_xyzw_from_matrix(rot_z(90)), (0, 0, S, S), atol=1e-12)
    # 180 deg about x: q = (1, 0, 0, 0) in x y z w.
    np.testing.assert_allclose(quat_xyzw_from_matrix(np.diag([1.0, -1.0, -1.0])), (1, 0, 0, 0), atol=1e-12)


def test_pose_and_transform_fields_round_trip():
    T = make_pose(rot_z(90), [1.0, 2.0, 3.0])
    msg = pose_to_msg_fields(T, Pose())
    assert (msg.position.x, msg.position.y, msg.position.z) == (1.0, 2.0, 3.0)
    np.testing.assert_allclose((msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w), (0, 0, S, S), atol=1e-12)
    np.testing.assert_allclose(pose_from_msg(msg), T, atol=1e-12)
    tmsg = transform_to_msg_fields(T, Transform())
    assert tmsg.translation.y == 2.0
    np.testing.assert_allclose(transform_from_msg(tmsg), T, atol=1e-12)


def test_bad_message_values_are_rejected():
    msg = Pose()
    msg.orientation.w = 0.0
    with pytest.raises(ValueError, match="zero quaternion"):
        pose_from_msg(msg)
    msg.orientation.w = 1.0
    msg.position.x = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        pose_from_msg(msg)
    with pytest.raises(ValueError, match="finite 4x4"):
        pose_to_msg_fields(np.full((4, 4), np.nan), Pose())


def test_map_to_odom_hand_computed():
    # Camera at (1, 0, 0) in map, yawed 90 deg; the same camera at (0, 2, 0) in odom, not rotated.
    T_map_cam = make_pose(rot_z(90), [1, 0, 0])
    T_odom_cam = make_pose(np.eye(3), [0, 2, 0])
    # map->odom = T_map_cam inv(T_odom_cam) = [Rz90 | Rz90 (0,-2,0) + (1,0,0)] = [Rz90 | (3, 0, 0)].
    T_map_odom = map_to_odom(T_map_cam, T_odom_cam)
    np.testing.assert_allclose(T_map_odom, make_pose(rot_z(90), [3, 0, 0]), atol=1e-12)
    np.testing.assert_allclose(T_map_odom @ T_odom_cam, T_map_cam, atol=1e-12)


def test_stamp_conversions():
    assert stamp_to_ns(Time(sec=3, nanosec=250_000_000)) == 3_250_000_000
    t = ns_to_stamp_fields(3_250_000_000 + 100_000_000, Time())
    assert (t.sec, t.nanosec) == (3, 350_000_000)
    with pytest.raises(ValueError, match="negative"):
        ns_to_stamp_fields(-1, Time())


def test_covariance_of_offset_pose_hand_computed():
    # Only yaw is uncertain (variance v). Frame b sits 1 m along x of frame a (= world axes):
    # a yaw of d moves b's origin by d along y, so var(y) = v and cov(y, rz) = v.
    v = 0.01
    C = np.zeros((6, 6))
    C[5, 5] = v
    out = covariance_of_offset_pose(C, np.eye(4), make_pose(np.eye(3), [1, 0, 0]))
    expected = np.zeros((6, 6))
    expected[1, 1] = expected[1, 5] = expected[5, 1] = expected[5, 5] = v
    np.testing.assert_allclose(out, expected, atol=1e-15)
    # The lever arm is expressed in the world: with a rotated 90 deg, b is 1 m along world y,
    # and a yaw moves it along -x.
    out = covariance_of_offset_pose(C, make_pose(rot_z(90), [5, 5, 0]), make_pose(np.eye(3), [1, 0, 0]))
    assert out[0, 0] == pytest.approx(v) and out[0, 5] == pytest.approx(-v) and out[1, 1] == pytest.approx(0, abs=1e-15)


def test_covariance_of_offset_pose_matches_sampling():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6)) * 1e-3
    C = A @ A.T
    T_world_a = make_pose(matrix_from_rotvec([0.3, -0.2, 1.0]), [1, 2, 3])
    T_a_b = make_pose(matrix_from_rotvec([0.1, 0.5, 0.0]), [0.4, -0.3, 0.8])
    samples = []
    L = np.linalg.cholesky(C)
    for _ in range(20000):
        d = L @ rng.normal(size=6)
        T = make_pose(matrix_from_rotvec(d[3:]) @ T_world_a[:3, :3], T_world_a[:3, 3] + d[:3])  # exp(dphi) T, dp
        Tb = T @ T_a_b
        Tb0 = T_world_a @ T_a_b
        dphi_b = d[3:]  # rotation perturbation of b equals that of a (left perturbation)
        samples.append(np.concatenate([Tb[:3, 3] - Tb0[:3, 3], dphi_b]))
    empirical = np.cov(np.array(samples).T)
    predicted = covariance_of_offset_pose(C, T_world_a, T_a_b)
    np.testing.assert_allclose(predicted, empirical, atol=0.05 * np.abs(predicted).max())


def test_covariance_to_msg_list_is_row_major():
    C = np.arange(36, dtype=float).reshape(6, 6)
    assert covariance_to_msg_list(C)[:7] == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="6x6"):
        covariance_to_msg_list(np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        covariance_to_msg_list(np.full((6, 6), np.inf))


def build_odom_buffer() -> TransformBuffer:
    buf = TransformBuffer(cache_s=10.0)
    # odom -> base_link: moves from x=0 (t=1 s, yaw 0) to x=2 (t=2 s, yaw 90).
    buf.set_transform("odom", "base_link", 1_000_000_000, make_pose(np.eye(3), [0, 0, 0]))
    buf.set_transform("odom", "base_link", 2_000_000_000, make_pose(rot_z(90), [2, 0, 0]))
    # base_link -> camera: static, 1 m up, no rotation.
    buf.set_transform("base_link", "camera", 0, make_pose(np.eye(3), [0, 0, 1]), static=True)
    return buf


def test_buffer_interpolates_and_chains():
    buf = build_odom_buffer()
    T = buf.lookup("odom", "camera", 1_500_000_000)
    # Half way: x = 1, yaw 45 deg; the camera is 1 m above base_link (z is unaffected by yaw).
    np.testing.assert_allclose(T, make_pose(rot_z(45), [1, 0, 1]), atol=1e-12)
    # Exact samples and the latest (stamp 0).
    np.testing.assert_allclose(buf.lookup("odom", "camera", 2_000_000_000), make_pose(rot_z(90), [2, 0, 1]), atol=1e-12)
    np.testing.assert_allclose(buf.lookup("odom", "camera", 0), make_pose(rot_z(90), [2, 0, 1]), atol=1e-12)
    # The other direction is the inverse.
    np.testing.assert_allclose(buf.lookup("camera", "odom", 1_500_000_000), invert_pose(T), atol=1e-12)
    # Between two children of the same parent.
    buf.set_transform("base_link", "lidar", 0, make_pose(np.eye(3), [0.5, 0, 0]), static=True)
    np.testing.assert_allclose(buf.lookup("camera", "lidar", 1_000_000_000), make_pose(np.eye(3), [0.5, 0, -1]), atol=1e-12)
    assert buf.lookup("camera", "camera", 123).tolist() == np.eye(4).tolist()


def test_buffer_errors_are_specific():
    buf = build_odom_buffer()
    with pytest.raises(TransformLookupError, match="extrapolation"):
        buf.lookup("odom", "camera", 2_500_000_000)
    with pytest.raises(TransformLookupError, match="'nowhere' is not in the TF data"):
        buf.lookup("odom", "nowhere", 1_500_000_000)
    buf.set_transform("map2", "island", 0, np.eye(4), static=True)
    with pytest.raises(TransformLookupError, match="not connected"):
        buf.lookup("odom", "island", 1_500_000_000)
    with pytest.raises(ValueError, match="two different non-empty frames"):
        buf.set_transform("odom", "odom", 0, np.eye(4))


def test_buffer_forgets_old_samples_and_strips_slashes():
    buf = TransformBuffer(cache_s=10.0)
    for s in range(0, 21):
        buf.set_transform("/odom", "/base", s * 1_000_000_000, make_pose(np.eye(3), [s, 0, 0]))
    with pytest.raises(TransformLookupError, match="extrapolation"):
        buf.lookup("odom", "base", 5_000_000_000)  # older than 20 s - 10 s
    np.testing.assert_allclose(buf.lookup("odom", "base", 15_500_000_000)[:3, 3], [15.5, 0, 0])
    assert buf.frames() == {"odom", "base"}


def test_edges_above_the_common_ancestor_do_not_matter():
    # The node hears its own map -> odom on /tf; that edge has no data at the stamp asked,
    # which must not break odom -> camera (tf2 behaves the same way).
    buf = build_odom_buffer()
    buf.set_transform("map", "odom", 9_000_000_000, np.eye(4))
    np.testing.assert_allclose(buf.lookup("odom", "camera", 1_500_000_000), make_pose(rot_z(45), [1, 0, 1]), atol=1e-12)
    with pytest.raises(TransformLookupError, match="map -> odom"):
        buf.lookup("map", "camera", 1_500_000_000)
