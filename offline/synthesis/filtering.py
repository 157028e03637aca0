"""Keep a render only when it matches its reference mapping frame well.

A render that the map's own extractor and matcher cannot tie to the real image it was
interpolated from is blurry, has floaters or shows the wrong place; its descriptors would
teach D2S noise. The paper keeps renders with >= 500 LightGlue matches for 4096 SuperPoint
keypoints (~0.12 of the budget); we keep the threshold as a fraction of the extractor's
keypoint budget so it carries over to other budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from d2s_nerf_ros.features.base import Features


@dataclass
class FilterConfig:
    keep_fraction: float = 0.12          # of the extractor's max_keypoints
    min_matches: int | None = None       # absolute threshold; overrides keep_fraction when set
    histogram_bins: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if self.min_matches is not None and self.min_matches < 0:
            raise ValueError(f"min_matches must be >= 0, got {self.min_matches}")
        if self.histogram_bins < 1:
            raise ValueError(f"histogram_bins must be >= 1, got {self.histogram_bins}")

    def threshold(self, max_keypoints: int) -> int:
        if self.min_matches is not None:
            return int(self.min_matches)
        return int(math.ceil(self.keep_fraction * int(max_keypoints)))


@dataclass
class FilterDecision:
    name: str
    reference: str
    n_matches: int
    kept: bool


@dataclass
class RenderMatch:
    """What filtering learnt about one render; labelling reuses it."""

    features: Features   # of the render (pixels of the image given to the extractor)
    matches: np.ndarray  # (M, 2) int64: rows (index into the render's features, index into the reference's)
    decision: FilterDecision


@dataclass
class FilterResult:
    renders: list[RenderMatch]
    threshold: int
    histogram: dict[str, list[float]] = field(default_factory=dict)

    @property
    def decisions(self) -> list[FilterDecision]:
        return [r.decision for r in self.renders]

    @property
    def n_kept(self) -> int:
        return sum(r.decision.kept for r in self.renders)


def match_count_histogram(counts: Sequence[int], max_keypoints: int, bins: int = 10) -> dict[str, list[float]]:
    """Counts of renders per match-count bin, bins evenly over [0, max_keypoints]."""
    edges = np.linspace(0.0, float(max(int(max_keypoints), 1)), bins + 1)
    values = np.clip(np.asarray(counts, dtype=np.float64), 0.0, edges[-1])
    hist, _ = np.histogram(values, bins=edges)
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in hist]}


def features_of_labelled(image) -> Features:
    """The reference frame's features as stored in its LabelledImage (scores are not stored)."""
    return Features(image.keypoints, image.descriptors, np.ones(len(image.keypoints), np.float32),
                    (int(image.camera.width), int(image.camera.height)))


def match_render(image: np.ndarray, reference: Features, extractor, matcher) -> tuple[Features, np.ndarray]:
    """The map's extractor on a render, matched to its reference frame's features: the render's
    features and the (M, 2) match indices (render, reference)."""
    feats = extractor.extract(image)
    if len(feats) == 0 or len(reference) == 0:
        return feats, np.zeros((0, 2), np.int64)
    return feats, np.asarray(matcher.match(feats, reference).indices, np.int64).reshape(-1, 2)


def filter_renders(matched: Sequence[tuple[Features, np.ndarray]], max_keypoints: int,
                   config: FilterConfig = FilterConfig(), names: Sequence[str] | None = None,
                   reference_names: Sequence[str] | None = None) -> FilterResult:
    """Keep the renders with at least the threshold's matches to their reference.

    ``matched[i]``: render i's features and its matches to its reference (``match_render``, or
    the synthesis stage's per-render cache of it). ``max_keypoints``: the extractor's budget,
    which ``config.keep_fraction`` is a fraction of. Returns per-render decisions and the
    match-count histogram.
    """
    names = list(names) if names is not None else [f"render-{i}" for i in range(len(matched))]
    reference_names = list(reference_names) if reference_names is not None else ["" for _ in matched]
    if len(names) != len(matched) or len(reference_names) != len(matched):
        raise ValueError("names and reference_names need one entry per render")
    threshold = config.threshold(max_keypoints)
    out = [RenderMatch(feats, matches, FilterDecision(name, ref_name, len(matches), len(matches) >= threshold))
           for (feats, matches), name, ref_name in zip(matched, names, reference_names)]
    hist = match_count_histogram([r.decision.n_matches for r in out], max_keypoints, config.histogram_bins)
    return FilterResult(out, threshold, hist)
