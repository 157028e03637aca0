"""The TF buffer in recording mode (as the bag source uses it: every sample, strict tree,
tolerances) against hand-computed chains. Live mode is tested in test_tf_math.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2s_nerf_ros.tf_math import TransformBuffer, TransformLookupError

S = 1_000_000_000  # ns per second


def recording() -> TransformBuffer:
    return TransformBuffer(cache_s=None, strict=True)


def rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def pose(R=np.eye(3), t=(0, 0, 0)) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def apply(T: np.ndarray, p) -> np.ndarray:
    return T[:3, :3] @ np.asarray(p, float) + T[:3, 3]


@pytest.fixture()
def tree() -> TransformBuffer:
    """map -(static: +1 x)-> a -(static: yaw 90)-> b ; map -(static: +2 y)-> c"""
    buf = recording()
    buf.set_transform("map", "a", 0, pose(t=(1, 0, 0)), static=True)
    buf.set_transform("a", "b", 0, pose(rot_z(90)), static=True)
    buf.set_transform("map", "c", 0, pose(t=(0, 2, 0)), static=True)
    return buf


def test_static_chain_down_and_up(tree):
    T_map_b = tree.lookup("map", "b", 0)
    # b's x axis is a's y axis (yaw 90), then shifted by +1 x: (1,0,0)_b -> (0,1,0)_a -> (1,1,0)_map.
    np.testing.assert_allclose(apply(T_map_b, [1, 0, 0]), [1, 1, 0], atol=1e-12)
    T_b_map = tree.lookup("b", "map", 123 * S)  # static: any stamp
    np.testing.assert_allclose(apply(T_b_map, [1, 1, 0]), [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(T_b_map @ T_map_b, np.eye(4), atol=1e-12)


def test_chain_through_a_common_parent(tree):
    # c is at (0,2,0) in map; b's origin is at (1,0,0) in map, b axes yawed 90.
    T_c_b = tree.lookup("c", "b", 0)
    np.testing.assert_allclose(apply(T_c_b, [0, 0, 0]), [1, -2, 0], atol=1e-12)
    np.testing.assert_allclose(apply(T_c_b, [1, 0, 0]), [1, -1, 0], atol=1e-12)
    assert tree.path("c", "b") == ["c", "map", "a", "b"]
    np.testing.assert_allclose(tree.lookup("b", "b", 0), np.eye(4))


def test_dynamic_edge_is_interpolated_linearly_and_by_slerp():
    buf = recording()
    # Added out of order on purpose.
    buf.set_transform("odom", "base", 10 * S, pose(rot_z(90), (2, 0, 0)))
    buf.set_transform("odom", "base", 0, pose(np.eye(3), (0, 0, 0)))
    buf.set_transform("base", "cam", 0, pose(t=(0, 0, 1)), static=True)
    T = buf.lookup("odom", "base", int(2.5 * S), tolerance_ns=10 * S)
    np.testing.assert_allclose(T[:3, 3], [0.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(T[:3, :3], rot_z(22.5), atol=1e-12)
    # The static camera rides on top: its origin is 1 m above the base.
    T_cam = buf.lookup("odom", "cam", int(7.5 * S), tolerance_ns=10 * S)
    np.testing.assert_allclose(T_cam[:3, 3], [1.5, 0, 1], atol=1e-12)
    np.testing.assert_allclose(T_cam[:3, :3], rot_z(67.5), atol=1e-12)
    # An exact sample is returned as recorded.
    np.testing.assert_allclose(buf.lookup("odom", "base", 10 * S), pose(rot_z(90), (2, 0, 0)), atol=1e-12)


def test_slerp_takes_the_short_way_across_180():
    buf = recording()
    buf.set_transform("w", "r", 0, pose(rot_z(170)))
    buf.set_transform("w", "r", 2 * S, pose(rot_z(-170)))
    T = buf.lookup("w", "r", 1 * S, tolerance_ns=2 * S)
    np.testing.assert_allclose(T[:3, :3], rot_z(180), atol=1e-12)


def test_tolerance_at_the_ends_and_in_gaps():
    buf = recording()
    for k in range(5):
        buf.set_transform("map", "base", k * S // 10, pose(t=(k, 0, 0)))  # 10 Hz, 0 .. 0.4 s
    buf.set_transform("map", "base", 2 * S, pose(t=(20, 0, 0)))  # then a 1.6 s gap
    tol = 60_000_000  # 60 ms
    # Just past the last 10 Hz sample but inside the tolerance? No: 0.45 s has samples at
    # 0.4 s (50 ms away) and 2.0 s (1.55 s away): the gap is too wide to interpolate.
    with pytest.raises(TransformLookupError) as err:
        buf.lookup("map", "base", 450_000_000, tol)
    assert err.value.kind == "out_of_range" and "gap" in str(err.value)
    # Before the first sample: within tolerance gives the first sample, beyond it an error.
    np.testing.assert_allclose(buf.lookup("map", "base", -50_000_000, tol)[:3, 3], [0, 0, 0])
    with pytest.raises(TransformLookupError) as err:
        buf.lookup("map", "base", -100_000_000, tol)
    assert err.value.kind == "out_of_range" and "outside" in str(err.value)
    assert not buf.can_lookup("map", "base", 3 * S, tol)
    assert buf.can_lookup("map", "base", 2 * S + 10_000_000, tol)


def test_unknown_frame_and_separate_trees(tree):
    with pytest.raises(TransformLookupError) as err:
        tree.lookup("map", "camera", 0)
    assert err.value.kind == "unknown_frame"
    assert "'camera'" in str(err.value) and "a, b, c, map" in str(err.value)
    tree.set_transform("odom", "base", 0, pose(), static=True)
    with pytest.raises(TransformLookupError) as err:
        tree.lookup("map", "base", 0)
    assert err.value.kind == "no_path" and "separate TF trees" in str(err.value)


def test_bad_entries_are_refused():
    buf = recording()
    buf.set_transform("map", "a", 0, pose(), static=True)
    with pytest.raises(ValueError, match="two parents"):
        buf.set_transform("odom", "a", 0, pose(), static=True)
    with pytest.raises(ValueError, match="both as static"):
        buf.set_transform("map", "a", 0, pose())
    with pytest.raises(ValueError, match="rotation"):
        buf.set_transform("map", "s", 0, np.diag([2.0, 1.0, 1.0, 1.0]), static=True)
    with pytest.raises(ValueError, match="itself"):
        buf.set_transform("x", "x", 0, pose(), static=True)


def test_live_mode_lets_a_new_parent_replace_the_old_one():
    # tf2 semantics on a robot (the node's fallback buffer): the latest parent wins, no error.
    buf = TransformBuffer(cache_s=10.0)
    buf.set_transform("map", "a", 0, pose(t=(1, 0, 0)), static=True)
    buf.set_transform("odom", "a", 0, pose(t=(0, 3, 0)), static=True)
    assert buf.path("odom", "a") == ["odom", "a"]
    np.testing.assert_allclose(buf.lookup("odom", "a", 0)[:3, 3], [0, 3, 0])
