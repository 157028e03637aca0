"""``d2s-nerf build``: mapping frames -> labels -> [NeRF synthesis] -> D2S -> map bundle.

Every stage is cached in the work directory (see ``offline/stages.py``), so an
interrupted build resumes, and a rebuild with other training settings reuses the
features, matches and labels.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from offline.labelled import LabelledImage, load_labelled, save_labelled
from offline.sources.frames import Frame, FrameSet, even_indices
from offline.stages import StageRunner, fingerprint, to_jsonable, write_json_atomic

LABEL_MODES = ("auto", "triangulation", "depth", "both")


@dataclass
class ExtractorSettings:
    name: str = "aliked"
    max_keypoints: int = 1024
    resize_max: int | None = None


@dataclass
class BuildConfig:
    profile: str = "fast"
    extractor: ExtractorSettings = field(default_factory=ExtractorSettings)
    matcher: str = "auto"               # "auto" (LightGlue unless SIFT) | "lightglue" | "mnn"
    fraction: float | None = None
    every: int | None = None
    labels: str = "triangulation"       # LABEL_MODES; "auto": depth when every mapping frame has depth, else triangulation
    num_pair_neighbours: int = 5
    augment_per_image: int = 6
    train_iterations: int = 6000
    train_images_per_batch: int = 4
    train_keypoints_per_image: int = 1024
    train_lr: float = 5e-4
    # torch CPU threads while training D2S and the NeRF (None: torch's default, every core); CPU only.
    # Idle 2-core machine, 2026-12-02: 2 threads trained D2S 1.68x and nerfacto 1.36x faster than 1
    # (docs/BENCHMARKS.md, training-threads); on a CPU other jobs load, 1 can win (d2s-nerf build --num-threads 1).
    train_threads: int | None = None
    extractor_backend: str = "auto"     # how the extractor runs (auto | torch | onnxruntime); not part of the map
    extractor_threads: int = 0          # onnxruntime threads of the extractor (0: its default)
    model_layers: int = 5               # D2S attentional message-passing layers
    model_head_dims: tuple[int, ...] = (512, 1024, 1024, 512)  # D2S regression head (the paper's)
    synthesis: bool = True
    synthetic_labels: str = "matches"   # "matches" | "depth" | "both"
    # 0.2, not 0.5: on RedKitchen (20 and 10 frames, fast profile) 0.5 made synthesis cost 9-11 % of
    # accuracy and 0.2 gained 12-15 % (docs/BENCHMARKS.md): half of every batch synthetic crowds
    # the real labels out of a fixed training budget.
    synthetic_ratio: float = 0.2
    synthetic_unlabelled: str = "unreliable"  # a render's unlabelled keypoints: "unreliable" | "ignored" (reliability loss)
    synthesis_renderer: str = "nerfacto"      # SYNTHESIS_RENDERERS: nerfacto (the method) | rgbd-warp (needs depth)
    nerf_iterations: int = 1500
    synthesis_keep_fraction: float | None = None  # renders kept with >= this fraction of max_keypoints matches (None: profile's)
    synthesis_max_poses: int | None = None        # an even subsample of the novel poses, for a time budget
    device: str = "auto"
    seed: int = 0
    train_seed: int | None = None       # D2S initialisation and batches only (None: seed); the cached stages stay
    train_minutes: float | None = None  # wall-clock D2S budget: the schedule is fitted to it (offline/train_d2s.py)
    train_lr_schedule: str = "steps"    # "steps" | "cosine" | "onecycle"
    train_loss_reduction: str = "normalised"  # "normalised" | "published" (the D2S code's sums)
    train_early_batch: tuple[int, int] | None = None  # (images, keypoints each) for the first half of training
    train_head_warmup: int = 0          # head-only steps on shuffled keypoints before the full model (offline/train_d2s.py)
    train_head_warmup_batch: int = 8192  # keypoints per head warm-up step
    train_descriptor_noise: float = 0.0  # relative Gaussian noise on training descriptors (offline/train_d2s.py)
    train_reprojection_keypoints: str = "labelled"  # which keypoints the reprojection term sees (offline/train_d2s.py)
    train_reprojection_weight: float = 1.0          # its weight (the synthesis paper's code: 10)
    validation_frames: int = 6          # non-mapping frames for the learning curves, never scored as queries
    # Posed non-mapping frames of the source on which the map's error model (pose covariance) is
    # measured (offline/error_model_fit.py); 0, or a source without such frames: the fallback model.
    error_model_frames: int = 12

    def validate(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}")
        if self.matcher not in ("auto", "lightglue", "mnn"):
            raise ValueError(f"matcher must be auto, lightglue or mnn, got {self.matcher!r}")
        if self.synthetic_labels not in ("matches", "depth", "both"):
            raise ValueError(f"synthetic labels must be matches, depth or both, got {self.synthetic_labels!r}")
        if self.fraction is not None and self.every is not None:
            raise ValueError("give --fraction or --every, not both")
        if self.train_seed is not None and self.train_seed < 0:
            raise ValueError(f"train_seed must be >= 0 (or None), got {self.train_seed}")
        if self.train_early_batch is not None:
            self.train_early_batch = (int(self.train_early_batch[0]), int(self.train_early_batch[1]))
        if self.train_head_warmup < 0 or self.train_head_warmup_batch < 1:
            raise ValueError(f"train_head_warmup must be >= 0 and its batch >= 1, got {self.train_head_warmup}, "
                             f"{self.train_head_warmup_batch}")
        if self.model_layers < 0:
            raise ValueError(f"model_layers must be >= 0, got {self.model_layers}")
        if not (math.isfinite(self.train_descriptor_noise) and self.train_descriptor_noise >= 0):
            raise ValueError(f"train_descriptor_noise must be >= 0, got {self.train_descriptor_noise}")
        if self.augment_per_image < 0:
            raise ValueError(f"augment_per_image must be >= 0, got {self.augment_per_image}")
        if self.validation_frames < 0:
            raise ValueError(f"validation_frames must be >= 0, got {self.validation_frames}")
        if self.train_threads is not None and self.train_threads < 1:
            raise ValueError(f"train_threads must be >= 1 (or None), got {self.train_threads}")
        self.model_head_dims = tuple(int(d) for d in self.model_head_dims)
        if self.synthesis_keep_fraction is not None and not 0.0 <= self.synthesis_keep_fraction <= 1.0:
            raise ValueError(f"synthesis keep fraction must be in [0, 1], got {self.synthesis_keep_fraction}")
        from offline.train_d2s import LOSS_REDUCTIONS, LR_SCHEDULES, REPROJECTION_KEYPOINTS, SYNTHETIC_UNLABELLED

        if self.train_reprojection_keypoints not in REPROJECTION_KEYPOINTS:
            raise ValueError(f"train_reprojection_keypoints must be one of {', '.join(REPROJECTION_KEYPOINTS)}, "
                             f"got {self.train_reprojection_keypoints!r}")
        if not (math.isfinite(self.train_reprojection_weight) and self.train_reprojection_weight >= 0):
            raise ValueError(f"train_reprojection_weight must be >= 0, got {self.train_reprojection_weight}")

        if self.train_lr_schedule not in LR_SCHEDULES or self.train_loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"train_lr_schedule must be one of {LR_SCHEDULES} and train_loss_reduction one of "
                             f"{LOSS_REDUCTIONS}, got {self.train_lr_schedule!r}, {self.train_loss_reduction!r}")

        if self.synthetic_unlabelled not in SYNTHETIC_UNLABELLED:
            raise ValueError(f"synthetic unlabelled must be one of {', '.join(SYNTHETIC_UNLABELLED)}, "
                             f"got {self.synthetic_unlabelled!r}")
        if self.synthesis_renderer not in SYNTHESIS_RENDERERS:
            raise ValueError(f"synthesis renderer must be one of {', '.join(SYNTHESIS_RENDERERS)}, "
                             f"got {self.synthesis_renderer!r}")
        if self.synthesis_max_poses is not None and self.synthesis_max_poses < 1:
            raise ValueError(f"synthesis max poses must be >= 1, got {self.synthesis_max_poses}")


def profile_config(profile: str) -> BuildConfig:
    """The two named profiles. ``fast``: a 20-frame map on 2 CPU cores in about 15 minutes, no
    synthesis unless asked for. ``paper``: the papers' settings with NeRF synthesis, meant for a GPU."""
    if profile == "fast":
        # Tuned on RedKitchen, 20 frames, 2 CPU cores (docs/BENCHMARKS.md, "seeds-recipe" and the
        # issue #11 reading): the D2S error is mostly in the per-keypoint regression (its 3D error
        # on its own training frames was still 5 cm after 3000 steps), so one message-passing layer
        # and a wider, deeper head (512-512-512) beat three layers and a 256-256 head at the same
        # step cost, and a cosine anneal to zero ends training at a precise fit instead of at lr/8.
        # 6000 steps, not 4000: the curves were still falling at 4000, and 6000 (about 12 minutes
        # of training on 2 idle cores, inside a 15-minute budget) lowered the median error over
        # 3 seeds (docs/BENCHMARKS.md, "seeds-it6000").
        # Synthesis off: with this recipe and 10 RedKitchen mapping frames (the sparse regime the
        # paper targets), NeRF renders changed the median error by -6 % [-19 %, +19 %] over 3 seeds
        # and RGB-D warps -10 % [-24 %, +9 %] (docs/BENCHMARKS.md, "seeds-s10nerf" and
        # "seeds-s10warp"), and the NeRF stage costs about 12 minutes on 2 cores. `--synthesis`
        # turns it on; the paper profile keeps it.
        # Depth labels (where the source has depth) label ~80 % of the keypoints instead of ~20 %
        # and skip the matching stage; 4 augmented copies per frame keep the feature re-extraction
        # to a few minutes.
        return BuildConfig(
            profile="fast",
            labels="auto",
            augment_per_image=4,
            train_iterations=6000,
            train_lr=2e-3,
            train_lr_schedule="cosine",
            model_layers=1,
            model_head_dims=(512, 512, 512),
            synthesis=False,
        )
    if profile == "paper":
        return BuildConfig(
            profile="paper",
            extractor=ExtractorSettings(name="superpoint", max_keypoints=2048),
            augment_per_image=20,
            train_iterations=100_000,
            train_images_per_batch=8,
            train_keypoints_per_image=2048,
            nerf_iterations=30_000,
        )
    raise ValueError(f"unknown profile {profile!r}; known: fast, paper")


