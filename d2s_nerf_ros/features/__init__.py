"""Local features behind one interface: ``make_extractor("aliked" | "superpoint" | "sift")``."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from d2s_nerf_ros.features.base import Features, LocalFeatureExtractor

EXTRACTOR_NAMES = ("aliked", "superpoint", "sift")

__all__ = ["EXTRACTOR_NAMES", "Features", "LocalFeatureExtractor", "extractor_from_config", "make_extractor"]


def make_extractor(name: str, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                   **options: Any) -> LocalFeatureExtractor:
    """Build an extractor by name; ``options`` are the extractor's own (see its class)."""
    # Imports stay inside so that choosing SIFT never loads a network package.
    if name == "aliked":
        from d2s_nerf_ros.features.aliked import AlikedExtractor as cls
    elif name == "superpoint":
        from d2s_nerf_ros.features.superpoint import SuperPointExtractor as cls
    elif name == "sift":
        from d2s_nerf_ros.features.sift import SiftExtractor as cls
    else:
        raise ValueError(f"unknown feature extractor {name!r}; valid names: {', '.join(EXTRACTOR_NAMES)}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"extractor {name!r} has no option(s) {unknown}; it accepts {sorted(accepted)}")
    return cls(max_keypoints=max_keypoints, device=device, resize_max=resize_max, **options)


def extractor_from_config(config: Mapping[str, Any], device: str = "auto") -> LocalFeatureExtractor:
    """Rebuild an extractor from its ``config()`` (as stored in a map manifest)."""
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"extractor config must be a mapping with a 'name', got {config!r}")
    options = dict(config)
    name = options.pop("name")
    return make_extractor(name, device=device, **options)
