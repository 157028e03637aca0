"""The offline TF buffer against hand-computed chains."""

from __future__ import annotations

import math

import numpy as np
import pytest

from offline.sources.tf_buffer import TFBuffer, TransformLookupError

S = 1_000_000_000  # ns per second


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
def tree() -> TFBuffer:
    """map -(static: +1 x)-> a -(static: yaw 90)-> b ; map -(static: +2 y)-> c"""
    buf = TFBuffer()
    buf.add_static("map", "a", pose(t=(1, 0, 0)))
    buf.add_static("a", "b", pose(rot_z(90)))
    buf.add_static("map", "c", pose(t=(0, 2, 0)))
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
    buf = TFBuffer()
    # Added out of order on purpose.
    buf.add_dynamic("odom", "base", 10 * S, pose(rot_z(90), (2, 0, 0)))
    buf.add_dynamic("odom", "base", 0, pose(np.eye(3), (0, 0, 0)))
    buf.add_static("base", "cam", pose(t=(0, 0, 1)))
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
    buf = TFBuffer()
    buf.add_dynamic("w", "r", 0, pose(rot_z(170)))
    buf.add_dynamic("w", "r", 2 * S, pose(rot_z(-170)))
    T = buf.lookup("w", "r", 1 * S, tolerance_ns=2 * S)
    np.testing.assert_allclose(T[:3, :3], rot_z(180), atol=1e-12)


def test_tolerance_at_the_ends_and_in_gaps():
    buf = TFBuffer()
    for k in range(5):
        buf.add_dynamic("map", "base", k * S // 10, pose(t=(k, 0, 0)))  # 10 Hz, 0 .. 0.4 s
    buf.add_dynamic("map", "base", 2 * S, pose(t=(20, 0, 0)))  # then a 1.6 s gap
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
    tree.add_static("odom", "base", pose())
    with pytest.raises(TransformLookupError) as err:
        tree.lookup("map", "base", 0)
    assert err.value.kind == "no_path" and "separate TF trees" in str(err.value)


def test_bad_entries_are_refused():
    buf = TFBuffer()
    buf.add_static("map", "a", pose())
    with pytest.raises(ValueError, match="two parents"):
        buf.add_static("odom", "a", pose())
    with pytest.raises(ValueError, match="both as static"):
        buf.add_dynamic("map", "a", 0, pose())
    with pytest.raises(ValueError, match="rotation"):
        buf.add_static("map", "s", np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="itself"):
        buf.add_static("x", "x", pose())