SYNTHESIS_RENDERERS = ("nerfacto", "rgbd-warp")
STAGED_BUNDLE = "bundle-staged"  # in the work directory: the bundle the report is made from


@dataclass
class BuildSummary:
    map_path: Path
    work_dir: Path
    n_frames: int
    n_labelled_keypoints: int
    n_augmented_images: int
    n_synthetic_images: int
    final_loss: float | None
    timings_s: dict[str, float]
    cached: dict[str, bool]

    def lines(self) -> list[str]:
        out = [
            f"map bundle        {self.map_path}",
            f"work directory    {self.work_dir}",
            f"mapping frames    {self.n_frames}",
            f"labelled 3D kps   {self.n_labelled_keypoints}",
            f"augmented images  {self.n_augmented_images}",
            f"synthetic images  {self.n_synthetic_images}",
            f"final train loss  {self.final_loss if self.final_loss is None else round(self.final_loss, 4)}",
        ]
        for name, secs in self.timings_s.items():
            out.append(f"  {name:<16}{secs:8.1f} s{'  (cached)' if self.cached.get(name) else ''}")
        return out


# --------------------------------------------------------------------------- stages

def select_mapping_frames(frameset: FrameSet, fraction: float | None, every: int | None) -> FrameSet:
    if fraction is None and every is None:
        return frameset
    idx = even_indices(len(frameset), fraction=fraction, every=every)
    if not idx:
        raise ValueError("the frame selection is empty: check --fraction/--every against the number of frames")
    return frameset.subset(idx)


