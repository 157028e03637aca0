"""Triangulation with pycolmap and fixed poses, against synthetic cameras with known 3D points,
and one real check against depth labels on RedKitchen."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.sources.frames import Frame
from offline.triangulation import TriangulationConfig, TriangulationStats, triangulate_labels

CAM = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0)
N_POINTS = 300
N_CLUTTER = 40


def look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    z = target - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], axis=1)
    T[:3, 3] = centre
    return T


def project(T_world_cam: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T = np.linalg.inv(T_world_cam)
    pc = points @ T[:3, :3].T + T[:3, 3]
    return pc[:, :2] / pc[:, 2:] * [CAM.fx, CAM.fy] + [CAM.cx, CAM.cy], pc[:, 2]


@dataclass
class Scene:
    frames: list[Frame]
    points: np.ndarray                    # (P, 3) truth
    keypoints: dict[str, np.ndarray]      # per frame: permuted projections + clutter at the end
    point_of: dict[str, np.ndarray]       # per frame: keypoint -> true point index, -1 for clutter
    matches: dict[tuple[str, str], np.ndarray]
    corrupted: dict[str, np.ndarray]      # per frame: keypoints moved 15 px off their point


def make_scene(seed: int = 0, wrong_fraction: float = 0.1, noise_px: float = 0.5, n_far: int = 10,
               corrupt_frame: int = 3, n_corrupt: int = 20, short_track_points: int = 0) -> Scene:
    """6 cameras on an arc 2 m from a 1.6 x 1.2 x 0.8 m box of points, all looking at its centre.

    Besides the true correspondences: ``wrong_fraction`` of every pair's matches point to a random
    keypoint (clutter included), ``N_CLUTTER`` clutter keypoints per frame that are no projection,
    ``n_far`` points 300 m away (a triangulation angle far below 1.5 deg), ``n_corrupt`` keypoints
    of one frame moved 15 px off, and the first ``short_track_points`` points only matched between
    frames 0-2 (a three-view track).
    """
    rng = np.random.default_rng(seed)
    target = np.array([0.0, 0.0, 2.0])
    near = rng.uniform([-0.8, -0.6, 1.6], [0.8, 0.6, 2.4], (N_POINTS - n_far, 3))
    far = np.column_stack([rng.uniform(-20, 20, n_far), rng.uniform(-15, 15, n_far), np.full(n_far, 300.0)])
    points = np.vstack([near, far])
    frames = []
    for i in range(6):
        a = np.radians(-25.0 + 10.0 * i)
        centre = target + 2.0 * np.array([np.sin(a), 0.15 * np.cos(3 * a) - 0.05, -np.cos(a)])
        frames.append(Frame(f"seq/frame-{i:03d}", None, look_at(centre, target), CAM))

    keypoints, point_of, inverse, corrupted = {}, {}, {}, {}
    for i, f in enumerate(frames):
        uv, z = project(f.T_world_cam, points)
        assert np.all(z > 0) and np.all((uv > 0) & (uv < [639, 479])), "synthetic points must be visible"
        uv = uv + rng.normal(0, noise_px, uv.shape)
        order = rng.permutation(N_POINTS)          # keypoint k of this frame shows point order[k]
        clutter = rng.uniform([0, 0], [639, 479], (N_CLUTTER, 2))
        kp = np.vstack([uv[order], clutter])
        of = np.concatenate([order, -np.ones(N_CLUTTER, int)])
        if i == corrupt_frame and n_corrupt:
            bad = rng.choice(np.flatnonzero((of >= 0) & (of < N_POINTS - n_far)), n_corrupt, replace=False)
            kp[bad] += 15.0 * np.column_stack([np.cos(bad), np.sin(bad)])
            corrupted[f.name] = bad
        else:
            corrupted[f.name] = np.zeros(0, int)
        keypoints[f.name], point_of[f.name] = kp, of
        inverse[f.name] = np.argsort(order)        # point -> keypoint

    matches = {}
    for i in range(6):
        for j in range(i + 1, 6):
            a, b = frames[i].name, frames[j].name
            pts = np.arange(N_POINTS)
            if j > 2 and short_track_points:
                pts = pts[short_track_points:]
            m = np.column_stack([inverse[a][pts], inverse[b][pts]])
            wrong = rng.random(len(m)) < wrong_fraction
            m[wrong, 1] = rng.integers(0, N_POINTS + N_CLUTTER, wrong.sum())
            matches[(a, b)] = m
    return Scene(frames, points, keypoints, point_of, matches, corrupted)


def dlt(observations: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Linear triangulation from (T_world_cam, pixel) pairs: an independent cross-check only."""
    rows = []
    for T_world_cam, (u, v) in observations:
        P = CAM.K @ np.linalg.inv(T_world_cam)[:3]
        rows += [u * P[2] - P[0], v * P[2] - P[1]]
    _, _, vt = np.linalg.svd(np.array(rows))
    return vt[-1, :3] / vt[-1, 3]


