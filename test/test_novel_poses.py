"""Slerp / pose interpolation properties and the novel poses between mapping frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import (
    interpolate_pose,
    make_pose,
    matrix_from_quat_wxyz,
    matrix_from_rotvec,
    quat_wxyz_from_matrix,
    rotation_angle_deg,
    slerp,
)
from offline.sources.frames import Frame
from offline.synthesis.novel_poses import NovelPoseConfig, neighbour_pairs, novel_poses

CAM = CameraIntrinsics(64, 48, 50.0, 50.0, 31.5, 23.5)


def random_quat(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def quat_angle_deg(q0: np.ndarray, q1: np.ndarray) -> float:
    """Rotation angle between two unit quaternions (independent of the geometry module).

    |q0 - q1| = 2 sin(angle / 4) on the short arc; unlike arccos of the dot product this stays
    accurate for tiny angles.
    """
    q1 = q1 if np.dot(q0, q1) >= 0 else -q1
    return float(np.degrees(4.0 * np.arcsin(min(np.linalg.norm(q0 - q1) / 2.0, 1.0))))


def frame(name: str, R: np.ndarray, t) -> Frame:
    return Frame(name=name, image_path=Path(f"/nonexistent/{name}.png"), T_world_cam=make_pose(R, t), camera=CAM)


def test_slerp_is_unit_norm_and_hits_the_endpoints():
    rng = np.random.default_rng(1)
    for _ in range(50):
        q0, q1 = random_quat(rng), random_quat(rng)
        for s in rng.random(5):
            assert abs(np.linalg.norm(slerp(q0, q1, s)) - 1.0) < 1e-12
        # Unnormalised inputs still give unit outputs (the paper's scripts fail this).
        assert abs(np.linalg.norm(slerp(3.0 * q0, 0.2 * q1, 0.3)) - 1.0) < 1e-12
        assert quat_angle_deg(slerp(q0, q1, 0.0), q0) < 1e-6
        assert quat_angle_deg(slerp(q0, q1, 1.0), q1) < 1e-6


def test_slerp_has_constant_angular_speed():
    rng = np.random.default_rng(2)
    for _ in range(20):
        q0, q1 = random_quat(rng), random_quat(rng)
        total = quat_angle_deg(q0, q1)
        s = np.linspace(0.0, 1.0, 11)
        qs = [slerp(q0, q1, v) for v in s]
        steps = [quat_angle_deg(a, b) for a, b in zip(qs[:-1], qs[1:])]
        np.testing.assert_allclose(steps, total / 10.0, atol=1e-6)
        # and the angle travelled from q0 grows linearly in s
        np.testing.assert_allclose([quat_angle_deg(q0, q) for q in qs], s * total, atol=1e-6)


def test_slerp_takes_the_shortest_arc_for_q_and_minus_q():
    # 170 degrees about z: the short way is 170 degrees, the long way 190.
    q0 = np.array([1.0, 0.0, 0.0, 0.0])
    a = np.radians(170.0)
    q1 = np.array([np.cos(a / 2), 0.0, 0.0, np.sin(a / 2)])
    for target in (q1, -q1):  # -q1 is the same rotation; the path must not change
        mid = slerp(q0, target, 0.5)
        assert quat_angle_deg(mid, q0) == pytest.approx(85.0, abs=1e-6)
        R = matrix_from_quat_wxyz(mid)
        expected = matrix_from_rotvec([0.0, 0.0, np.radians(85.0)])
        np.testing.assert_allclose(R, expected, atol=1e-12)
    # A rotation of 200 degrees one way is 160 the other way: slerp must take the 160.
    b = np.radians(200.0)
    q2 = np.array([np.cos(b / 2), 0.0, 0.0, np.sin(b / 2)])
    assert quat_angle_deg(slerp(q0, q2, 0.5), q0) == pytest.approx(80.0, abs=1e-6)


def test_interpolate_pose_is_on_the_segment():
    rng = np.random.default_rng(3)
    for _ in range(20):
        Ta = make_pose(matrix_from_quat_wxyz(random_quat(rng)), rng.normal(size=3))
        Tb = make_pose(matrix_from_quat_wxyz(random_quat(rng)), rng.normal(size=3))
        total = rotation_angle_deg(Ta[:3, :3].T @ Tb[:3, :3])
        for s in (0.1, 0.37, 0.5, 0.9):
            T = interpolate_pose(Ta, Tb, s)
            np.testing.assert_allclose(T[:3, 3], (1 - s) * Ta[:3, 3] + s * Tb[:3, 3], atol=1e-12)
            np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-12)
            assert rotation_angle_deg(Ta[:3, :3].T @ T[:3, :3]) == pytest.approx(s * total, abs=1e-5)


def test_neighbour_pairs_hand_computed():
    # Frames on a line at x = 0, 1, 2.5, 4.5: with k = 1 the nearest of each is
    # 0->1, 1->0, 2->1, 3->2, giving the unordered pairs (0,1), (1,2), (2,3).
    pos = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.5, 0, 0], [4.5, 0, 0]])
    assert neighbour_pairs(pos, 1) == [(0, 1), (1, 2), (2, 3)]
    # k = 2 adds 0->2 and 3->1, and 2->0 (0 is at 2.5, 3 at 2.0: 2's two nearest are 1 and 3).
    assert neighbour_pairs(pos, 2) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]


def test_novel_poses_exact_on_segments_and_deduplicated():
    rng = np.random.default_rng(4)
    frames = [frame(f"f{i}", matrix_from_quat_wxyz(random_quat(rng)), rng.normal(size=3)) for i in range(7)]
    cfg = NovelPoseConfig(k_neighbours=2, samples_per_pair=10)
    poses = novel_poses(frames, cfg)
    by_name = {f.name: f for f in frames}
    pairs = neighbour_pairs(np.stack([f.T_world_cam[:3, 3] for f in frames]), 2)
    # Every unordered pair once (a-b and b-a are not rendered twice), 10 poses each.
    seen_pairs = {(p.frame_a, p.frame_b) for p in poses}
    assert seen_pairs == {(frames[i].name, frames[j].name) for i, j in pairs}
    assert len(poses) == 10 * len(pairs)
    assert sorted({round(p.s, 12) for p in poses}) == [round(k / 11, 12) for k in range(1, 11)]
    for p in poses:
        Ta, Tb = by_name[p.frame_a].T_world_cam, by_name[p.frame_b].T_world_cam
        assert 0.0 < p.s < 1.0
        np.testing.assert_allclose(p.T_world_cam[:3, 3], (1 - p.s) * Ta[:3, 3] + p.s * Tb[:3, 3], atol=1e-12)
        qa, qb = quat_wxyz_from_matrix(Ta[:3, :3]), quat_wxyz_from_matrix(Tb[:3, :3])
        q = quat_wxyz_from_matrix(p.T_world_cam[:3, :3])
        assert quat_angle_deg(qa, q) == pytest.approx(p.s * quat_angle_deg(qa, qb), abs=1e-5)
        assert p.reference_frame == (p.frame_a if p.s <= 0.5 else p.frame_b)
    # No two poses coincide.
    positions = np.stack([p.T_world_cam[:3, 3] for p in poses])
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1) + np.eye(len(poses))
    assert d.min() > 1e-6


def test_novel_poses_drops_coincident_poses():
    R = np.eye(3)
    # f0 and f1 coincide: their segment is one pose repeated, kept once; f2 is 1 m away.
    frames = [frame("f0", R, [0, 0, 0]), frame("f1", R, [0, 0, 0]), frame("f2", R, [1, 0, 0])]
    poses = novel_poses(frames, NovelPoseConfig(k_neighbours=1, samples_per_pair=4))
    on_f0_f1 = [p for p in poses if {p.frame_a, p.frame_b} == {"f0", "f1"}]
    assert len(on_f0_f1) == 1
    # f2's nearest is f0 (first on the tie): 4 poses at x = 0.2 .. 0.8
    xs = sorted(p.T_world_cam[0, 3] for p in poses if "f2" in (p.frame_a, p.frame_b))
    np.testing.assert_allclose(xs, [0.2, 0.4, 0.6, 0.8], atol=1e-12)


def test_include_endpoints_and_bad_config():
    assert NovelPoseConfig(samples_per_pair=3, include_endpoints=True).s_values().tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="k_neighbours"):
        NovelPoseConfig(k_neighbours=0)
    with pytest.raises(ValueError, match="samples_per_pair"):
        NovelPoseConfig(samples_per_pair=0)
    R = np.eye(3)
    with pytest.raises(ValueError, match="unique"):
        novel_poses([frame("a", R, [0, 0, 0]), frame("a", R, [1, 0, 0])])
