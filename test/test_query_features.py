"""The query-feature cache of ``d2s-nerf evaluate``: real SIFT on real RedKitchen frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.features import make_extractor
from offline.query_features import cached_features, extractor_cache_key
from offline.sources.frames import Frame

CAMERA = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0)


@pytest.fixture()
def frames(redkitchen_dir: Path, tmp_path: Path) -> list[Frame]:
    """Three real frames, their images copied to tmp_path so that the test may change one."""
    out = []
    for index in (0, 50, 100):
        src = redkitchen_dir / "seq-01" / f"frame-{index:06d}.color.jpg"
        dst = tmp_path / "images" / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
        out.append(Frame(f"frame-{index:06d}", dst, np.eye(4), CAMERA))
    return out


def _same(a, b) -> bool:
    return (np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.descriptors, b.descriptors)
            and np.array_equal(a.scores, b.scores) and a.image_size == b.image_size)


def test_second_call_is_served_from_the_cache(frames, tmp_path):
    extractor = make_extractor("sift", max_keypoints=300, device="cpu")
    first, stats = cached_features(frames, extractor, tmp_path / "cache", progress=False)
    assert (stats.hits, stats.extracted, stats.failed) == (0, 3, {})
    again, stats = cached_features(frames, extractor, tmp_path / "cache", progress=False)
    assert (stats.hits, stats.extracted) == (3, 0)
    for f in frames:
        assert _same(first[f.name], again[f.name])
        assert 100 < len(again[f.name]) <= 300
    # Another frame set shares the entries of the images it has in common.
    _, stats = cached_features(frames[1:], extractor, tmp_path / "cache", progress=False)
    assert (stats.hits, stats.extracted) == (2, 0)


def test_stale_entries_are_detected_and_recomputed(frames, tmp_path):
    cache = tmp_path / "cache"
    extractor = make_extractor("sift", max_keypoints=300, device="cpu")
    before, _ = cached_features(frames, extractor, cache, progress=False)

    # Other extractor settings: another key, nothing reused.
    other = make_extractor("sift", max_keypoints=150, device="cpu")
    assert extractor_cache_key(other.config(), "cpu") != extractor_cache_key(extractor.config(), "cpu")
    assert extractor_cache_key(extractor.config(), "cuda") != extractor_cache_key(extractor.config(), "cpu")
    feats, stats = cached_features(frames, other, cache, progress=False)
    assert (stats.hits, stats.extracted) == (0, 3)
    assert all(len(feats[f.name]) <= 150 for f in frames)

    # The same file name with other image content (mtime kept as it was): re-extracted.
    changed = frames[0].image_path
    stat = changed.stat()
    image = cv2.imread(str(changed))
    cv2.imwrite(str(changed), cv2.flip(image, 1))
    import os

    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    feats, stats = cached_features(frames, extractor, cache, progress=False)
    assert (stats.hits, stats.extracted) == (2, 1)
    assert not _same(feats[frames[0].name], before[frames[0].name])
    assert _same(feats[frames[0].name], extractor.extract(frames[0].load_rgb()))


def test_corrupt_entry_and_unreadable_image(frames, tmp_path):
    cache = tmp_path / "cache"
    extractor = make_extractor("sift", max_keypoints=300, device="cpu")
    before, _ = cached_features(frames, extractor, cache, progress=False)
    entries = sorted((cache).glob("*/*.npz"))
    assert len(entries) == 3
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])  # a truncated copy
    messages = []
    feats, stats = cached_features(frames, extractor, cache, progress=False, log=messages.append)
    assert stats.extracted == 3 and sorted(stats.corrupt) == sorted(f.name for f in frames)
    assert all("unreadable" in m for m in messages) and len(messages) == 3
    assert all(_same(feats[f.name], before[f.name]) for f in frames)

    # A missing and a broken image: reported per frame, the other frames still get features.
    frames[1].image_path.unlink()
    frames[2].image_path.write_bytes(b"not a jpeg")
    feats, stats = cached_features(frames, extractor, cache, progress=False)
    assert set(feats) == {frames[0].name}
    assert set(stats.failed) == {frames[1].name, frames[2].name}
    assert "cannot read" in stats.failed[frames[1].name]
