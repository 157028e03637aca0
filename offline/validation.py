"""Validation frames of a build: real frames for the training's learning curves.

They are frames of the source that are not mapping frames, picked evenly (midway through the
non-mapping frames, never the first or last), labelled from their depth images when they have
any (else the curves keep only their pose errors). Their names go into the map's manifest
(``training.validation_frames``) and ``d2s-nerf evaluate`` leaves them out of the queries, so a
benchmark never scores a frame the training was watched on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offline.labelled import LabelledImage
from offline.sources.frames import Frame


def select_validation_frames(frames: list[Frame], mapping_names: set[str], n: int) -> list[Frame]:
    """``n`` non-mapping frames evenly spread over the recording (none when there are none)."""
    candidates = [f for f in frames if f.name not in mapping_names]
    if n <= 0 or not candidates:
        return []
    n = min(n, len(candidates))
    # n + 2 evenly spaced positions without the two ends: no frame at the very start or end.
    positions = np.linspace(0, len(candidates) - 1, n + 2)[1:-1].round().astype(int)
    return [candidates[i] for i in sorted(set(positions.tolist()))]


def validation_images(frames: list[Frame], extractor, cache_dir: Path, device_type: str,
                      log=print) -> list[LabelledImage]:
    """The frames' features (from the query-feature cache) with depth labels where there is depth."""
    from offline.depth_labels import depth_labels
    from offline.query_features import cached_features

    feats, stats = cached_features(frames, extractor, cache_dir, device_type, progress=False, log=log)
    out = []
    for frame in frames:
        if frame.name not in feats:
            log(f"validation frame {frame.name} left out: {stats.failed.get(frame.name)}")
            continue
        f = feats[frame.name]
        if frame.depth_path is not None:
            points, valid = depth_labels(frame, f.keypoints)
        else:
            points, valid = np.zeros((len(f), 3)), np.zeros(len(f), dtype=bool)
        out.append(LabelledImage(
            name=frame.name, keypoints=f.keypoints.astype(np.float32), descriptors=f.descriptors.astype(np.float32),
            points3D=np.nan_to_num(points.astype(np.float32)), valid=valid.astype(bool), camera=frame.camera,
            T_world_cam=frame.T_world_cam, source="validation"))
    return out
