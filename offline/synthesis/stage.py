"""The descriptor-synthesis stage: [NeRF] -> novel poses -> renders -> features -> filter -> labels.

Work directory layout (everything resumable; a rerun with the same inputs reuses it):
```
WORK/
  nerf/                      nerfacto checkpoint + state (when no renderers are given)
  renders/index.json         the novel poses, their pair and s, the renderer used
  renders/00000.png          render RGB
  renders/00000.depth.npy    z-depth (map units), float32
  renders/00000.acc.npy      accumulation, float32
  synthetic.npz              the kept, labelled renders (offline.labelled.save_labelled)
  synthesis_stats.json       counts, match histogram, time per step
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.labelled import LabelledImage, load_labelled, save_labelled
from offline.stages import fingerprint, write_json_atomic
from offline.nerf.nerfacto import NerfactoConfig
from offline.nerf.renderer import RenderResult, Renderer, choose_renderer
from offline.sources.frames import Frame, even_indices
from offline.synthesis.filtering import FilterConfig, FilterResult, features_of_labelled, filter_renders, match_render
from offline.synthesis.labels import SyntheticLabelConfig, synthetic_labels
from offline.synthesis.novel_poses import NovelPoseConfig, novel_poses

STATS_FILE = "synthesis_stats.json"
SYNTHETIC_FILE = "synthetic.npz"


@dataclass
class SynthesisConfig:
    nerf: NerfactoConfig = field(default_factory=NerfactoConfig)
    poses: NovelPoseConfig = field(default_factory=NovelPoseConfig)
    render_fraction: float = 0.25          # of the reference camera's resolution
    # Extract features on the render resized back to the mapping camera's resolution, so the
    # synthetic descriptors see the same scale as the real ones D2S is queried with.
    extract_at_camera_resolution: bool = True
    max_poses: int | None = None           # an even subsample of the novel poses, for a time budget
    filter: FilterConfig = field(default_factory=FilterConfig)
    labels: SyntheticLabelConfig = field(default_factory=SyntheticLabelConfig)
    render_device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.render_fraction <= 1.0:
            raise ValueError(f"render_fraction must be in (0, 1], got {self.render_fraction}")
        if self.max_poses is not None and self.max_poses < 1:
            raise ValueError(f"max_poses must be >= 1, got {self.max_poses}")


def synthesis_config_for_profile(profile: str, labels: str = "matches", nerf_iterations: int | None = None,
                                 seed: int = 0, device: str = "auto", keep_fraction: float | None = None,
                                 max_poses: int | None = None, cpu_threads: int | None = None) -> SynthesisConfig:
    """``fast``: reduced nerfacto, renders at 1/4 resolution, at most 60 novel views, keep
    threshold 6 % of the keypoint budget; ``paper``: nerfacto defaults, full resolution, every
    novel view, the paper's threshold (500 of 4096 keypoints, ~12 %).

    Why the fast threshold is lower: features extracted on a 1/4-resolution render (upsampled to
    the camera's size) match their reference far less often than on a full-resolution render;
    with the paper's 12 % about 90 % of such renders were dropped on RedKitchen.

    The filter threshold is a fraction of the extractor's keypoint budget, read from the extractor
    at run time (the budget is in the stage key through the labels' key).
    """
    if profile not in ("fast", "paper"):
        raise ValueError(f"unknown profile {profile!r}; known: fast, paper")
    nerf = NerfactoConfig(profile=profile, iterations=nerf_iterations, seed=seed, device=device,
                          cpu_threads=cpu_threads)
    return SynthesisConfig(
        nerf=nerf,
        poses=NovelPoseConfig(k_neighbours=2, samples_per_pair=10),
        render_fraction=0.25 if profile == "fast" else 1.0,
        # 60, not 150: on RedKitchen (20 frames) 150 views (88 kept) trained no better than 60 (36
        # kept) and cost 9 more minutes of rendering and matching on 2 CPU cores (docs/BENCHMARKS.md).
        max_poses=max_poses if max_poses is not None else (60 if profile == "fast" else None),
        filter=FilterConfig(keep_fraction=keep_fraction if keep_fraction is not None
                            else (0.06 if profile == "fast" else 0.12)),
        labels=SyntheticLabelConfig(mode=labels),
        render_device=device,
    )


@dataclass
class SynthesisResult:
    images: list[LabelledImage]
    stats: dict[str, Any]


def _config_key(frames: Sequence[Frame], config: SynthesisConfig, renderer_names: Sequence[str],
                ignore: Sequence[str] = ()) -> str:
    """A key for what ``config`` (minus the fields in ``ignore``) computes from these frames and
    renderers; the device and thread count change speed, not results, and never count."""
    cfg = dataclasses.asdict(config)
    for name in ("render_device", *ignore):
        cfg.pop(name)
    cfg["nerf"].pop("device")
    cfg["nerf"].pop("cpu_threads")
    doc = {"config": cfg, "renderers": list(renderer_names),
           "frames": [[f.name, np.round(np.asarray(f.T_world_cam, dtype=np.float64), 9).tolist()] for f in frames]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _result_key(config_key: str, extractor, matcher, references: Sequence[LabelledImage]) -> str:
    """``config_key`` extended by the extractor's and matcher's settings and a digest of the
    reference labels (names, keypoints, descriptors, 3D points, validity)."""
    digest = hashlib.sha256()
    for ref in references:
        digest.update(ref.name.encode())
        for array in (ref.keypoints, ref.descriptors, ref.points3D, ref.valid):
            digest.update(np.ascontiguousarray(array).tobytes())
    return fingerprint(config_key, extractor.config(), matcher.config(), digest.hexdigest())


# What the renders depend on: not the filter or the labels, so an ablation over label modes or
# keep thresholds renders once.
RENDER_INDEPENDENT_FIELDS = ("filter", "labels", "extract_at_camera_resolution")


def _save_render_features(path: Path, key: str, feats, matches: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, key=np.array(key), keypoints=feats.keypoints, descriptors=feats.descriptors,
             scores=feats.scores, image_size=np.array(feats.image_size), matches=np.asarray(matches, np.int64))
    os.replace(tmp, path)


def _load_render_features(path: Path, key: str):
    from d2s_nerf_ros.features.base import Features

    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            w, h = (int(v) for v in z["image_size"])
            return Features(z["keypoints"], z["descriptors"], z["scores"], (w, h)), z["matches"].reshape(-1, 2)
    except (OSError, ValueError, KeyError):
        return None  # a torn or foreign file: extract again


def _save_render(stem: Path, result: RenderResult) -> None:
    import cv2

    # Depth and accumulation first, RGB last: the PNG's presence marks a complete render.
    for suffix, array in ((".depth.npy", result.depth_m), (".acc.npy", result.accumulation)):
        tmp = stem.with_name(stem.name + suffix + ".tmp.npy")
        np.save(tmp, np.asarray(array, dtype=np.float32))
        os.replace(tmp, stem.with_name(stem.name + suffix))
    tmp = stem.with_name(stem.name + ".tmp.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(result.rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {tmp}")
    os.replace(tmp, stem.with_suffix(".png"))


def _load_render(stem: Path) -> RenderResult | None:
    import cv2

    png = stem.with_suffix(".png")
    depth, acc = stem.with_name(stem.name + ".depth.npy"), stem.with_name(stem.name + ".acc.npy")
    if not (png.exists() and depth.exists() and acc.exists()):
        return None
    bgr = cv2.imread(str(png), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    return RenderResult(rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                        depth_m=np.load(depth, allow_pickle=False), accumulation=np.load(acc, allow_pickle=False))


@dataclass
class RenderedViews:
    """The renders step's output: per novel pose, its index entry, render and render camera."""

    entries: list[dict[str, Any]]   # renders/index.json's "poses"
    renders: list[RenderResult]
    cameras: list[CameraIntrinsics]
    n_new: int                      # rendered now (the rest came from renders/)
    seconds: list[float]            # per new render


def run_synthesis(
    mapping_frames: Sequence[Frame],
    real_labelled: dict[str, LabelledImage],
    extractor,
    matcher,
    renderers: Sequence[Renderer] | None,
    config: SynthesisConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> SynthesisResult:
    """Synthetic labelled images from novel views between the mapping frames:
    poses -> renders -> features -> filter -> labels.

    ``renderers`` None: one nerfacto is trained on all mapping frames (in ``work_dir/nerf``).
    ``real_labelled`` holds the mapping frames' labelled keypoints (the references).
    """
    frames = list(mapping_frames)
    missing = [f.name for f in frames if f.name not in real_labelled]
    if missing:
        raise ValueError(f"no labelled keypoints for mapping frames: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    stats: dict[str, Any] = {}

    t0 = time.perf_counter()
    if renderers is None:
        renderers, stats["nerf"] = nerfacto_renderers(frames, config, work_dir / "nerf", log)
    renderers = list(renderers)
    if not renderers:
        raise ValueError("synthesis needs at least one renderer")
    timings["nerf_s"] = time.perf_counter() - t0

    # The finished result also depends on what the renders are matched with and to: the extractor
    # and matcher, and the real labelled keypoints (a work directory reused with another extractor
    # or label mode must not get the other one's synthetic descriptors). The renders do not.
    key = _result_key(_config_key(frames, config, [r.name for r in renderers]), extractor, matcher,
                      [real_labelled[f.name] for f in frames])
    done = _finished_result(work_dir, key)
    if done is not None:
        log(f"[synthesis] cached in {work_dir}")
        return done

    t0 = time.perf_counter()
    poses, n_all = plan_poses(frames, config)
    timings["poses_s"] = time.perf_counter() - t0
    log(f"[synthesis] {n_all} novel poses ({len(poses)} used) from {len(frames)} mapping frames")

    t0 = time.perf_counter()
    render_key = _config_key(frames, config, [r.name for r in renderers], ignore=RENDER_INDEPENDENT_FIELDS)
    views = render_views(poses, frames, renderers, config, work_dir / "renders", render_key, log)
    timings["render_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    matched, feature_cameras = render_features(views, frames, real_labelled, extractor, matcher, config,
                                               work_dir / "renders", log)
    filtered = filter_renders(matched, extractor.max_keypoints, config.filter, names=[p.name for p in poses],
                              reference_names=[e["reference"] for e in views.entries])
    kept = [i for i, r in enumerate(filtered.renders) if r.decision.kept]
    timings["filter_s"] = time.perf_counter() - t0
    counts = [d.n_matches for d in filtered.decisions]
    log(f"[synthesis] kept {len(kept)}/{len(poses)} renders (>= {filtered.threshold} matches; median "
        f"{np.median(counts) if counts else 0:.0f})")

    t0 = time.perf_counter()
    images, label_totals = label_renders(kept, poses, views, filtered, feature_cameras, real_labelled, config)
    timings["labels_s"] = time.perf_counter() - t0

    by_name = {f.name: f for f in frames}
    render_dir = work_dir / "renders"
    stats.update({
        "key": key,
        "n_poses": len(poses),
        "n_poses_before_cap": n_all,
        "n_rendered": len(views.renders),
        "n_rendered_now": views.n_new,
        "n_kept": len(images),
        "keep_threshold": filtered.threshold,
        "match_count_histogram": filtered.histogram,
        "match_count_median": float(np.median(counts)) if counts else 0.0,
        "render_seconds_mean": float(np.mean(views.seconds)) if views.seconds else None,
        "render_size": [views.cameras[0].width, views.cameras[0].height] if views.cameras else None,
        "label_mode": config.labels.mode,
        "labels": label_totals,
        "n_valid_keypoints": int(sum(im.n_valid for im in images)),
        "renderers": {r.name: sum(e["renderer"] == r.name for e in views.entries) for r in renderers},
        "decisions": [dataclasses.asdict(d) for d in filtered.decisions],
        "match_counts": [int(c) for c in counts],
        # For the map report: where the kept views are, and a few real/render pairs to look at.
        "kept_positions": [np.asarray(views.entries[i]["T_world_cam"], dtype=float)[:3, 3].tolist() for i in kept],
        "samples": [{"reference_image": str(by_name[views.entries[i]["reference"]].image_path),
                     "render_image": str(render_dir / f"{views.entries[i]['file']}.png"),
                     "s": float(views.entries[i]["s"]), "matches": int(counts[i])}
                    for i in [kept[j] for j in even_indices(len(kept), fraction=min(1.0, 3 / len(kept)))]]
                   if kept else [],
        "timings_s": timings,
    })
    save_labelled(work_dir / SYNTHETIC_FILE, images)
    write_json_atomic(work_dir / STATS_FILE, stats)
    log(f"[synthesis] {len(images)} synthetic images, {stats['n_valid_keypoints']} labelled keypoints")
    return SynthesisResult(images, stats)


def nerfacto_renderers(frames: list[Frame], config: SynthesisConfig, nerf_dir: Path,
                       log: Callable[[str], None] = print) -> tuple[list[Renderer], dict[str, Any]]:
    """One nerfacto trained on all mapping frames (resumable in ``nerf_dir``), and its stats."""
    from offline.nerf.nerfacto import train_nerfacto
    from offline.nerf.renderer import NerfactoRenderer

    handle = train_nerfacto(frames, config.nerf, nerf_dir, log=log)
    return [NerfactoRenderer(handle, device=config.render_device, name="nerfacto")], handle.stats()


def _finished_result(work_dir: Path, key: str) -> SynthesisResult | None:
    """The result a finished run with this key left in ``work_dir``, if any."""
    stats_path, synthetic_path = work_dir / STATS_FILE, work_dir / SYNTHETIC_FILE
    if not (stats_path.exists() and synthetic_path.exists()):
        return None
    try:
        done = json.loads(stats_path.read_text())
    except json.JSONDecodeError:
        return None
    return SynthesisResult(load_labelled(synthetic_path), done) if done.get("key") == key else None


def plan_poses(frames: list[Frame], config: SynthesisConfig) -> tuple[list, int]:
    """The novel poses (an even subsample of at most ``config.max_poses``) and how many there were."""
    poses = novel_poses(frames, config.poses)
    n_all = len(poses)
    if config.max_poses is not None and len(poses) > config.max_poses:
        poses = [poses[i] for i in even_indices(len(poses), fraction=config.max_poses / len(poses))]
    return poses, n_all


def render_views(poses: list, frames: list[Frame], renderers: list[Renderer], config: SynthesisConfig,
                 render_dir: Path, render_key: str, log: Callable[[str], None] = print) -> RenderedViews:
    """Each novel pose rendered at ``config.render_fraction`` of its reference camera, cached one
    by one in ``render_dir`` (an interrupted stage resumes where it stopped; renders made for
    another ``render_key`` are removed)."""
    by_name = {f.name: f for f in frames}
    render_dir.mkdir(exist_ok=True)
    index_path = render_dir / "index.json"
    if index_path.exists():
        try:
            old_key = json.loads(index_path.read_text()).get("key")
        except json.JSONDecodeError:
            old_key = None
        if old_key != render_key:
            for p in render_dir.iterdir():
                p.unlink()
    entries = []
    for i, pose in enumerate(poses):
        which = choose_renderer(renderers, pose.T_world_cam, (pose.frame_a, pose.frame_b))
        entries.append({"file": f"{i:05d}", "name": pose.name, "frame_a": pose.frame_a, "frame_b": pose.frame_b,
                        "s": pose.s, "reference": pose.reference_frame, "renderer": renderers[which].name,
                        "T_world_cam": pose.T_world_cam.tolist()})
    write_json_atomic(index_path, {"key": render_key, "poses": entries})

    views = RenderedViews(entries, [], [], 0, [])
    for i, (pose, entry) in enumerate(zip(poses, entries)):
        ref_cam = by_name[entry["reference"]].camera
        cam = ref_cam.scaled_to(max(8, round(ref_cam.width * config.render_fraction)),
                                max(8, round(ref_cam.height * config.render_fraction)))
        views.cameras.append(cam)
        stem = render_dir / entry["file"]
        result = _load_render(stem)
        if result is None or result.rgb.shape[:2] != (cam.height, cam.width):
            renderer = next(r for r in renderers if r.name == entry["renderer"])
            result = renderer.render(pose.T_world_cam, cam)
            _save_render(stem, result)
            views.n_new += 1
            views.seconds.append(result.seconds)
            if views.n_new % 10 == 0 or i == len(poses) - 1:
                log(f"[synthesis] rendered {i + 1}/{len(poses)} ({np.mean(views.seconds):.2f} s each)")
        views.renders.append(result)
    return views


def render_features(views: RenderedViews, frames: list[Frame], real_labelled: dict[str, LabelledImage], extractor,
                    matcher, config: SynthesisConfig, render_dir: Path, log: Callable[[str], None] = print,
                    ) -> tuple[list[tuple[Any, np.ndarray]], list[CameraIntrinsics]]:
    """The map's extractor on each render, matched to its reference frame (``match_render``);
    returns each render's features and matches, and the camera its features are in.

    Cached per render (keyed by extractor and matcher, not by the filter or labels), so another
    keep threshold or label mode reuses them.
    """
    import cv2

    by_name = {f.name: f for f in frames}
    features_key = fingerprint(extractor.config(), matcher.config(), config.extract_at_camera_resolution)
    ref_features = {name: features_of_labelled(im) for name, im in real_labelled.items()}
    matched, feature_cameras = [], []
    n_extracted = 0
    for i, (entry, result) in enumerate(zip(views.entries, views.renders)):
        ref_cam = by_name[entry["reference"]].camera
        feat_cam = views.cameras[i]
        if config.extract_at_camera_resolution and (feat_cam.width, feat_cam.height) != (ref_cam.width, ref_cam.height):
            feat_cam = ref_cam
        cache_path = render_dir / f"{entry['file']}.features.npz"
        cached = _load_render_features(cache_path, features_key)
        if cached is None:
            image = result.rgb
            if (feat_cam.width, feat_cam.height) != (image.shape[1], image.shape[0]):
                image = cv2.resize(image, (feat_cam.width, feat_cam.height), interpolation=cv2.INTER_CUBIC)
            cached = match_render(image, ref_features[entry["reference"]], extractor, matcher)
            _save_render_features(cache_path, features_key, *cached)
            n_extracted += 1
            if n_extracted % 20 == 0:
                log(f"[synthesis] features and matches for {i + 1}/{len(views.entries)} renders")
        matched.append(cached)
        feature_cameras.append(feat_cam)
    return matched, feature_cameras


def label_renders(kept: list[int], poses: list, views: RenderedViews, filtered: FilterResult,
                  feature_cameras: list[CameraIntrinsics], real_labelled: dict[str, LabelledImage],
                  config: SynthesisConfig) -> tuple[list[LabelledImage], dict[str, int]]:
    """Labelled synthetic images of the kept renders (``offline.synthesis.labels``) and the label counts."""
    images: list[LabelledImage] = []
    label_totals: dict[str, int] = {}
    for i in kept:
        pose, entry, result, match = poses[i], views.entries[i], views.renders[i], filtered.renders[i]
        map_points = None
        if config.labels.mode in ("depth", "both"):
            # The endpoints' triangulated points are the map evidence for this view.
            pts = [real_labelled[n].points3D[real_labelled[n].valid] for n in (pose.frame_a, pose.frame_b)]
            map_points = np.concatenate(pts) if pts else np.zeros((0, 3))
        image, label_stats = synthetic_labels(
            pose.name, match.features.keypoints, match.features.descriptors, feature_cameras[i], pose.T_world_cam,
            real_labelled[entry["reference"]], match.matches, config.labels,
            depth_m=result.depth_m, accumulation=result.accumulation, map_points=map_points)
        images.append(image)
        for k, v in label_stats.items():
            label_totals[k] = label_totals.get(k, 0) + int(v)
    return images, label_totals
