"""The odometry gate: locks on agreeing frames, rejects implausible jumps, re-locks when frames keep agreeing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2s_nerf_ros.geometry import make_pose, matrix_from_rotvec, pose_error
from d2s_nerf_ros.pose_gate import OdometryGate

T_MAP_ODOM = make_pose(matrix_from_rotvec([0.0, 0.0, math.radians(30)]), [2.0, -1.0, 0.0])


def odom_cam(x: float) -> np.ndarray:
    """The camera in odom after driving ``x`` metres along odom's x axis."""
    return make_pose(np.eye(3), [x, 0.0, 0.5])


def measured(x: float, T_map_odom: np.ndarray = T_MAP_ODOM) -> np.ndarray:
    return T_map_odom @ odom_cam(x)


def test_needs_agreeing_frames_before_the_first_pose():
    gate = OdometryGate(0.5, 10.0, min_consistent_frames=3)
    for i, expected in enumerate([False, False, True]):
        decision = gate.check(measured(0.1 * i), odom_cam(0.1 * i))
        assert decision.accepted is expected, decision
    assert "waiting for 3 agreeing frames" in OdometryGate(0.5, 10.0, 3).check(measured(0.0), odom_cam(0.0)).reason
    assert gate.locked and pose_error(gate.T_map_odom, T_MAP_ODOM)[0] < 1e-9


def test_a_disagreeing_frame_restarts_the_count():
    gate = OdometryGate(0.5, 10.0, min_consistent_frames=2)
    assert not gate.check(measured(0.0), odom_cam(0.0)).accepted
    wrong = make_pose(np.eye(3), [5.0, 5.0, 0.0]) @ measured(0.1)   # another room, 7 m away
    assert not gate.check(wrong, odom_cam(0.1)).accepted
    assert not gate.check(measured(0.2), odom_cam(0.2)).accepted     # agrees with the first, not with the wrong one
    assert gate.check(measured(0.3), odom_cam(0.3)).accepted


def test_rejects_a_jump_against_odometry_and_keeps_the_estimate():
    gate = OdometryGate(0.5, 10.0, min_consistent_frames=2)
    gate.check(measured(0.0), odom_cam(0.0))
    assert gate.check(measured(0.1), odom_cam(0.1)).accepted
    jumped = make_pose(np.eye(3), [1.0, 0.0, 0.0]) @ measured(0.2)   # 1 m off what odometry predicts
    decision = gate.check(jumped, odom_cam(0.2))
    assert not decision.accepted and decision.reason.startswith("implausible jump against odometry: 1.00 m")
    assert pose_error(gate.T_map_odom, T_MAP_ODOM)[0] < 1e-9
    turned = make_pose(matrix_from_rotvec([0.0, 0.0, math.radians(25)]), [0.0, 0.0, 0.0])
    assert not gate.check(measured(0.3) @ turned, odom_cam(0.3)).accepted  # a 25 degree jump
    assert gate.check(measured(0.4), odom_cam(0.4)).accepted               # small drift: accepted


def test_relocks_when_frames_keep_agreeing_with_each_other():
    """Wrong first lock, or a kidnapped robot: the gate must not stay stuck on the old estimate."""
    gate = OdometryGate(0.5, 10.0, min_consistent_frames=2)
    gate.check(measured(0.0), odom_cam(0.0))
    gate.check(measured(0.0), odom_cam(0.0))
    moved = make_pose(np.eye(3), [3.0, 0.0, 0.0]) @ T_MAP_ODOM
    assert not gate.check(measured(0.1, moved), odom_cam(0.1)).accepted
    decision = gate.check(measured(0.2, moved), odom_cam(0.2))
    assert decision.accepted and decision.reason.startswith("re-locked")
    assert pose_error(gate.T_map_odom, moved)[0] < 1e-9
    gate.reset()
    assert not gate.locked and not gate.check(measured(0.3, moved), odom_cam(0.3)).accepted


def test_one_frame_is_a_pass_through_and_bad_limits_are_refused():
    gate = OdometryGate(0.5, 10.0, min_consistent_frames=1)
    assert gate.check(measured(0.0), odom_cam(0.0)).accepted
    with pytest.raises(ValueError):
        OdometryGate(0.0, 10.0, 2)
    with pytest.raises(ValueError):
        OdometryGate(0.5, 10.0, 0)