@pytest.fixture(scope="module")
def scene_result(tmp_path_factory) -> tuple[Scene, dict, TriangulationStats, Path]:
    scene = make_scene()
    work = tmp_path_factory.mktemp("tri")
    labels, stats = triangulate_labels(scene.frames, scene.keypoints, scene.matches, TriangulationConfig(), work)
    return scene, labels, stats, work


def test_every_keypoint_gets_an_entry(scene_result) -> None:
    scene, labels, stats, _ = scene_result
    assert list(labels) == [f.name for f in scene.frames]
    for f in scene.frames:
        pts, valid = labels[f.name]
        n = len(scene.keypoints[f.name])
        assert pts.shape == (n, 3) and pts.dtype == np.float32
        assert valid.shape == (n,) and valid.dtype == bool
        assert np.all(pts[~valid] == 0.0)
    assert stats.n_keypoints == 6 * (N_POINTS + N_CLUTTER)


def test_recovered_points_match_truth(scene_result) -> None:
    scene, labels, stats, _ = scene_result
    errors = []
    for f in scene.frames:
        pts, valid = labels[f.name]
        of = scene.point_of[f.name]
        good = valid & (of >= 0)
        errors.append(np.linalg.norm(pts[good] - scene.points[of[good]], axis=1))
    e = np.concatenate(errors)
    print(f"\nsynthetic triangulation: {len(e)} labels, error median {1000 * np.median(e):.2f} mm, "
          f"p95 {1000 * np.percentile(e, 95):.2f} mm, max {1000 * e.max():.2f} mm; stats {stats.to_dict()}")
    assert np.median(e) < 0.003 and np.percentile(e, 95) < 0.006 and e.max() < 0.015
    # Nearly all honest observations of near points got a label: 290 near points x 6 views - 20 corrupted.
    assert len(e) >= 0.97 * (290 * 6 - 20)
    assert stats.n_points3D >= 0.97 * 290
    assert stats.mean_track_length > 5.5
    assert stats.median_reprojection_error_px < 1.0


def test_outliers_are_invalid(scene_result) -> None:
    scene, labels, _, _ = scene_result
    for f in scene.frames:
        _, valid = labels[f.name]
        of = scene.point_of[f.name]
        assert not valid[of < 0].any(), "clutter keypoints (only wrong matches) must stay invalid"
        assert not valid[(of >= N_POINTS - 10)].any(), "points 300 m away have a tiny triangulation angle"
        assert not valid[scene.corrupted[f.name]].any(), "a keypoint 15 px off its point must be invalid"
    # The other observations of the corrupted points still carry labels.
    f3 = scene.frames[3]
    corrupted_points = scene.point_of[f3.name][scene.corrupted[f3.name]]
    f0 = scene.frames[0]
    kp0 = np.argsort(scene.point_of[f0.name][:N_POINTS])[corrupted_points]
    assert labels[f0.name][1][kp0].mean() > 0.9


def test_stats_add_up(scene_result) -> None:
    _, labels, stats, _ = scene_result
    assert stats.n_valid == sum(int(v.sum()) for _, v in labels.values()) == sum(stats.valid_per_frame.values())
    assert stats.n_keypoints_matched >= stats.n_observations_colmap
    assert stats.n_valid == (stats.n_observations_colmap - stats.n_rejected_reprojection
                             - stats.n_rejected_track_length - stats.n_rejected_angle)
    assert stats.n_pairs == stats.n_pairs_used == 15
    assert stats.n_matches_epipolar < stats.n_matches  # the epipolar check removed wrong matches
    assert stats.to_dict()["n_frames"] == 6


def test_agrees_with_independent_dlt(scene_result) -> None:
    """pycolmap's points (BA-refined) against a plain DLT of the same honest observations."""
    scene, labels, _, _ = scene_result
    f0 = scene.frames[0]
    pts0, valid0 = labels[f0.name]
    checked = 0
    for k in np.flatnonzero(valid0)[:40]:
        p = scene.point_of[f0.name][k]
        obs = []
        for f in scene.frames:
            kk = int(np.flatnonzero(scene.point_of[f.name] == p)[0])
            if kk not in set(scene.corrupted[f.name].tolist()):
                obs.append((f.T_world_cam, scene.keypoints[f.name][kk]))
        assert np.linalg.norm(dlt(obs) - pts0[k]) < 0.003
        checked += 1
    assert checked == 40


