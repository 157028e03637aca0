"""Cache keys: a work directory made before a refactoring or before a config field existed
stays valid for the default settings, and a changed setting changes the key.

The golden keys below were written by the build of commit a487d4a (before ``build_map`` was
split into stage functions and before ``offline.stages.added_field``), on the same four
RedKitchen frames with the same settings: a stage whose key changes is recomputed, so these
keys are what keeps existing work directories (features, labels, NeRF, renders, trainings) usable.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from offline.build import BuildConfig, ExtractorSettings, build_map
from offline.stages import added_field, fingerprint, to_jsonable
from offline.train_d2s import D2STrainConfig

GOLDEN_STAGE_KEYS = {
    "features": "230bb3b3953edf1a",
    "matches": "7471b8ffff5bb6ad",
    "triangulation": "a3694320a9819d99",
    "depth_labels": "03f7a3ab6166e15f",
    "augmentation": "58f2ecadf268e991",
}
GOLDEN_TRAINING_DIR = "train-0ec261713acce1eb"
# "stats" (run_synthesis's own result key) changed on purpose on 2026-12-02: it now covers the
# extractor, matcher and reference labels (it did not, and a work directory reused with another
# extractor served the first one's synthetic descriptors). The stage key, renders and training
# directory keep theirs.
GOLDEN_RGBD_WARP = {"stage": "1aeaa5da0257b8ea", "stats": "44cd911b0277d19c", "render_index": "d4db96659bdba384",
                    "training_dir": "train-713f6825dc3b3907"}


def tiny_config(**changes) -> BuildConfig:
    """Every stage but the NeRF, in seconds: SIFT, both label modes, one augmented copy, two iterations."""
    cfg = BuildConfig(profile="fast", extractor=ExtractorSettings(name="sift", max_keypoints=256), matcher="mnn",
                      labels="both", augment_per_image=1, train_iterations=2, train_images_per_batch=2,
                      train_keypoints_per_image=128, model_layers=1, model_head_dims=(32,), synthesis=False,
                      device="cpu")
    return dataclasses.replace(cfg, **changes)


def stage_keys(work: Path) -> dict[str, str]:
    return {p.name.removesuffix(".done.json"): json.loads(p.read_text())["key"] for p in work.glob("*.done.json")}


@pytest.fixture(scope="module")
def mapping(redkitchen_dir, tmp_path_factory):
    from offline.sources import SourceOptions, open_source

    frameset = open_source(redkitchen_dir, tmp_path_factory.mktemp("source"), SourceOptions())
    return frameset.subset([0, 25, 50, 75])


@pytest.mark.builds
def test_default_settings_keep_the_keys_of_existing_work_directories(mapping, tmp_path):
    work = tmp_path / "map.work"
    build_map(mapping, tmp_path / "map", tiny_config(), work_dir=work, progress=False, log=lambda m: None)
    assert stage_keys(work) == GOLDEN_STAGE_KEYS
    assert sorted(p.name for p in work.glob("train-*")) == [GOLDEN_TRAINING_DIR]

    # The RGB-D warp synthesis stage: its stage key, run_synthesis's own keys, and the training on it.
    warp = tiny_config(synthesis=True, synthesis_renderer="rgbd-warp", synthesis_max_poses=4, synthetic_labels="depth")
    summary = build_map(mapping, tmp_path / "map2", warp, work_dir=work, progress=False, log=lambda m: None)
    assert summary.n_synthetic_images > 0
    assert all(summary.cached[k] for k in GOLDEN_STAGE_KEYS), summary.cached  # reused, not recomputed
    assert stage_keys(work)["synthesis-rgbd-warp"] == GOLDEN_RGBD_WARP["stage"]
    stage_dir = work / "synthesis-rgbd-warp"
    assert json.loads((stage_dir / "synthesis_stats.json").read_text())["key"] == GOLDEN_RGBD_WARP["stats"]
    assert json.loads((stage_dir / "renders" / "index.json").read_text())["key"] == GOLDEN_RGBD_WARP["render_index"]
    assert GOLDEN_RGBD_WARP["training_dir"] in {p.name for p in work.glob("train-*")}

    # A changed setting changes the keys from its stage on, and only from there.
    build_map(mapping, tmp_path / "map3", tiny_config(augment_per_image=2), work_dir=work, progress=False,
              log=lambda m: None)
    keys = stage_keys(work)
    assert keys["augmentation"] != GOLDEN_STAGE_KEYS["augmentation"]
    assert {k: keys[k] for k in ("features", "matches", "triangulation", "depth_labels")} == \
        {k: GOLDEN_STAGE_KEYS[k] for k in ("features", "matches", "triangulation", "depth_labels")}
    assert len(list(work.glob("train-*"))) == 3


def test_a_field_added_later_counts_only_away_from_its_default():
    # What the key of a D2S training was before these options existed: the same fields without them
    # (curve_points never changes the model, so it is never hashed).
    added_later = {"synthetic_unlabelled", "lr_schedule", "onecycle_rise_fraction", "loss_reduction",
                   "early_images_per_batch", "early_keypoints_per_image", "early_fraction", "train_minutes",
                   "calibration_steps", "curve_points", "descriptor_noise", "head_warmup_iterations",
                   "head_warmup_batch", "head_warmup_lr", "reprojection_keypoints"}
    before = {k: v for k, v in to_jsonable(D2STrainConfig()).items() if k not in added_later}
    assert fingerprint(D2STrainConfig()) == fingerprint(before)
    assert fingerprint(D2STrainConfig(synthetic_unlabelled="ignored")) != fingerprint(before)
    assert fingerprint(D2STrainConfig(iterations=7)) != fingerprint(D2STrainConfig())
    assert fingerprint(D2STrainConfig(lr_schedule="cosine")) != fingerprint(before)
    assert fingerprint(D2STrainConfig(curve_points=3)) == fingerprint(before)
    assert fingerprint(D2STrainConfig(head_warmup_iterations=10)) != fingerprint(before)
    assert fingerprint(D2STrainConfig(descriptor_noise=0.1)) != fingerprint(before)
    assert fingerprint(D2STrainConfig(reprojection_keypoints="unlabelled")) != fingerprint(before)
    # to_jsonable (manifests, reports) still writes every field.
    assert to_jsonable(D2STrainConfig())["synthetic_unlabelled"] == "unreliable"

    @dataclasses.dataclass
    class Settings:
        size: int = 3
        mode: str = added_field("old")

    assert fingerprint(Settings()) == fingerprint({"size": 3})
    assert fingerprint(Settings(mode="new")) == fingerprint({"size": 3, "mode": "new"})
    assert fingerprint([Settings(size=4)]) == fingerprint([{"size": 4}])  # nested too
