"""``d2s-nerf``: the offline tools (build, evaluate, replay, demo).

Examples::

    d2s-nerf build ../shared/data/7scenes_redkitchen --out maps/redkitchen --fraction 0.04 --no-synthesis
    d2s-nerf evaluate maps/redkitchen ../shared/data/7scenes_redkitchen --out runs/eval --every 10
    d2s-nerf calibrate maps/redkitchen ../shared/data/7scenes_redkitchen      (error model of an older map)
    d2s-nerf replay ../shared/data/7scenes_redkitchen --rate 2 --out runs/replay --every 20
    d2s-nerf demo --work runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

# Spelled out, not imported from d2s_nerf_ros.features: that would load torch for `--help`.
# test_cli_choices_match_the_extractors keeps them in step.
EXTRACTOR_CHOICES = ("aliked", "xfeat", "superpoint", "sift")
BACKEND_CHOICES = ("auto", "torch", "onnxruntime")


def _parse_floats(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    if len(values) != n or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} must be {n} finite comma-separated numbers, got {text!r}")
    return values


def _intrinsics(text: str) -> list[float]:
    return _parse_floats(text, 4, "--intrinsics (fx,fy,cx,cy)")


def _pose_to_camera(text: str) -> np.ndarray:
    """x,y,z,qx,qy,qz,qw (ROS order) of the camera optical frame in the pose's frame."""
    from d2s_nerf_ros.geometry import make_pose, matrix_from_quat_wxyz

    v = _parse_floats(text, 7, "--pose-to-camera (x,y,z,qx,qy,qz,qw)")
    return make_pose(matrix_from_quat_wxyz([v[6], v[3], v[4], v[5]]), v[:3])


def _known_distance(text: str) -> tuple[int, int, float]:
    from offline.sources.rosbag_source import BagSourceError, parse_known_distance

    try:
        return parse_known_distance(text)
    except BagSourceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    value = _parse_floats(text, 1, "--scale")[0]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--scale must be a positive number, got {text!r}")
    return value


def _positive_minutes(text: str) -> float:
    value = _parse_floats(text, 1, "--train-minutes")[0]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--train-minutes must be a positive number, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _early_batch(text: str) -> tuple[int, int]:
    values = _parse_floats(text, 2, "--early-batch (IMAGES,KEYPOINTS)")
    if any(v < 1 or v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"--early-batch takes two positive integers, got {text!r}")
    return int(values[0]), int(values[1])


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bag sources")
    g.add_argument("--image-topic", help="image topic (sensor_msgs/Image or CompressedImage)")
    g.add_argument("--camera-info-topic", help="sensor_msgs/CameraInfo topic")
    g.add_argument("--pose-source", choices=["tf", "topic", "sfm"], default="tf",
                   help="camera poses from /tf, from --pose-topic, or sfm: structure-from-motion on the selected "
                        "images for bags without poses (arbitrary scale unless --scale or --known-distance)")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=_positive_float, metavar="S",
                       help="--pose-source sfm: metres per SfM map unit (translations are multiplied by S)")
    scale.add_argument("--known-distance", type=_known_distance, metavar="I,J,D",
                       help="--pose-source sfm: the cameras of bag images I and J (frame-00000I, frame-00000J) are "
                            "D metres apart; sets the metric scale")
    g.add_argument("--map-frame", default="map", help="TF frame the map is expressed in (pose source tf)")
    g.add_argument("--camera-frame", help="camera optical frame (default: the images' frame_id)")
    g.add_argument("--pose-topic", help="PoseStamped / PoseWithCovarianceStamped / Odometry / TransformStamped topic")
    g.add_argument("--pose-to-camera", type=_pose_to_camera,
                   help="fixed extrinsic x,y,z,qx,qy,qz,qw of the camera optical frame in the pose's frame")
    g.add_argument("--intrinsics", type=_intrinsics, help="fx,fy,cx,cy when the source has no camera info")
    g.add_argument("--rectified", action="store_true",
                   help="the bag's images are rectified: use CameraInfo P (fx, fy, cx, cy) and ignore D")
    g.add_argument("--min-motion", type=float, help="keep a bag frame only after this many metres of motion")