def test_result_is_cached_and_invalidated(scene_result) -> None:
    scene, labels, stats, work = scene_result
    assert (work / "labels.npz").exists() and (work / "stats.json").exists()
    t = time.perf_counter()
    again, stats2 = triangulate_labels(scene.frames, scene.keypoints, scene.matches, TriangulationConfig(), work)
    assert time.perf_counter() - t < 0.5
    assert stats2 == stats
    for name in labels:
        np.testing.assert_array_equal(again[name][0], labels[name][0])
        np.testing.assert_array_equal(again[name][1], labels[name][1])
    # A different config must not reuse the cache.
    strict, stats3 = triangulate_labels(scene.frames, scene.keypoints, scene.matches,
                                        TriangulationConfig(max_reprojection_error_px=0.3), work)
    assert stats3.n_valid < stats.n_valid
    assert stats3.n_keypoints_matched == stats.n_keypoints_matched
    assert stats3.n_observations_colmap < stats.n_observations_colmap  # COLMAP applied the limit too
    assert stats3.median_reprojection_error_px < 0.3


def test_min_track_length() -> None:
    scene = make_scene(seed=1, wrong_fraction=0.0, n_far=0, n_corrupt=0, short_track_points=30)
    labels, stats = triangulate_labels(scene.frames, scene.keypoints, scene.matches,
                                       TriangulationConfig(min_track_length=4))
    for f in scene.frames[:3]:
        _, valid = labels[f.name]
        of = scene.point_of[f.name]
        assert not valid[(of >= 0) & (of < 30)].any(), "three-view tracks are below min_track_length=4"
        assert valid[of >= 30].mean() > 0.97
    # COLMAP knows no track-length limit: our filter removed these (30 points x 3 views).
    assert stats.n_rejected_track_length >= 0.97 * 90
    # With the default (2) the same three-view points are labelled.
    labels, _ = triangulate_labels(scene.frames, scene.keypoints, scene.matches, TriangulationConfig())
    f0 = scene.frames[0]
    assert labels[f0.name][1][(scene.point_of[f0.name] >= 0) & (scene.point_of[f0.name] < 30)].mean() > 0.97


def test_filter_helpers_hand_computed() -> None:
    from offline.triangulation import _max_triangulation_angle_deg, _reprojection_errors

    centres = np.array([[-1.0, 0, 0], [1.0, 0, 0], [0.2, 0, 0]])
    assert _max_triangulation_angle_deg(np.array([0.0, 0, 1]), centres) == pytest.approx(90.0)
    assert _max_triangulation_angle_deg(np.array([0.0, 0, 1]), centres[1:]) == pytest.approx(
        np.degrees(np.arctan(1.0) - np.arctan(0.2)))
    frame = Frame("f", None, np.eye(4), CAM)
    pts = np.array([[0.0, 0, 2], [0.2, -0.1, 1.0], [0.0, 0, -2]])
    pix = np.array([[323.0, 244.0], [320 + 105.0, 240 - 52.5], [320.0, 240.0]])
    err = _reprojection_errors(frame, pts, pix)
    np.testing.assert_allclose(err[:2], [5.0, 0.0], atol=1e-9)
    assert err[2] == np.inf  # behind the camera


def test_no_usable_matches_gives_all_invalid() -> None:
    scene = make_scene(seed=2)
    few = {k: m[:5] for k, m in scene.matches.items()}  # below min_num_matches
    labels, stats = triangulate_labels(scene.frames, scene.keypoints, few, TriangulationConfig())
    assert stats.n_pairs_used == 0 and stats.n_valid == 0
    assert all(not v.any() and len(v) == N_POINTS + N_CLUTTER for _, v in labels.values())
    labels, _ = triangulate_labels(scene.frames, scene.keypoints, {}, TriangulationConfig())
    assert all(not v.any() for _, v in labels.values())


def test_reversed_pair_keys_are_merged() -> None:
    scene = make_scene(seed=3, wrong_fraction=0.0, n_far=0, n_corrupt=0)
    flipped = {(b, a): m[:, ::-1] for (a, b), m in scene.matches.items()}
    la, sa = triangulate_labels(scene.frames, scene.keypoints, scene.matches, TriangulationConfig())
    lb, sb = triangulate_labels(scene.frames, scene.keypoints, flipped, TriangulationConfig())
    assert sa.n_matches == sb.n_matches
    for name in la:
        np.testing.assert_array_equal(la[name][1], lb[name][1])
        np.testing.assert_allclose(la[name][0], lb[name][0], atol=1e-5)


