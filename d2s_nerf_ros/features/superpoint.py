"""SuperPoint (DeTone, Malisiewicz, Rabinovich 2018): the feature the D2S paper uses.

The network is the Magic Leap architecture, so that the standard checkpoint
``superpoint_v1.pth`` (a plain state_dict, keys ``conv1a.weight`` ... ``convDb.bias``)
loads as it is:

* shared VGG-style encoder: conv1a/b (64), pool, conv2a/b (64), pool, conv3a/b (128),
  pool, conv4a/b (128), 3x3 convolutions with ReLU, so the output stride is 8;
* detector head convPa (3x3, 256) -> convPb (1x1, 65): per 8x8 cell a softmax over
  64 pixel positions plus a "no keypoint" dustbin; dropping the dustbin and moving the
  64 channels back to their pixels (depth-to-space) gives a full-resolution score map;
* descriptor head convDa (3x3, 256) -> convDb (1x1, 256): a coarse descriptor map,
  sampled bilinearly at the keypoints and L2-normalised.

Post-processing: max-pool non-maximum suppression within ``nms_radius`` (a square
window), border removal, a score threshold and the ``max_keypoints`` best.

Weights (``resolve_superpoint_weights``): an explicit path, else ``$D2S_SUPERPOINT_WEIGHTS``,
else a cached download of the Magic Leap release into ``$D2S_CACHE_DIR`` (default
``~/.cache/d2s_nerf_ros``). A download is checked against ``SUPERPOINT_V1_SHA256``; that
digest was found in one public third-party listing and could not be re-computed here (this
machine cannot reach GitHub). If it ever disagrees with the genuine release, pass the file
by path or environment variable (or give ``expected_sha256``). Every checkpoint, however it
arrives, is loaded with ``torch.load(weights_only=True)`` (no code execution) and checked
key by key against the exact architecture shapes (1,300,865 parameters, about 5.2 MB).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2s_nerf_ros.features.base import LocalFeatureExtractor, to_grey
from d2s_nerf_ros.map_bundle import sha256_file

SUPERPOINT_V1_URL = "https://github.com/magicleap/SuperPointPretrainedNetwork/raw/master/superpoint_v1.pth"
SUPERPOINT_V1_FILENAME = "superpoint_v1.pth"
# From one public third-party listing; not re-computed here (no route to GitHub). See module docstring.
SUPERPOINT_V1_SHA256 = "52b6708629640ca883673b5d5c097c4ddad37d8048b33f09c8ca0d69db12c40e"
WEIGHTS_ENV = "D2S_SUPERPOINT_WEIGHTS"
CACHE_ENV = "D2S_CACHE_DIR"

CELL = 8  # output stride of the encoder: one detector/descriptor cell per 8x8 pixels
DESCRIPTOR_DIM = 256

# (name, in_channels, out_channels, kernel) of every convolution, in forward order.
_CONVS = (
    ("conv1a", 1, 64, 3), ("conv1b", 64, 64, 3),
    ("conv2a", 64, 64, 3), ("conv2b", 64, 64, 3),
    ("conv3a", 64, 128, 3), ("conv3b", 128, 128, 3),
    ("conv4a", 128, 128, 3), ("conv4b", 128, 128, 3),
    ("convPa", 128, 256, 3), ("convPb", 256, CELL * CELL + 1, 1),
    ("convDa", 128, 256, 3), ("convDb", 256, DESCRIPTOR_DIM, 1),
)


def superpoint_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the standard checkpoint and its tensor shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, c_in, c_out, k in _CONVS:
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)
    return shapes


class SuperPointWeightsError(ValueError):
    """A SuperPoint checkpoint that is missing, unreadable or of the wrong architecture."""


class SuperPointNet(nn.Module):
    """image (B, 1, H, W) in [0, 1], H and W multiples of 8 -> (logits (B, 65, H/8, W/8), coarse descriptors)."""

    def __init__(self) -> None:
        super().__init__()
        for name, c_in, c_out, k in _CONVS:
            setattr(self, name, nn.Conv2d(c_in, c_out, kernel_size=k, stride=1, padding=k // 2))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image
        for stage, (a, b) in enumerate((("conv1a", "conv1b"), ("conv2a", "conv2b"),
                                        ("conv3a", "conv3b"), ("conv4a", "conv4b"))):
            x = F.relu(getattr(self, a)(x))
            x = F.relu(getattr(self, b)(x))
            if stage < 3:
                x = self.pool(x)
        logits = self.convPb(F.relu(self.convPa(x)))
        descriptors = self.convDb(F.relu(self.convDa(x)))
        return logits, F.normalize(descriptors, p=2, dim=1)


# -- post-processing (pure functions, testable on crafted inputs) -------------------------

def logits_to_score_map(logits: torch.Tensor) -> torch.Tensor:
    """(B, 65, Hc, Wc) detector logits -> (B, 8*Hc, 8*Wc) keypoint probabilities.

    Channel ``k`` of cell (i, j) is pixel (x = 8j + k % 8, y = 8i + k // 8); channel 64 is
    the dustbin and is dropped after the softmax.
    """
    if logits.ndim != 4 or logits.shape[1] != CELL * CELL + 1:
        raise ValueError(f"detector logits must be (B, {CELL * CELL + 1}, Hc, Wc), got {tuple(logits.shape)}")
    probabilities = torch.softmax(logits, dim=1)[:, :-1]
    return F.pixel_shuffle(probabilities, CELL)[:, 0]


def max_pool_nms(scores: torch.Tensor, radius: int, iterations: int = 2) -> torch.Tensor:
    """Zero every score that is not a maximum within a (2r+1)^2 window; (B, H, W) in and out.

    One max-pool pass also drops a point whose only stronger neighbour was itself
    suppressed (a chain A > B > C, each within r of the next but C far from A). The extra
    passes restore such points: they look again at what no kept maximum covers.
    """
    if radius < 0:
        raise ValueError(f"nms radius must be >= 0, got {radius}")
    if radius == 0:
        return scores
    size = 2 * radius + 1

    def window_max(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x[:, None], kernel_size=size, stride=1, padding=radius)[:, 0]

    keep = scores == window_max(scores)
    for _ in range(iterations):
        covered = window_max(keep.float()) > 0  # within r of a kept maximum
        remaining = torch.where(covered, torch.zeros_like(scores), scores)
        new_maxima = (remaining == window_max(remaining)) & ~covered
        keep = keep | new_maxima
    return torch.where(keep, scores, torch.zeros_like(scores))


def select_keypoints(score_map: torch.Tensor, nms_radius: int, border: int, threshold: float,
                     max_keypoints: int, valid_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One (H, W) score map -> keypoints (N, 2) as (x, y) pixels and their scores, best first.

    ``valid_size`` (width, height) is the real image inside a padded map: the border is
    measured from its edges and the padding never yields keypoints.
    """
    if score_map.ndim != 2:
        raise ValueError(f"score map must be (H, W), got {tuple(score_map.shape)}")
    height, width = score_map.shape
    valid_w, valid_h = valid_size if valid_size is not None else (width, height)
    suppressed = max_pool_nms(score_map[None], nms_radius)[0]
    mask = suppressed > threshold
    mask[:, valid_w - border:] = False
    mask[valid_h - border:, :] = False
    if border > 0:
        mask[:border, :] = False
        mask[:, :border] = False
    ys, xs = torch.nonzero(mask, as_tuple=True)
    scores = score_map[ys, xs]
    # Stable sort on raster order keeps ties deterministic.
    order = torch.sort(scores, descending=True, stable=True).indices[:max_keypoints]
    keypoints = torch.stack([xs[order], ys[order]], dim=1).to(score_map.dtype)
    return keypoints, scores[order]


def sample_descriptors(coarse: torch.Tensor, keypoints: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Bilinear descriptors at pixel keypoints from a (D, Hc, Wc) map, L2-normalised -> (N, D).

    Cell (i, j) covers pixels 8j .. 8j+7, so its descriptor sits at the cell centre
    x = 8j + 3.5 (pixel centres at integers); between centres it is interpolated, beyond
    the outer centres it is clamped.
    """
    if coarse.ndim != 3:
        raise ValueError(f"coarse descriptor map must be (D, Hc, Wc), got {tuple(coarse.shape)}")
    dim, hc, wc = coarse.shape
    if keypoints.shape[0] == 0:
        return coarse.new_zeros((0, dim))
    centre_offset = (cell - 1) / 2.0
    cell_coords = (keypoints.to(coarse.dtype) - centre_offset) / cell  # coarse-grid coordinates
    extent = torch.tensor([max(wc - 1, 1), max(hc - 1, 1)], dtype=coarse.dtype, device=coarse.device)
    grid = (cell_coords / extent * 2.0 - 1.0).clamp(-1.0, 1.0)
    sampled = F.grid_sample(coarse[None], grid[None, None], mode="bilinear", align_corners=True)[0, :, 0]
    return F.normalize(sampled.t(), p=2, dim=1)


# -- weights ------------------------------------------------------------------------------

# One checksum helper for weights and map files.
sha256_of_file = sha256_file


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "d2s_nerf_ros")


def download_verified(url: str, destination: Path, expected_sha256: str, timeout_s: float = 60.0) -> Path:
    """Download into a temporary file beside ``destination``; rename only when the digest matches."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=destination.name + ".", suffix=".part", dir=destination.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != expected_sha256.lower():
            raise SuperPointWeightsError(
                f"download from {url} has sha256 {digest.hexdigest()}, expected {expected_sha256}; "
                f"not using it. Fetch the file yourself and pass it by path or ${WEIGHTS_ENV}.")
        os.replace(tmp, destination)
        return destination
    except OSError as error:  # includes urllib's URLError
        raise SuperPointWeightsError(
            f"could not download SuperPoint weights from {url}: {error}. On a machine without internet, "
            f"copy superpoint_v1.pth over and pass it by path or ${WEIGHTS_ENV}.") from error
    finally:
        tmp.unlink(missing_ok=True)


def resolve_superpoint_weights(path: str | Path | None = None, *, allow_download: bool = True,
                               cache_dir: str | Path | None = None, url: str = SUPERPOINT_V1_URL,
                               expected_sha256: str = SUPERPOINT_V1_SHA256) -> Path:
    """Where the SuperPoint checkpoint is: explicit path, ``$D2S_SUPERPOINT_WEIGHTS``, cache, download."""
    for source, candidate in (("path", path), (f"${WEIGHTS_ENV}", os.environ.get(WEIGHTS_ENV) or None)):
        if candidate is not None:
            candidate = Path(candidate).expanduser()
            if not candidate.is_file():
                raise SuperPointWeightsError(f"SuperPoint weights given by {source} do not exist: {candidate}")
            return candidate
    cached = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cached / SUPERPOINT_V1_FILENAME
    if cached.is_file():
        # Only verified downloads are renamed into the cache, but a file can be damaged later.
        if sha256_of_file(cached) != expected_sha256.lower():
            raise SuperPointWeightsError(f"cached SuperPoint weights {cached} do not match sha256 {expected_sha256}; "
                                         "delete the file to download it again")
        return cached
    if not allow_download:
        raise SuperPointWeightsError(
            f"no SuperPoint weights: pass a path, set ${WEIGHTS_ENV}, or place {SUPERPOINT_V1_FILENAME} in {cached.parent}")
    return download_verified(url, cached, expected_sha256)


def load_superpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without executing code and check every key and shape."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad or unsafe files
        raise SuperPointWeightsError(f"cannot read SuperPoint weights {path} as a plain state_dict: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SuperPointWeightsError(f"{path} holds a {type(state).__name__}, not a state_dict")
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from nn.DataParallel
    expected = superpoint_state_dict_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(str(k) for k in set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
             if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise SuperPointWeightsError(f"{path} is not a SuperPoint (Magic Leap v1) checkpoint: " + "; ".join(problems))
    return {k: state[k].float() for k in expected}


# -- extractor ----------------------------------------------------------------------------

class SuperPointExtractor(LocalFeatureExtractor):
    """SuperPoint with the Magic Leap checkpoint; 256-d descriptors.

    Defaults follow common SuperPoint practice: nms_radius 4, detection_threshold 0.005,
    remove_borders 4. ``weights_sha256`` (as stored by ``config()``) makes loading fail
    when a different checkpoint is found, since its descriptors would not match a map.
    """

    name = "superpoint"
    descriptor_dim = DESCRIPTOR_DIM

    def __init__(self, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                 weights: str | Path | None = None, nms_radius: int = 4, detection_threshold: float = 0.005,
                 remove_borders: int = 4, weights_sha256: str | None = None, allow_download: bool = True,
                 batch_size: int = 8, backend: str = "auto", num_threads: int = 0) -> None:
        super().__init__(max_keypoints=max_keypoints, device=device, resize_max=resize_max, batch_size=batch_size,
                         backend=backend, num_threads=num_threads)
        if not isinstance(nms_radius, (int, np.integer)) or nms_radius < 0:
            raise ValueError(f"nms_radius must be an integer >= 0, got {nms_radius!r}")
        if not isinstance(remove_borders, (int, np.integer)) or remove_borders < 0:
            raise ValueError(f"remove_borders must be an integer >= 0, got {remove_borders!r}")
        if not np.isfinite(detection_threshold) or not 0.0 <= detection_threshold < 1.0:
            raise ValueError(f"detection_threshold must be in [0, 1), got {detection_threshold}")
        self.nms_radius = int(nms_radius)
        self.remove_borders = int(remove_borders)
        self.detection_threshold = float(detection_threshold)
        self.weights_path = resolve_superpoint_weights(weights, allow_download=allow_download)
        self.weights_sha256 = sha256_of_file(self.weights_path)
        if weights_sha256 is not None and weights_sha256.lower() != self.weights_sha256:
            raise SuperPointWeightsError(
                f"SuperPoint weights {self.weights_path} have sha256 {self.weights_sha256}, but {weights_sha256} "
                "was required (the map was built with another checkpoint)")
        self.net = SuperPointNet()
        self.net.load_state_dict(load_superpoint_state_dict(self.weights_path), strict=True)
        self.net = self.net.eval().to(self.device)

    def _options(self) -> dict[str, Any]:
        return {"nms_radius": self.nms_radius, "detection_threshold": self.detection_threshold,
                "remove_borders": self.remove_borders, "weights_sha256": self.weights_sha256}

    @torch.inference_mode()
    def _extract_network_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        grey = np.stack([to_grey(image) for image in images])  # B x H x W
        tensor = torch.from_numpy(grey).to(self.device).float().div_(255.0)[:, None]
        height, width = tensor.shape[-2:]
        # Pad bottom/right to whole cells: pixel coordinates stay those of the image.
        pad_h, pad_w = (-height) % CELL, (-width) % CELL
        if pad_h or pad_w:
            tensor = F.pad(tensor, (0, pad_w, 0, pad_h), mode="replicate")
        logits, coarse = self.net(tensor)
        score_maps = logits_to_score_map(logits)
        outputs = []
        for score_map, coarse_map in zip(score_maps, coarse):
            keypoints, scores = select_keypoints(score_map, self.nms_radius, self.remove_borders,
                                                 self.detection_threshold, self.max_keypoints,
                                                 valid_size=(width, height))
            descriptors = sample_descriptors(coarse_map, keypoints)
            outputs.append((keypoints.cpu().numpy(), descriptors.cpu().numpy(), scores.cpu().numpy()))
        return outputs