def bag_source_options(args, fraction: float | None = None, every: int | None = None):
    """The bag options of the parsed source arguments (absent ones take their defaults)."""
    from offline.sources import BagSourceOptions

    return BagSourceOptions(
        image_topic=getattr(args, "image_topic", None), camera_info_topic=getattr(args, "camera_info_topic", None),
        pose_source=getattr(args, "pose_source", None) or "tf", map_frame=getattr(args, "map_frame", None) or "map",
        camera_frame=getattr(args, "camera_frame", None), pose_topic=getattr(args, "pose_topic", None),
        pose_to_camera=getattr(args, "pose_to_camera", None), min_motion_m=getattr(args, "min_motion", None),
        scale=getattr(args, "scale", None), known_distance=getattr(args, "known_distance", None),
        rectified=bool(getattr(args, "rectified", False)), fraction=fraction, every=every)


def open_frames(args, source: Path, out_dir: Path, fraction: float | None = None, every: int | None = None):
    from offline.sources import SourceOptions, open_source

    bag = bag_source_options(args, fraction, every)
    intrinsics = getattr(args, "intrinsics", None)
    return open_source(Path(source), Path(out_dir), SourceOptions(bag=bag, intrinsics=tuple(intrinsics) if intrinsics else None))


# --------------------------------------------------------------------------- commands