def test_bad_inputs_are_clear_errors() -> None:
    scene = make_scene(seed=4)
    f = scene.frames
    kps = scene.keypoints
    with pytest.raises(ValueError, match="no keypoints given"):
        triangulate_labels(f, {f[0].name: kps[f[0].name]}, {})
    with pytest.raises(ValueError, match="not in the frame list"):
        triangulate_labels(f, kps, {(f[0].name, "nope"): np.zeros((1, 2), int)})
    with pytest.raises(ValueError, match="self pair"):
        triangulate_labels(f, kps, {(f[0].name, f[0].name): np.zeros((1, 2), int)})
    with pytest.raises(ValueError, match="index outside"):
        triangulate_labels(f, kps, {(f[0].name, f[1].name): np.array([[0, 10_000]])})
    with pytest.raises(ValueError, match="integer"):
        triangulate_labels(f, kps, {(f[0].name, f[1].name): np.array([[0.0, 1.0]])})
    with pytest.raises(ValueError, match="min_track_length"):
        triangulate_labels(f, kps, {}, TriangulationConfig(min_track_length=1))


# ----------------------------------------------------------------------------- real data

def _mutual_ratio_matches(da: np.ndarray, db: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    bf = cv2.BFMatcher(cv2.NORM_L2)
    forward = {m[0].queryIdx: m[0].trainIdx for m in bf.knnMatch(da, db, k=2)
               if len(m) == 2 and m[0].distance < ratio * m[1].distance}
    backward = {m[0].queryIdx: m[0].trainIdx for m in bf.knnMatch(db, da, k=1)}
    return np.array([(a, b) for a, b in forward.items() if backward.get(b) == a], dtype=np.int64).reshape(-1, 2)


def test_real_redkitchen_triangulation_agrees_with_depth(redkitchen_dir, tmp_path) -> None:
    from d2s_nerf_ros.features import make_extractor
    from offline.depth_labels import depth_labels
    from offline.sources.sevenscenes import load_sevenscenes

    frameset = load_sevenscenes(redkitchen_dir)
    # Frames 240, 252, 264: ~8 and ~15 cm apart, 2.4 m from the scene. (Some 7-Scenes frames carry
    # poses that disagree with their neighbours by several pixels, e.g. frame-000184; no
    # triangulation with fixed poses can fix those, so this check uses a consistent stretch.)
    frames = [frameset[i] for i in (120, 126, 132)]
    assert [f.name for f in frames] == ["seq-01/frame-000240", "seq-01/frame-000252", "seq-01/frame-000264"]
    extractor = make_extractor("sift", max_keypoints=2048, device="cpu")
    feats = {f.name: extractor.extract(f.load_rgb()) for f in frames}
    matches = {(a.name, b.name): _mutual_ratio_matches(feats[a.name].descriptors, feats[b.name].descriptors)
               for i, a in enumerate(frames) for b in frames[i + 1:]}
    labels, stats = triangulate_labels(frames, {n: ft.keypoints for n, ft in feats.items()}, matches,
                                       TriangulationConfig(), tmp_path)

    distances, rel_z = [], []
    for f in frames:
        tri, tri_valid = labels[f.name]
        dep, dep_valid = depth_labels(f, feats[f.name].keypoints)
        both = tri_valid & dep_valid
        distances.append(np.linalg.norm(tri[both] - dep[both], axis=1))
        T = np.linalg.inv(f.T_world_cam)
        z_tri = tri[both] @ T[2, :3] + T[2, 3]
        z_dep = dep[both] @ T[2, :3] + T[2, 3]
        rel_z.append(z_tri / z_dep - 1.0)
    d = np.concatenate(distances)
    rz = np.concatenate(rel_z)
    print(f"\nRedKitchen SIFT triangulation vs depth labels: {stats.n_valid} triangulated labels, {len(d)} valid in both; "
          f"3D distance median {100 * np.median(d):.1f} cm, p25 {100 * np.percentile(d, 25):.1f} cm, "
          f"p75 {100 * np.percentile(d, 75):.1f} cm; camera-z (triangulated/depth - 1) median {100 * np.median(rz):+.1f} %; "
          f"reprojection median {stats.median_reprojection_error_px:.2f} px; stats {stats.to_dict()}")
    assert stats.n_valid > 600 and len(d) > 500
    assert stats.median_reprojection_error_px < 1.5
    # Measured: 7.0 cm median at ~2.4 m, mostly a depth offset between the two label sources
    # (triangulated points ~3-4 % nearer than the depth png says). 7-Scenes colour and depth are
    # unregistered and the colour camera is uncalibrated (525 is the community convention), so the
    # two sources cannot agree to the millimetre; the limits catch gross errors (pose convention,
    # wrong focal, pixel offsets), which give decimetres to metres.
    assert np.median(d) < 0.10
    assert abs(np.median(rz)) < 0.06