def _save_features(path: Path, feats: dict[str, Any]) -> None:
    arrays = {}
    for i, (name, f) in enumerate(feats.items()):
        arrays[f"{i}/name"] = np.array(name)
        arrays[f"{i}/keypoints"] = f.keypoints
        arrays[f"{i}/descriptors"] = f.descriptors
        arrays[f"{i}/scores"] = f.scores
        arrays[f"{i}/image_size"] = np.array(f.image_size)
    arrays["count"] = np.array(len(feats))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_features(path: Path) -> dict[str, Any]:
    from d2s_nerf_ros.features.base import Features

    out = {}
    with np.load(path, allow_pickle=False) as z:
        for i in range(int(z["count"])):
            w, h = z[f"{i}/image_size"]
            out[str(z[f"{i}/name"])] = Features(
                keypoints=z[f"{i}/keypoints"], descriptors=z[f"{i}/descriptors"],
                scores=z[f"{i}/scores"], image_size=(int(w), int(h)))
    return out


def _save_matches(path: Path, matches: dict[tuple[str, str], np.ndarray]) -> None:
    arrays = {"count": np.array(len(matches))}
    for i, ((a, b), m) in enumerate(matches.items()):
        arrays[f"{i}/pair"] = np.array([a, b])
        arrays[f"{i}/indices"] = np.asarray(m, dtype=np.int64).reshape(-1, 2)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_matches(path: Path) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for i in range(int(z["count"])):
            a, b = (str(s) for s in z[f"{i}/pair"])
            out[(a, b)] = z[f"{i}/indices"]
    return out


