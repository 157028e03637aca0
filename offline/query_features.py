"""A cache of query-frame features, so that scoring another map costs only D2S + PnP per query.

Feature extraction dominates a CPU evaluation (about 90 % of a query's time with ALIKED), and
every map built with the same extractor settings sees the same query features. The cache is
content-addressed: one ``.npz`` per (extractor settings, image bytes), under a directory named
after the extractor settings' fingerprint. So

- other extractor settings (name, keypoint budget, resize, options, device type) use another
  directory, never a stale entry;
- another frame set reuses the entries of the images it shares and extracts only the rest;
- an image file whose bytes changed (same name) hashes to another entry: it is re-extracted,
  whatever its modification time says.

An unreadable entry (a crash mid-write, a truncated copy) is re-extracted, with a note, and
replaced. Entries are written atomically and hold plain arrays (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from d2s_nerf_ros.features.base import Features
from offline.sources.frames import Frame

CACHE_FORMAT = 1  # bump when an entry's layout changes: old entries then live in other directories


def extractor_cache_key(extractor_config: dict[str, Any], device_type: str) -> str:
    """Fingerprint of everything that changes an extractor's output for a given image."""
    blob = json.dumps({"format": CACHE_FORMAT, "extractor": extractor_config, "device": device_type},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def image_digest(path: Path) -> str:
    """sha256 of the image file's bytes (a few ms per 640x480 JPEG)."""
    from d2s_nerf_ros.map_bundle import sha256_file

    return sha256_file(path)


@dataclass
class CacheStats:
    hits: int = 0
    extracted: int = 0
    corrupt: list[str] = field(default_factory=list)  # frames whose entry was unreadable (re-extracted)
    failed: dict[str, str] = field(default_factory=dict)  # frame -> why its image gave no features


def _entry_path(directory: Path, digest: str) -> Path:
    return directory / f"{digest}.npz"


def _load_entry(path: Path, descriptor_dim: int | None) -> Features:
    with np.load(path, allow_pickle=False) as z:
        feats = Features(keypoints=z["keypoints"], descriptors=z["descriptors"], scores=z["scores"],
                         image_size=tuple(int(v) for v in z["image_size"]))
    if descriptor_dim is not None and len(feats) and feats.descriptor_dim != descriptor_dim:
        raise ValueError(f"descriptor dimension {feats.descriptor_dim}, expected {descriptor_dim}")
    return feats


def _save_entry(path: Path, feats: Features) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, keypoints=feats.keypoints, descriptors=feats.descriptors, scores=feats.scores,
             image_size=np.array(feats.image_size, dtype=np.int64))
    os.replace(tmp, path)


def cached_features(frames: Sequence[Frame], extractor, cache_dir: Path | str, device_type: str = "cpu",
                    progress: bool = True, log: Callable[[str], None] | None = None
                    ) -> tuple[dict[str, Features], CacheStats]:
    """Features of every frame (by frame name), from ``cache_dir`` where present, else extracted
    with ``extractor`` and stored there; a frame whose image cannot be read or processed is left
    out, with its reason in ``stats.failed``. ``device_type`` is part of the key (a GPU extractor's
    output differs from the CPU's in the last bits, enough to move a keypoint)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    directory = Path(cache_dir) / extractor_cache_key(extractor.config(), device_type)
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "extractor.json"
    if not config_file.exists():  # for a human looking at the cache; the key is the directory name
        config_file.write_text(json.dumps({"extractor": extractor.config(), "device": device_type}, indent=1))
    stats = CacheStats()
    out: dict[str, Features] = {}
    todo: list[tuple[Frame, Path]] = []
    for frame in frames:
        try:
            path = _entry_path(directory, image_digest(Path(frame.image_path)))
        except OSError as exc:
            stats.failed[frame.name] = f"cannot read {frame.image_path}: {exc.strerror or exc}"
            continue
        if path.exists():
            try:
                out[frame.name] = _load_entry(path, getattr(extractor, "descriptor_dim", None))
                stats.hits += 1
                continue
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                stats.corrupt.append(frame.name)
                log(f"query feature cache: entry of {frame.name} is unreadable ({exc}); extracting again")
        todo.append((frame, path))
    from offline.progress import progress_bar

    for frame, path in progress_bar(todo, desc="query features", unit="frame", enabled=progress and bool(todo)):
        try:
            feats = extractor.extract(frame.load_rgb())
        except Exception as exc:  # one unreadable image must not cost the other frames their features
            stats.failed[frame.name] = f"{type(exc).__name__}: {exc}"
            continue
        _save_entry(path, feats)
        out[frame.name] = feats
        stats.extracted += 1
    return out, stats
