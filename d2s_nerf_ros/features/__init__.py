"""Local features behind one interface: ``make_extractor("aliked" | "xfeat" | "superpoint" | "sift")``."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from d2s_nerf_ros.features.base import Features, LocalFeatureExtractor
from d2s_nerf_ros.features.onnx_runtime import BACKEND_CHOICES

EXTRACTOR_NAMES = ("aliked", "xfeat", "superpoint", "sift")
# Options that choose how an extractor runs, not what it computes: never stored in a map.
RUNTIME_OPTIONS = ("backend", "num_threads")

__all__ = ["BACKEND_CHOICES", "EXTRACTOR_NAMES", "Features", "LocalFeatureExtractor", "extractor_from_config",
           "make_extractor"]


def make_extractor(name: str, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                   backend: str = "auto", num_threads: int = 0, **options: Any) -> LocalFeatureExtractor:
    """Build an extractor by name; ``options`` are the extractor's own (see its class).

    ``backend`` (auto | torch | onnxruntime) and ``num_threads`` (0: library default) are
    runtime choices: the extractor's ``config()`` and its results do not depend on them.
    """
    # Imports stay inside so that choosing SIFT never loads a network package.
    if name == "aliked":
        from d2s_nerf_ros.features.aliked import AlikedExtractor as cls
    elif name == "xfeat":
        from d2s_nerf_ros.features.xfeat import XFeatExtractor as cls
    elif name == "superpoint":
        from d2s_nerf_ros.features.superpoint import SuperPointExtractor as cls
    elif name == "sift":
        from d2s_nerf_ros.features.sift import SiftExtractor as cls
    else:
        raise ValueError(f"unknown feature extractor {name!r}; valid names: {', '.join(EXTRACTOR_NAMES)}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", *RUNTIME_OPTIONS}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"extractor {name!r} has no option(s) {unknown}; it accepts {sorted(accepted)}")
    return cls(max_keypoints=max_keypoints, device=device, resize_max=resize_max, backend=backend,
               num_threads=num_threads, **options)


def extractor_from_config(config: Mapping[str, Any], device: str = "auto", backend: str = "auto",
                          num_threads: int = 0) -> LocalFeatureExtractor:
    """Rebuild an extractor from its ``config()`` (as stored in a map manifest)."""
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"extractor config must be a mapping with a 'name', got {config!r}")
    options = dict(config)
    name = options.pop("name")
    return make_extractor(name, device=device, backend=backend, num_threads=num_threads, **options)