def labelled_from_labels(frames: list[Frame], feats: dict[str, Any],
                         labels: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[LabelledImage]:
    out = []
    for frame in frames:
        f = feats[frame.name]
        pts, valid = labels[frame.name]
        out.append(LabelledImage(
            name=frame.name, keypoints=f.keypoints.astype(np.float32), descriptors=f.descriptors.astype(np.float32),
            points3D=np.nan_to_num(pts.astype(np.float32)), valid=valid.astype(bool),
            camera=frame.camera, T_world_cam=frame.T_world_cam, source="real"))
    return out


def resolve_label_mode(labels: str, frames: list[Frame]) -> str:
    """``auto`` becomes ``depth`` when every mapping frame has a depth image (dense labels, no
    matching stage), else ``triangulation``; the other modes stay as they are."""
    if labels != "auto":
        return labels
    return "depth" if frames and all(f.depth_path is not None for f in frames) else "triangulation"


def merge_labels(primary: tuple[np.ndarray, np.ndarray], secondary: tuple[np.ndarray, np.ndarray]):
    """Primary labels where valid, else secondary's (used for labels='both')."""
    p, pv = primary
    s, sv = secondary
    pts = np.where(pv[:, None], p, s)
    return pts, pv | sv


# --------------------------------------------------------------------------- the pipeline
#
# ``build_map`` is the sequence features -> labels -> augmentation -> synthesis -> training -> bundle.
# Each stage is a function of its inputs and the BuildConfig, owns its cache key (its inputs' keys
# and the settings that change its output) and runs through the StageRunner, which skips it when
# the work directory already holds its output for that key.

@dataclass
class MappingFrames:
    frames: list[Frame]
    key: str  # names, poses and cameras: what every later key starts from


@dataclass
class ExtractedFeatures:
    by_name: dict[str, Any]  # frame name -> d2s_nerf_ros.features.base.Features
    key: str


@dataclass
class RealLabels:
    images: list[LabelledImage]  # one per mapping frame, its keypoints labelled with 3D points
    mode: str                    # the resolved label mode
    key: str

    @property
    def n_labelled(self) -> int:
        return int(sum(im.n_valid for im in self.images))


@dataclass
class Augmentation:
    images: list[LabelledImage]
    config: Any  # offline.augment.AugmentConfig; part of the training key even when no copies are made


@dataclass
class Synthesis:
    images: list[LabelledImage]
    stats: dict[str, Any]  # "key" is the stage's cache key when synthesis ran

    @property
    def key(self) -> str | None:
        return self.stats.get("key")


@dataclass
class Training:
    model: Any  # d2s_nerf_ros.models.d2s.D2SNet
    config: Any  # offline.train_d2s.D2STrainConfig
    history: list[dict[str, Any]]
    curves: list[dict[str, Any]]  # learning curves (offline.train_d2s), also in learning_curves.json
    iterations_planned: int  # the schedule's length (fitted to train_minutes when given)
    step_seconds: float | None  # the measured step time a wall-clock budget planned with
    validation_frames: list[str]  # non-mapping frames the curves were measured on (never scored as queries)

    @property
    def final_loss(self) -> float | None:
        return float(self.history[-1]["loss"]) if self.history else None


def build_map(frameset: FrameSet, out: Path, config: BuildConfig, work_dir: Path | None = None,
              log: Callable[[str], None] = print, progress: bool = True,
              query_frames: list[Frame] | None = None) -> BuildSummary:
    """Build a map bundle at ``out`` from posed frames (already selected or selected here)."""
    import torch

    from d2s_nerf_ros.features import make_extractor

    config.validate()
    out = Path(out)
    work_dir = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    runner = StageRunner(work_dir, log=log)
    torch.manual_seed(config.seed)

    mapping = mapping_frames_stage(frameset, config, work_dir)
    extractor = make_extractor(config.extractor.name, max_keypoints=config.extractor.max_keypoints,
                               device=config.device, resize_max=config.extractor.resize_max,
                               backend=config.extractor_backend, num_threads=config.extractor_threads)
    features = features_stage(runner, mapping, extractor, progress)
    labels = labels_stage(runner, config, mapping, features, log)
    augmentation = augmentation_stage(runner, config, mapping, labels, extractor)
    synthesis = synthesis_stage(runner, config, mapping, labels, extractor, log)
    validation_frames = validation_frames_stage(frameset, mapping, config)
    training = training_stage(runner, config, labels, augmentation, synthesis, extractor, validation_frames,
                              progress, log)
    return bundle_stage(runner, config, out, mapping, extractor, labels, augmentation, synthesis, training,
                        query_frames, all_frames=list(frameset.frames), log=log)


def mapping_frames_stage(frameset: FrameSet, config: BuildConfig, work_dir: Path) -> MappingFrames:
    """The mapping frames (``--fraction``/``--every``), checked, and saved in the work directory."""
    mapping = select_mapping_frames(frameset, config.fraction, config.every)
    frames = list(mapping.frames)
    if len(frames) < 2:
        raise ValueError(f"a map needs at least 2 mapping frames, got {len(frames)}")
    cameras = {(f.camera.width, f.camera.height) for f in frames}
    if len(cameras) != 1:
        raise ValueError(f"all mapping frames must share one image size, got {sorted(cameras)}")
    mapping.save(Path(work_dir) / "mapping_frames.json")
    return MappingFrames(frames, fingerprint([(f.name, f.T_world_cam, f.camera.to_dict()) for f in frames]))


def features_stage(runner: StageRunner, mapping: MappingFrames, extractor, progress: bool = True) -> ExtractedFeatures:
    """Local features of every mapping frame (``features/features.npz``)."""
    from offline.progress import progress_bar

    def compute(d: Path) -> dict[str, Any]:
        feats = {frame.name: extractor.extract(frame.load_rgb())
                 for frame in progress_bar(mapping.frames, desc="features", unit="frame", enabled=progress)}
        _save_features(d / "features.npz", feats)
        return feats

    key = fingerprint(mapping.key, extractor.config())
    return ExtractedFeatures(runner.run("features", key, compute, lambda d: _load_features(d / "features.npz")), key)


def labels_stage(runner: StageRunner, config: BuildConfig, mapping: MappingFrames, features: ExtractedFeatures,
                 log: Callable[[str], None] = print) -> RealLabels:
    """A 3D point per keypoint of every mapping frame, where one can be found: triangulated from
    matches between neighbouring frames (pycolmap), read from depth images, or both."""
    from offline.pairs import PairsConfig
    from offline.triangulation import TriangulationConfig

    frames = mapping.frames
    label_mode = resolve_label_mode(config.labels, frames)
    if label_mode != config.labels:
        log(f"labels: {config.labels} -> {label_mode}")
    if label_mode in ("depth", "both") and any(f.depth_path is None for f in frames):
        raise ValueError(f"labels={label_mode!r} needs depth images, and this source has none; use --labels triangulation")
    pairs_cfg = PairsConfig(num_neighbours=config.num_pair_neighbours)
    tri_cfg = TriangulationConfig()
    labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if label_mode in ("triangulation", "both"):
        labels = _triangulation_labels(runner, config, frames, features, pairs_cfg, tri_cfg)
    if label_mode in ("depth", "both"):
        dlabels = _depth_labels(runner, frames, features)
        labels = {n: merge_labels(labels[n], dlabels[n]) for n in dlabels} if labels else dlabels

    real = RealLabels(labelled_from_labels(frames, features.by_name, labels), label_mode,
                      fingerprint(features.key, label_mode, config.matcher, pairs_cfg, tri_cfg))
    log(f"labelled keypoints: {real.n_labelled} of {sum(len(im.valid) for im in real.images)} "
        f"in {len(real.images)} frames")
    if real.n_labelled == 0:
        raise ValueError("no keypoint got a 3D label: the mapping frames do not overlap enough (try more frames)")
    return real


def _triangulation_labels(runner: StageRunner, config: BuildConfig, frames: list[Frame], features: ExtractedFeatures,
                          pairs_cfg, tri_cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Matches between each frame and its nearest neighbours (``matches``), then points
    triangulated with the known poses (``triangulation``): two cached stages."""
    from offline.matching import make_matcher, match_pairs
    from offline.pairs import select_pairs
    from offline.triangulation import triangulate_labels

    def compute_matches(d: Path) -> dict[tuple[str, str], np.ndarray]:
        matcher = make_matcher(config.matcher, config.extractor.name, device=config.device)
        results = match_pairs(select_pairs(frames, pairs_cfg), features.by_name, matcher)
        matches = {k: v.indices for k, v in results.items()}
        _save_matches(d / "matches.npz", matches)
        return matches

    match_key = fingerprint(features.key, pairs_cfg, config.matcher)
    matches = runner.run("matches", match_key, compute_matches, lambda d: _load_matches(d / "matches.npz"))

    def compute_points(d: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        keypoints = {n: f.keypoints for n, f in features.by_name.items()}
        tri_labels, _ = triangulate_labels(frames, keypoints, matches, tri_cfg, d / "colmap")
        _save_label_arrays(d, tri_labels)
        return tri_labels

    return runner.run("triangulation", fingerprint(match_key, tri_cfg), compute_points, _load_label_arrays)


def _depth_labels(runner: StageRunner, frames: list[Frame],
                  features: ExtractedFeatures) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each keypoint back-projected with its frame's depth image (``depth_labels``)."""
    from offline.depth_labels import depth_labels

    def compute(d: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {f.name: depth_labels(f, features.by_name[f.name].keypoints) for f in frames}
        _save_label_arrays(d, out)
        return out

    return runner.run("depth_labels", fingerprint(features.key, "depth"), compute, _load_label_arrays)


def augmentation_stage(runner: StageRunner, config: BuildConfig, mapping: MappingFrames, labels: RealLabels,
                       extractor) -> Augmentation:
    """Photometric and geometric copies of the labelled mapping frames, re-extracted (``augmentation``)."""
    from offline.augment import AugmentConfig, augment_images

    aug_cfg = AugmentConfig(n_per_image=config.augment_per_image, seed=config.seed)
    if config.augment_per_image <= 0:
        return Augmentation([], aug_cfg)

    def compute(d: Path) -> list[LabelledImage]:
        images = augment_images(list(zip(mapping.frames, labels.images)), extractor, aug_cfg)
        save_labelled(d / "augmented.npz", images)
        return images

    images = runner.run("augmentation", fingerprint(labels.key, aug_cfg), compute,
                        lambda d: load_labelled(d / "augmented.npz"))
    return Augmentation(images, aug_cfg)


def synthesis_stage(runner: StageRunner, config: BuildConfig, mapping: MappingFrames, labels: RealLabels,
                    extractor, log: Callable[[str], None] = print) -> Synthesis:
    """Labelled synthetic views between the mapping frames (``offline.synthesis.stage``): NeRF
    renders (stage ``synthesis``) or RGB-D warps (stage ``synthesis-rgbd-warp``)."""
    if not config.synthesis:
        return Synthesis([], {"enabled": False})
    from offline.matching import make_matcher
    from offline.synthesis.stage import run_synthesis, synthesis_config_for_profile

    frames = mapping.frames
    syn_cfg = synthesis_config_for_profile(config.profile, labels=config.synthetic_labels,
                                           nerf_iterations=config.nerf_iterations, seed=config.seed,
                                           device=config.device, keep_fraction=config.synthesis_keep_fraction,
                                           max_poses=config.synthesis_max_poses,
                                           cpu_threads=config.train_threads)
    if config.synthesis_renderer == "rgbd-warp":
        from offline.synthesis.rgbd_warp import RGBDWarpRenderer

        stage = "synthesis-rgbd-warp"  # its own directory: the NeRF and its renders stay cached beside it
        renderers = [RGBDWarpRenderer(frames)]  # refuses, naming them, mapping frames without depth
        # Warping real pixels costs milliseconds: render at the camera's full resolution.
        syn_cfg.render_fraction = 1.0
        # The stage's name is part of its key; the nerfacto stage's key predates other renderers.
        key = fingerprint(labels.key, syn_cfg, stage)
    else:
        stage, renderers = "synthesis", None  # nerfacto, trained by run_synthesis
        key = fingerprint(labels.key, syn_cfg)
    matcher = make_matcher(config.matcher, config.extractor.name, device=config.device)
    real_by_name = {im.name: im for im in labels.images}

    def compute(d: Path) -> tuple[list[LabelledImage], dict[str, Any]]:
        res = run_synthesis(frames, real_by_name, extractor, matcher, renderers, syn_cfg, d, log=log)
        save_labelled(d / "synthetic.npz", res.images)
        write_json_atomic(d / "synthesis_stats.json", res.stats)
        return res.images, res.stats

    def load(d: Path) -> tuple[list[LabelledImage], dict[str, Any]]:
        return load_labelled(d / "synthetic.npz"), json.loads((d / "synthesis_stats.json").read_text())

    images, stats = runner.run(stage, key, compute, load)
    stats = dict(stats)
    stats.update({"enabled": True, "key": key, "n_synthetic_images": len(images), "labels": config.synthetic_labels,
                  "renderer": config.synthesis_renderer})
    return Synthesis(images, stats)


def validation_frames_stage(frameset: FrameSet, mapping: MappingFrames, config: BuildConfig) -> list[Frame]:
    """Non-mapping frames held out for the learning curves (``evaluate`` never scores them)."""
    from offline.validation import select_validation_frames

    return select_validation_frames(list(frameset.frames), {f.name for f in mapping.frames}, config.validation_frames)


def training_stage(runner: StageRunner, config: BuildConfig, labels: RealLabels, augmentation: Augmentation,
                   synthesis: Synthesis, extractor, validation_frames: list[Frame], progress: bool = True,
                   log: Callable[[str], None] = print) -> Training:
    """D2S trained on the real, augmented and synthetic labelled images, in ``train-<key>/``
    (``offline.train_d2s`` checkpoints and resumes inside it)."""
    import torch

    from d2s_nerf_ros.device import resolve_device
    from d2s_nerf_ros.models.d2s import D2SConfig
    from offline.train_d2s import D2STrainConfig, train_d2s
    from offline.validation import validation_images

    device = resolve_device(config.device)
    synthetic = synthesis.images
    model_cfg = D2SConfig(descriptor_dim=extractor.descriptor_dim, n_layers=config.model_layers,
                          head_dims=config.model_head_dims)
    train_cfg = D2STrainConfig(
        iterations=config.train_iterations, images_per_batch=config.train_images_per_batch,
        max_keypoints_per_image=config.train_keypoints_per_image, lr=config.train_lr,
        synthetic_ratio=config.synthetic_ratio if synthetic else 0.0,
        synthetic_unlabelled=config.synthetic_unlabelled if synthetic else "unreliable",
        seed=config.seed if config.train_seed is None else config.train_seed, device=str(device),
        train_minutes=config.train_minutes, lr_schedule=config.train_lr_schedule,
        loss_reduction=config.train_loss_reduction,
        early_images_per_batch=config.train_early_batch[0] if config.train_early_batch else None,
        early_keypoints_per_image=config.train_early_batch[1] if config.train_early_batch else None,
        head_warmup_iterations=config.train_head_warmup, head_warmup_batch=config.train_head_warmup_batch,
        descriptor_noise=config.train_descriptor_noise, reprojection_keypoints=config.train_reprojection_keypoints,
        reprojection_weight=config.train_reprojection_weight)
    key = fingerprint(labels.key, augmentation.config, synthesis.key, model_cfg, train_cfg)
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and config.train_threads:
        torch.set_num_threads(config.train_threads)
    try:
        validation = validation_images(validation_frames, extractor, runner.work_dir / "query_features",
                                       device.type, log)
        result = train_d2s(labels.images + augmentation.images, train_cfg, model_cfg, runner.work_dir / f"train-{key}",
                           synthetic=synthetic or None, progress=progress, validation=validation)
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - t0
    # The training's own clock (kept across resumes): a rerun served from a finished checkpoint
    # reports what the training took, and says it was cached.
    history = result.history
    trained_s = float(history[-1].get("seconds", elapsed)) if history else elapsed
    runner.timings_s["training"] = max(elapsed, trained_s)
    runner.cached["training"] = elapsed < 0.5 * trained_s
    write_json_atomic(runner.work_dir / "training_history.json", history)
    write_json_atomic(runner.work_dir / "learning_curves.json", result.curves)
    return Training(result.model, train_cfg, history, result.curves, result.iterations_planned, result.step_seconds,
                    [f.name for f in validation_frames])


def bundle_stage(runner: StageRunner, config: BuildConfig, out: Path, mapping: MappingFrames, extractor,
                 labels: RealLabels, augmentation: Augmentation, synthesis: Synthesis, training: Training,
                 query_frames: list[Frame] | None = None, all_frames: list[Frame] | None = None,
                 log: Callable[[str], None] = print) -> BuildSummary:
    """The map bundle at ``out`` with its report (``offline.report``), written once and complete; its error
    model (pose covariance) is measured on posed frames of ``all_frames`` that are not mapping frames."""
    from safetensors.numpy import save as safetensors_bytes

    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.report import write_report

    frames, work_dir = mapping.frames, runner.work_dir
    training_info = {"config": to_jsonable(training.config), "final_loss": training.final_loss,
                     "n_real_images": len(labels.images), "n_augmented_images": len(augmentation.images),
                     "n_synthetic_images": len(synthesis.images), "n_labelled_keypoints": labels.n_labelled,
                     "iterations_planned": training.iterations_planned, "step_seconds": training.step_seconds,
                     "validation_frames": training.validation_frames,
                     "build": to_jsonable(config)}
    bundle = MapBundle.create(
        model=training.model, extractor=extractor.config(), camera=frames[0].camera,
        frames=[{"name": f.name, "T_world_cam": f.T_world_cam.tolist()} for f in frames],
        training=training_info, synthesis=synthesis.stats,
        metrics={"timings_s": dict(runner.timings_s), "cached": dict(runner.cached)})
    bundle.add_file("map_points.safetensors", safetensors_bytes(_map_points_arrays(labels.images)))
    # The report reads a saved bundle (it may localise the query frames with it), so the bundle is
    # staged in the work directory first; OUT is then written once, complete with its report:
    # a failure anywhere leaves either the previous map or none there, never one without a report.
    # Named after OUT: builds of other maps that share this work directory stage beside it.
    staged = bundle.save(work_dir / f"{STAGED_BUNDLE}-{out.name}")
    _add_error_model(bundle, staged, all_frames or [], {f.name for f in frames}, config, log)
    report = write_report(staged, work_dir / "report.html", frames, labels.images, training.history, synthesis.stats,
                          query_frames=query_frames, map_name=out.name, learning_curves=training.curves)
    bundle.add_file("report.html", report)
    bundle.save(out)
    shutil.rmtree(staged, ignore_errors=True)
    return BuildSummary(out, work_dir, len(frames), labels.n_labelled, len(augmentation.images), len(synthesis.images),
                        training.final_loss, dict(runner.timings_s), dict(runner.cached))


def _save_label_arrays(d: Path, labels: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    arrays = {}
    for name, (pts, valid) in labels.items():
        arrays[f"{name}::points3D"] = pts
        arrays[f"{name}::valid"] = valid
    np.savez(d / "labels.npz", **arrays)


def _add_error_model(bundle, staged: Path, all_frames: list[Frame], mapping_names: set[str], config: BuildConfig,
                     log: Callable[[str], None]) -> None:
    """Measure the staged map's error model on held-out posed frames and put it in ``bundle``."""
    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from offline.error_model_fit import calibration_frames, fit_error_model

    held_out = calibration_frames(all_frames, mapping_names, config.error_model_frames)
    if not held_out:
        log("error model: no posed frames outside the mapping selection; the map gets the fallback model "
            "(d2s_nerf_ros/error_model.py); `d2s-nerf calibrate` can measure one later")
        return
    try:
        # The build's own runtime choices (device, extractor backend, threads) also serve this pass.
        localizer = Localizer.from_path(staged, LocalizerConfig(device=config.device,
                                                                extractor_backend=config.extractor_backend,
                                                                num_threads=config.extractor_threads))
        model = fit_error_model(localizer, held_out, log)
    except ValueError as exc:
        log(f"error model: {exc}; the map gets the fallback model")
        return
    bundle.set_error_model(model)


def _load_label_arrays(d: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, list] = {}
    with np.load(d / "labels.npz", allow_pickle=False) as z:
        for key in z.files:
            name, kind = key.rsplit("::", 1)
            out.setdefault(name, [None, None])[0 if kind == "points3D" else 1] = z[key]
    return {k: (v[0], v[1]) for k, v in out.items()}


def _map_points_arrays(real: list[LabelledImage]) -> dict[str, np.ndarray]:
    """Labelled mapping keypoints stored in the bundle: the structure-based baseline and
    the report read them; the onboard localizer does not need them."""
    arrays = {}
    for i, im in enumerate(real):
        arrays[f"{i}.keypoints"] = im.keypoints.astype(np.float32)
        arrays[f"{i}.descriptors"] = im.descriptors.astype(np.float16)
        arrays[f"{i}.points3D"] = im.points3D.astype(np.float32)
        arrays[f"{i}.valid"] = im.valid.astype(np.uint8)
    return arrays
