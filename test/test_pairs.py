"""Covisible pair selection on synthetic camera layouts with hand-derived answers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.pairs import PairsConfig, select_pairs, view_overlap
from offline.sources.frames import Frame

CAM = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0)


def look_at(centre: np.ndarray, target: np.ndarray, up=(0.0, -1.0, 0.0)) -> np.ndarray:
    """Camera-to-world pose of an OpenCV camera at ``centre`` looking at ``target``."""
    z = np.asarray(target, float) - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, up)  # with up = -y (OpenCV y points down) x comes out pointing right
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], axis=1)
    T[:3, 3] = centre
    return T


def circle_frames(n: int = 12, radius: float = 2.0) -> list[Frame]:
    """n cameras on a horizontal circle, all looking at its centre: neighbours are 360/n degrees apart."""
    frames = []
    for i in range(n):
        a = 2 * np.pi * i / n
        centre = np.array([radius * np.cos(a), 0.0, radius * np.sin(a)])
        frames.append(Frame(f"cam-{i:02d}", None, look_at(centre, np.zeros(3)), CAM))
    return frames


def ring_pairs(n: int, hops: int) -> set[frozenset[str]]:
    return {frozenset((f"cam-{i:02d}", f"cam-{(i + h) % n:02d}")) for i in range(n) for h in range(1, hops + 1)}


def test_look_at_is_a_valid_opencv_pose() -> None:
    T = look_at(np.array([2.0, 0, 0]), np.zeros(3))
    R = T[:3, :3]
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(R[:, 2], [-1, 0, 0])  # optical axis towards the origin


@pytest.mark.parametrize("max_angle, hops", [(45.0, 1), (75.0, 2), (100.0, 3)])
def test_circle_angle_limit(max_angle: float, hops: int) -> None:
    # 12 cameras 30 degrees apart: the angle limit alone decides which ring neighbours pair.
    frames = circle_frames(12)
    pairs = select_pairs(frames, PairsConfig(num_neighbours=11, max_angle_deg=max_angle, min_overlap=0.0))
    assert {frozenset(p) for p in pairs} == ring_pairs(12, hops)
    assert len(pairs) == 12 * hops


def test_circle_nearest_neighbours() -> None:
    frames = circle_frames(12)
    pairs = select_pairs(frames, PairsConfig(num_neighbours=2, max_angle_deg=180.0, min_overlap=0.0))
    # Each camera's two nearest are its ring neighbours; the union is the ring itself.
    assert {frozenset(p) for p in pairs} == ring_pairs(12, 1)


def test_no_self_no_duplicates_ordered_and_deterministic() -> None:
    frames = circle_frames(16, radius=3.0)
    config = PairsConfig(num_neighbours=4, max_angle_deg=80.0, scene_depth_m=3.0)
    pairs = select_pairs(frames, config)
    assert pairs, "expected some pairs"
    order = {f.name: i for i, f in enumerate(frames)}
    assert all(a != b for a, b in pairs)
    assert all(order[a] < order[b] for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == len(pairs)
    assert pairs == sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))
    assert select_pairs(frames, config) == pairs
    # The same unordered pairs whatever the input order.
    shuffled = frames[:]
    random.Random(3).shuffle(shuffled)
    assert {frozenset(p) for p in select_pairs(shuffled, config)} == {frozenset(p) for p in pairs}


def test_max_distance() -> None:
    frames = circle_frames(12, radius=2.0)
    # Neighbours are 2*2*sin(15 deg) = 1.035 m apart, second neighbours 2 m.
    pairs = select_pairs(frames, PairsConfig(num_neighbours=11, max_angle_deg=180.0, min_overlap=0.0,
                                             max_distance_m=1.5))
    assert {frozenset(p) for p in pairs} == ring_pairs(12, 1)


def test_overlap_rejects_parallel_cameras_far_apart() -> None:
    # Same viewing direction (angle 0) but 10 m apart sideways: frusta do not overlap at 2 m.
    T0 = np.eye(4)
    T1 = np.eye(4)
    T1[0, 3] = 10.0
    T2 = np.eye(4)
    T2[0, 3] = 0.2
    frames = [Frame("a", None, T0, CAM), Frame("b", None, T1, CAM), Frame("c", None, T2, CAM)]
    assert view_overlap(frames[0], frames[1]) == 0.0
    # 0.2 m sideways at 2 m depth shifts the image by 525*0.2/2 = 52.5 px: the 7x7 grid loses one column.
    assert view_overlap(frames[0], frames[2]) == pytest.approx(6 / 7)
    pairs = select_pairs(frames, PairsConfig(num_neighbours=5, min_overlap=0.1))
    assert pairs == [("a", "c")]
    pairs = select_pairs(frames, PairsConfig(num_neighbours=5, min_overlap=0.0))
    assert pairs == [("a", "b"), ("a", "c"), ("b", "c")]


def test_facing_away_cameras_do_not_pair() -> None:
    # Back to back: angle 180, and nothing in front of one is in front of the other.
    T0 = np.eye(4)
    T1 = np.eye(4)
    T1[:3, :3] = np.diag([-1.0, 1.0, -1.0])
    frames = [Frame("front", None, T0, CAM), Frame("back", None, T1, CAM)]
    assert view_overlap(frames[0], frames[1]) == 0.0
    assert select_pairs(frames, PairsConfig(max_angle_deg=180.0, min_overlap=0.05)) == []


def test_edge_cases_and_bad_config() -> None:
    assert select_pairs([], PairsConfig()) == []
    assert select_pairs(circle_frames(1), PairsConfig()) == []
    frames = circle_frames(3)
    with pytest.raises(ValueError, match="unique"):
        select_pairs(frames + [frames[0]], PairsConfig())
    with pytest.raises(ValueError, match="num_neighbours"):
        select_pairs(frames, PairsConfig(num_neighbours=0))
    with pytest.raises(ValueError, match="max_angle_deg"):
        select_pairs(frames, PairsConfig(max_angle_deg=0.0))
    with pytest.raises(ValueError, match="min_overlap"):
        select_pairs(frames, PairsConfig(min_overlap=1.5))


def test_real_redkitchen_mapping_pairs(redkitchen_dir) -> None:
    from offline.sources.sevenscenes import load_sevenscenes, split_frames

    mapping, _ = split_frames(load_sevenscenes(redkitchen_dir), fraction=0.04)
    pairs = select_pairs(mapping.frames, PairsConfig(num_neighbours=5))
    names = set(mapping.names())
    assert all(a in names and b in names and a != b for a, b in pairs)
    # Every mapping frame takes part in at least one pair (the trajectory is continuous).
    assert {n for p in pairs for n in p} == names
    assert 20 * 5 / 2 <= len(pairs) <= 20 * 5