def build_config_from_args(args) -> "BuildConfig":
    """``build``'s options over its profile's defaults, validated (before any source is read)."""
    from offline.build import ExtractorSettings, profile_config

    config = profile_config(args.profile)
    if args.extractor:
        config.extractor = ExtractorSettings(name=args.extractor, max_keypoints=args.max_keypoints or config.extractor.max_keypoints,
                                             resize_max=config.extractor.resize_max)
    elif args.max_keypoints:
        config.extractor.max_keypoints = args.max_keypoints
    config.fraction, config.every = args.fraction, args.every
    config.extractor_backend, config.extractor_threads = args.extractor_backend, args.num_threads
    if args.num_threads:  # one budget for every CPU stage: also D2S and NeRF training
        config.train_threads = args.num_threads
    if args.synthesis is not None:  # else the profile's choice
        config.synthesis = args.synthesis
    for name in ("labels", "synthetic_labels", "synthetic_unlabelled", "synthesis_renderer", "device", "seed",
                 "train_seed", "matcher"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.train_iterations:
        config.train_iterations = args.train_iterations
    for flag, name in (("train_minutes", "train_minutes"), ("lr_schedule", "train_lr_schedule"),
                       ("train_lr", "train_lr"), ("loss_reduction", "train_loss_reduction"),
                       ("early_batch", "train_early_batch"), ("validation_frames", "validation_frames"),
                       ("head_warmup", "train_head_warmup"), ("head_warmup_batch", "train_head_warmup_batch"),
                       ("model_layers", "model_layers"), ("model_head", "model_head_dims"),
                       ("augment_per_image", "augment_per_image"), ("descriptor_noise", "train_descriptor_noise"),
                       ("reprojection_keypoints", "train_reprojection_keypoints"),
                       ("reprojection_weight", "train_reprojection_weight")):
        if getattr(args, flag) is not None:
            setattr(config, name, getattr(args, flag))
    if args.nerf_iterations:
        config.nerf_iterations = args.nerf_iterations
    if args.synthesis_keep_fraction is not None:
        config.synthesis_keep_fraction = args.synthesis_keep_fraction
    if args.synthesis_max_poses is not None:
        config.synthesis_max_poses = args.synthesis_max_poses
    if args.synthetic_ratio is not None:
        if not 0.0 <= args.synthetic_ratio <= 1.0:
            raise ValueError(f"--synthetic-ratio must be in [0, 1], got {args.synthetic_ratio}")
        config.synthetic_ratio = args.synthetic_ratio
    config.validate()
    return config


def build_work_dir(args) -> Path:
    """``build``'s stage cache: ``--work-dir``, else ``OUT.work`` beside the bundle."""
    out = Path(args.out)
    return Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")


def cmd_build(args) -> int:
    from offline.build import build_map

    config = build_config_from_args(args)
    out = Path(args.out)
    work = build_work_dir(args)
    from offline.sources.rosbag_source import is_bag

    if args.pose_source == "sfm" and is_bag(args.source):
        # SfM poses only the frames it is given: the mapping selection comes before it, not after.
        frameset = open_frames(args, Path(args.source), work / "source", fraction=config.fraction, every=config.every)
        config.fraction = config.every = None
    else:
        frameset = open_frames(args, Path(args.source), work / "source")
    queries = None
    if args.queries:
        queries = _query_frames(args, Path(args.queries), None, args.query_every or 10, work / "queries")
    summary = build_map(frameset, out, config, work_dir=work, progress=not args.quiet, query_frames=queries)
    print("\n".join(summary.lines()))
    return 0


def _query_frames(args, source: Path, map_frame_names: set[str] | None, every: int, work: Path):
    if getattr(args, "pose_source", None) == "sfm":
        raise ValueError(
            "query frames need ground-truth poses in the map's frame; --pose-source sfm makes poses in a frame "
            "(and scale) of their own, so it cannot score queries: use a query source with tf or topic poses"
        )
    frameset = open_frames(args, source, work)
    frames = [f for f in frameset.frames if not map_frame_names or f.name not in map_frame_names]
    if every < 1:
        raise ValueError("--every must be >= 1")
    frames = frames[::every]
    if not frames:
        raise ValueError(f"no query frames left in {source} after removing the map's frames")
    return frames


def cmd_evaluate(args) -> int:
    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.evaluate import evaluate_localizer, plot_error_cdf, write_results

    bundle = MapBundle.load(Path(args.map), device="cpu")
    map_names = {f["name"] for f in bundle.manifest.get("frames", [])}
    # Frames the training watched for its learning curves are not held out either: never scored.
    map_names |= set(bundle.manifest.get("training", {}).get("validation_frames", []))
    out = Path(args.out)
    queries = _query_frames(args, Path(args.query_source), map_names, args.every, out / "source")
    load_input = None
    if args.method == "d2s":
        cfg = LocalizerConfig(device=args.device, extractor_backend=args.extractor_backend, num_threads=args.num_threads)
        if args.reliability_threshold is not None:
            cfg.reliability_threshold = args.reliability_threshold
        for name in ("min_inliers", "min_inlier_ratio"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        if args.max_reprojection_rmse is not None:
            cfg.max_reprojection_rmse_px = args.max_reprojection_rmse
        if args.ransac_threshold is not None:
            cfg.ransac_threshold_px = args.ransac_threshold
        if args.max_distance_to_mapping is not None:
            cfg.max_distance_to_mapping_m = args.max_distance_to_mapping
        method = Localizer.from_path(Path(args.map), cfg)
        method.warmup()
        if args.feature_cache:
            from offline.query_features import cached_features

            feats, stats = cached_features(queries, method.extractor, Path(args.feature_cache), method.device.type,
                                           progress=not args.quiet)
            print(f"query features: {stats.hits} from the cache, {stats.extracted} extracted"
                  + (f", {len(stats.failed)} unreadable" if stats.failed else ""), file=sys.stderr)

            def load_input(frame):
                if frame.name not in feats:
                    raise ValueError(stats.failed.get(frame.name, "no features"))
                return feats[frame.name]

            localize = method.localize_features
    else:
        from offline.baseline import MatchingBaseline, MatchingBaselineConfig

        method = MatchingBaseline(Path(args.map), MatchingBaselineConfig(device=args.device))
    if load_input is None:
        localize = method.localize
    summary, rows = evaluate_localizer(localize, queries, progress=not args.quiet, load_input=load_input)
    summary["method"] = args.method
    summary["map"] = str(args.map)
    write_results(out, summary, rows)
    errors_t = [r["translation_error_m"] for r in rows]
    errors_r = [r["rotation_error_deg"] for r in rows]
    plot_error_cdf(out, [errors_t], [errors_r], [args.method])
    written = json.loads((out / "results.json").read_text())  # inf is written as null there
    print(json.dumps({k: written.get(k) for k in (
        "n_queries", "n_failed", "median_translation_m", "median_translation_ci95_m", "median_rotation_deg",
        "recall_2cm", "recall_5cm", "recall_10cm", "recall_5cm_5deg", "recall_10cm_10deg")}, indent=1))
    return 0


def cmd_calibrate(args) -> int:
    import tempfile

    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.error_model_fit import calibration_frames, fit_error_model

    bundle = MapBundle.load(Path(args.map), device="cpu")
    map_names = {f["name"] for f in bundle.manifest.get("frames", [])}
    with tempfile.TemporaryDirectory(prefix="d2s-calibrate-") as tmp:
        frameset = open_frames(args, Path(args.source), Path(tmp))
        frames = calibration_frames(frameset.frames, map_names, args.frames)
        if not frames:
            raise ValueError(f"{args.source} has no posed frames besides the map's own")
        model = fit_error_model(Localizer(bundle, LocalizerConfig(device=args.device)), frames)
    bundle.set_error_model(model)
    out = bundle.save(Path(args.out) if args.out else Path(args.map))
    print(json.dumps({"map": str(out), "error_model": {k: v for k, v in model.to_dict().items() if k != "frames"}}, indent=1))
    return 0


def cmd_replay(args) -> int:
    from offline.demo import fastdds_profile_env
    from offline.replay import replay

    # Before rclpy starts: Fast DDS reads the profile when the first participant is created.
    os.environ.update(fastdds_profile_env())
    out = Path(args.out)
    frames = _query_frames(args, Path(args.query_source), None, args.every, out / "source")
    result = replay(frames, out, rate_hz=args.rate, image_topic=args.image_topic_out,
                    camera_info_topic=args.camera_info_topic_out, compressed=args.compressed,
                    timeout_s=args.timeout, image_qos=args.image_qos)
    print(json.dumps(result, indent=1))
    return 0


def cmd_demo(args) -> int:
    from offline.demo import run_demo

    return run_demo(Path(args.work), quick=args.quick)


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--num-threads must be an integer >= 0, got {text!r}")
    return value


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """How the networks run on this machine; none of it changes a map."""
    p.add_argument("--extractor-backend", choices=list(BACKEND_CHOICES), default="auto",
                   help="feature network runtime: auto (onnxruntime on the CPU where the extractor has an ONNX "
                        "path, i.e. ALIKED; torch on CUDA), torch or onnxruntime")
    p.add_argument("--num-threads", type=_threads, default=0,
                   help="CPU threads of torch and onnxruntime (intra- and inter-op; in build also D2S and NeRF "
                        "training); 0: the libraries' defaults (build: the profile's training threads)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2s-nerf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build a map bundle from a bag or a dataset folder")
    b.add_argument("source", help="7-Scenes scene/sequence folder, ROS 1 .bag, ROS 2 bag folder or .mcap, "
                                  "nerfstudio transforms.json folder, or COLMAP model folder")
    b.add_argument("--out", required=True, help="map bundle directory to write")
    sel = b.add_mutually_exclusive_group()
    sel.add_argument("--fraction", type=float, help="use this fraction of the frames, evenly sampled (e.g. 0.04)")
    sel.add_argument("--every", type=int, help="use every N-th frame")
    b.add_argument("--extractor", choices=list(EXTRACTOR_CHOICES),
                   help="local features (default aliked); xfeat: 64-d, several times faster on a CPU")
    b.add_argument("--max-keypoints", type=int)
    b.add_argument("--profile", choices=["fast", "paper"], default="fast")
    b.add_argument("--synthesis", action=argparse.BooleanOptionalAction, default=None,
                   help="NeRF (or --synthesis-renderer) descriptor synthesis before D2S training; --no-synthesis "
                        "trains D2S on the real frames only (default: the profile's; see README, NeRF synthesis)")
    b.add_argument("--labels", choices=["triangulation", "depth", "both"], help="3D labels of the mapping keypoints")
    b.add_argument("--synthetic-labels", choices=["matches", "depth", "both"])
    b.add_argument("--matcher", choices=["auto", "lightglue", "mnn"], help="default auto: LightGlue unless the extractor is SIFT")
    b.add_argument("--train-iterations", type=int)
    b.add_argument("--nerf-iterations", type=int)
    b.add_argument("--train-minutes", type=_positive_minutes, metavar="M",
                   help="D2S training wall-clock budget: the step time is measured and the iteration count fixed "
                        "so that the whole LR schedule, its anneal included, fits M minutes (overrides "
                        "--train-iterations)")
    b.add_argument("--lr-schedule", choices=["steps", "cosine", "onecycle"],
                   help="D2S learning rate: steps (halvings; paper profile), cosine (full anneal; fast profile), onecycle (ACE's)")
    b.add_argument("--train-lr", type=float, help="D2S peak learning rate (fast 2e-3)")
    b.add_argument("--loss-reduction", choices=["normalised", "published"],
                   help="D2S loss terms: normalised means (default) or the published code's per-image sums")
    b.add_argument("--early-batch", type=_early_batch, metavar="IMAGES,KEYPOINTS",
                   help="for the first half of D2S training: IMAGES images per batch with KEYPOINTS keypoints each "
                        "(then the profile's batch with all keypoints)")
    b.add_argument("--augment-per-image", type=int, metavar="N",
                   help="rotated and scaled copies of each mapping frame, features re-extracted (fast 4, paper 20)")
    b.add_argument("--head-warmup", type=int, metavar="STEPS",
                   help="train the D2S regression head alone for STEPS shuffled batches of keypoints before the "
                        "full model (ACE-style warm start; its time counts in --train-minutes)")
    b.add_argument("--head-warmup-batch", type=int, metavar="KEYPOINTS", help="keypoints per head warm-up step (8192)")
    b.add_argument("--descriptor-noise", type=float, metavar="SIGMA",
                   help="D2S training: Gaussian noise on each descriptor, SIGMA times its norm (default 0)")
    b.add_argument("--reprojection-keypoints", choices=["labelled", "unlabelled", "all"],
                   help="keypoints the D2S reprojection term (last 20 %% of training) sees: labelled (default), "
                        "unlabelled (the published D2S code: puts keypoints without a 3D label on their ray) or all")
    b.add_argument("--reprojection-weight", type=float, metavar="W",
                   help="weight of the D2S reprojection term (default 1; the synthesis paper's code uses 10)")
    b.add_argument("--model-layers", type=int, help="D2S attention layers (fast 1, paper 5)")
    b.add_argument("--model-head", type=_int_list, metavar="DIMS",
                   help="D2S regression head widths, comma-separated (fast 512,512,512; paper 512,1024,1024,512)")
    b.add_argument("--validation-frames", type=int,
                   help="non-mapping frames held out for the learning curves and never scored (default 6)")
    b.add_argument("--synthesis-keep-fraction", type=float,
                   help="keep a render with at least this fraction of --max-keypoints LightGlue matches to its "
                        "reference frame (fast 0.06, paper 0.12)")
    b.add_argument("--synthesis-max-poses", type=int, help="render at most this many novel views (fast 60)")
    b.add_argument("--synthetic-ratio", type=float,
                   help="fraction of each training batch's images drawn from the synthetic views (default 0.2)")
    b.add_argument("--synthetic-unlabelled", choices=["unreliable", "ignored"],
                   help="what a render's unlabelled keypoints teach the reliability head: unreliable (the "
                        "paper, default) or ignored (left out of the reliability loss)")
    b.add_argument("--synthesis-renderer", choices=["nerfacto", "rgbd-warp"],
                   help="what renders the novel views: nerfacto (default, the method) or rgbd-warp (forward-warps "
                        "the mapping frames' RGB-D images; needs depth, no training, full resolution)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"])
    add_runtime_arguments(b)
    b.add_argument("--seed", type=int)
    b.add_argument("--train-seed", type=int,
                   help="seed of the D2S training alone (default: --seed); the cached stages are reused")
    b.add_argument("--work-dir", help="stage cache (default: OUT.work); rerun to resume")
    b.add_argument("--queries", help="query source with ground truth, for the report's error CDF")
    b.add_argument("--query-every", type=int)
    b.add_argument("--quiet", action="store_true")
    add_source_arguments(b)
    b.set_defaults(func=cmd_build)

    e = sub.add_parser("evaluate", help="localise query frames with ground truth and report errors")
    e.add_argument("map")
    e.add_argument("query_source")
    e.add_argument("--out", required=True)
    e.add_argument("--every", type=int, default=1, help="use every N-th query frame")
    e.add_argument("--method", choices=["d2s", "match"], default="d2s")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--reliability-threshold", type=float)
    e.add_argument("--feature-cache", metavar="DIR",
                   help="d2s: reuse query features from DIR (keyed by extractor settings and image bytes), "
                        "extracting only what is missing; scoring another map then costs only D2S + PnP")
    add_runtime_arguments(e)
    e.add_argument("--min-inliers", type=int, help="accept a pose with at least this many PnP inliers (default 15)")
    e.add_argument("--min-inlier-ratio", type=float,
                   help="accept a pose only when this share of the correspondences are inliers (default 0.07)")
    e.add_argument("--max-reprojection-rmse", type=float, metavar="PX",
                   help="accept a pose only when the inlier RMSE is at most PX pixels at 640x480 (default 9)")
    e.add_argument("--ransac-threshold", type=float, metavar="PX",
                   help="PnP-RANSAC inlier threshold in pixels at 640x480 (default 12)")
    e.add_argument("--max-distance-to-mapping", type=float, metavar="M",
                   help="accept a pose only within M metres of a mapping camera looking the same way (default 1; 0: off)")
    e.add_argument("--quiet", action="store_true")
    add_source_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("calibrate", help="measure a map's error model (its pose covariance) on posed frames of its scene")
    c.add_argument("map")
    c.add_argument("source", help="posed frames of the map's scene (any build source); the map's own frames are left out")
    c.add_argument("--frames", type=int, default=12, help="how many frames, spread evenly (default 12)")
    c.add_argument("--out", help="write the calibrated map here (default: update MAP in place)")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_source_arguments(c)
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("replay", help="publish frames over DDS to a running localizer node and score its poses")
    r.add_argument("query_source")
    r.add_argument("--rate", type=float, default=2.0, help="frames per second")
    r.add_argument("--out", required=True)
    r.add_argument("--every", type=int, default=1)
    r.add_argument("--compressed", action="store_true", help="publish sensor_msgs/CompressedImage")
    r.add_argument("--image-topic", dest="image_topic_out", default="/camera/image_raw")
    r.add_argument("--camera-info-topic", dest="camera_info_topic_out", default="/camera/camera_info")
    r.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the last pose")
    r.add_argument("--image-qos", choices=["sensor_data", "reliable"], default="sensor_data",
                   help="image publisher QoS: sensor_data (best effort, like a camera driver) or reliable")
    r.set_defaults(func=cmd_replay)

    d = sub.add_parser("demo", help="the whole job on a generated sample: bag -> map -> node -> replay")
    d.add_argument("--work", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a smaller run for CI")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "num_threads", 0):
        from d2s_nerf_ros.device import set_torch_threads

        set_torch_threads(args.num_threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the cached stages", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as exc:
        print(f"d2s-nerf {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, file too large, no permission: the user can fix it and rerun
        import errno

        write_errors = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
        what = "cannot write" if exc.errno in write_errors else "file system error"
        path = exc.filename2 or exc.filename  # the destination of a failed copy or rename
        where = f" ({path})" if path else ""
        rerun = "fix this and rerun the same command"
        if args.command == "build":
            # A map bundle only appears under --out once complete (temp dir, then rename).
            rerun = f"the finished stages stay cached in {build_work_dir(args)}: {rerun} to resume"
        print(f"d2s-nerf {args.command}: error: {what}: {exc.strerror or exc}{where}; {rerun}", file=sys.stderr)
        # A writer that failed half-way may still hold its file open (numpy's savez leaves its
        # zip open); closing it at exit fails on the same full disk, and Python would print that
        # as a second, stray traceback after the message above.
        def ignore_os_errors(unraisable) -> None:
            if not isinstance(unraisable.exc_value, OSError):
                sys.__unraisablehook__(unraisable)

        sys.unraisablehook = ignore_os_errors
        return 1
    except Exception as exc:  # map bundle errors and the like
        from d2s_nerf_ros.map_bundle import MapBundleError

        if isinstance(exc, MapBundleError):
            print(f"d2s-nerf {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
