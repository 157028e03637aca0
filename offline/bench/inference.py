"""``benchmark.py d2s-inference``: the map's D2S network in torch and in onnxruntime, on the same frames.

Both run inside the localizer's own pipeline (``Localizer.localize``) on the same features
of held-out RedKitchen frames, so the table pairs speed with the accuracy each gives. A
second timing repeats every frame's descriptors up to exactly ``--keypoints`` rows, so the
attention cost is that of a full keypoint budget whatever the detector found.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

from offline.bench.common import (BENCH_MD, DEFAULT_DATA, REPO, fmt_deg, fmt_m, fmt_pct, load_average, machine_line,
                                  percentile, publish_section, shown_command)


class ReplayedFeatures:
    """Stands in for the localizer's extractor: hands back features computed once, frame by frame."""

    def __init__(self, features: list) -> None:
        self.features = features
        self.next = 0

    def extract(self, image):
        features = self.features[self.next]
        self.next += 1
        return features


class OnnxD2S:
    """The D2S network as an onnxruntime session, with the torch module's call signature."""

    def __init__(self, model, num_threads: int) -> None:
        import torch

        from d2s_nerf_ros.features.onnx_runtime import export_onnx, make_session

        self.config = model.config
        buffer = io.BytesIO()
        example = torch.zeros(1, 16, model.config.descriptor_dim)
        axes = {"descriptors": {0: "batch", 1: "n"}, "mask": {0: "batch", 1: "n"}, "xyz": {0: "batch", 1: "n"},
                "u": {0: "batch", 1: "n"}}
        export_onnx(model, (example, torch.ones(1, 16, dtype=torch.bool)), ["descriptors", "mask"], ["xyz", "u"],
                    buffer, dynamic_axes=axes)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"d2s_bench_{os.getpid()}.onnx"
        path.write_bytes(buffer.getvalue())
        try:
            self.session = make_session(path, num_threads)
        finally:
            path.unlink(missing_ok=True)

    def __call__(self, descriptors, mask):
        import torch

        xyz, u = self.session.run(["xyz", "u"], {"descriptors": descriptors.numpy(), "mask": mask.numpy()})
        return torch.from_numpy(xyz), torch.from_numpy(u)


def bench_d2s_inference(args) -> None:
    import numpy as np
    import torch

    from d2s_nerf_ros.device import set_torch_threads
    from d2s_nerf_ros.geometry import pose_error
    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.sources import open_source

    map_dir = Path(args.map)
    if not (map_dir / "manifest.json").is_file():
        sys.exit(f"no map at {map_dir}")
    set_torch_threads(args.num_threads)
    bundle = MapBundle.load(map_dir, device="cpu")
    mapping = {f["name"] for f in bundle.manifest.get("frames", [])}
    frames = [f for f in open_source(args.data, Path(args.runs) / "d2s_inference_source").frames if f.name not in mapping]
    frames = frames[::args.query_every][:args.frames]
    load0 = load_average()
    localizer = Localizer(bundle, LocalizerConfig(device="cpu", max_keypoints=args.keypoints,
                                                  num_threads=args.num_threads))
    print(f"extracting {len(frames)} frames once ({localizer.extractor})", flush=True)
    features = [localizer.extractor.extract(f.load_rgb()) for f in frames]
    torch_model = localizer.model
    variants = {"torch": torch_model, "onnxruntime": OnnxD2S(torch_model, args.num_threads)}

    results: dict[str, dict] = {}
    outputs: dict[str, list] = {}
    for name, model in variants.items():
        localizer.model = model
        localizer.extractor = ReplayedFeatures(features)
        localizer.localize(frames[0].load_rgb(), frames[0].camera)  # warm-up (first-run allocations)
        localizer.extractor = ReplayedFeatures(features)
        rows = [localizer.localize(f.load_rgb(), f.camera) for f in frames]
        errors = [pose_error(r.T_world_cam, f.T_world_cam) if r.success else (float("inf"), float("inf"))
                  for r, f in zip(rows, frames)]
        # The same budget for every frame: descriptors repeated up to exactly --keypoints rows.
        full_ms = []
        with torch.inference_mode():
            for feats in features:
                reps = -(-args.keypoints // max(1, len(feats)))
                descriptors = torch.from_numpy(np.tile(feats.descriptors, (reps, 1))[:args.keypoints])[None]
                mask = torch.ones(descriptors.shape[:2], dtype=torch.bool)
                t0 = time.perf_counter()
                model(descriptors, mask)
                full_ms.append((time.perf_counter() - t0) * 1e3)
            outputs[name] = [model(torch.from_numpy(f.descriptors)[None], torch.ones(1, len(f), dtype=torch.bool))[0][0]
                             for f in features]
        t_errs, r_errs = [e[0] for e in errors], [e[1] for e in errors]
        results[name] = {
            "d2s_ms_p50": percentile([r.timings_ms["d2s"] for r in rows], 50),
            "d2s_full_budget_ms_p50": percentile(full_ms, 50),
            "n_failed": sum(not r.success for r in rows),
            "median_translation_m": percentile(t_errs, 50), "median_rotation_deg": percentile(r_errs, 50),
            "recall_5cm_5deg": float(np.mean([t <= 0.05 and r <= 5 for t, r in zip(t_errs, r_errs)])),
            "recall_10cm_10deg": float(np.mean([t <= 0.10 and r <= 10 for t, r in zip(t_errs, r_errs)])),
        }
    max_diff_m = max(float((a - b).abs().max()) for a, b in zip(outputs["torch"], outputs["onnxruntime"]))
    load1 = load_average()
    summary = {"results": results, "max_xyz_difference_m": max_diff_m, "n_frames": len(frames),
               "mean_keypoints": float(np.mean([len(f) for f in features])), "load": [load0, load1]}
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    (Path(args.runs) / "d2s_inference.json").write_text(json.dumps(summary, indent=1))

    model_cfg = torch_model.config
    rows_md = "\n".join(
        f"| {name} | {r['d2s_ms_p50']:.1f} ms | {r['d2s_full_budget_ms_p50']:.1f} ms | {r['n_failed']} | "
        f"{fmt_m(r['median_translation_m'])} | {fmt_deg(r['median_rotation_deg'])} | {fmt_pct(r['recall_5cm_5deg'])} | "
        f"{fmt_pct(r['recall_10cm_10deg'])} |" for name, r in results.items())
    body = f"""## D2S inference: torch vs onnxruntime on the CPU

- Command: `{shown_command(args, 'd2s-inference', always=('map', 'data'))}`
{machine_line(load0, load1)}
  (shared CPU: noisy); torch and onnxruntime threads: {args.num_threads or "library defaults"}
- Map: `{os.path.relpath(map_dir.resolve(), REPO) if map_dir.resolve().is_relative_to(REPO) else map_dir}`
  (D2S: {model_cfg.n_layers} attention layers, {model_cfg.descriptor_dim}-d descriptors, head {list(model_cfg.head_dims)});
  {len(frames)} queries: every {args.query_every}th held-out frame of the same RedKitchen recording as the mapping
  frames (not the 7-Scenes test split), {summary['mean_keypoints']:.0f} keypoints on average (at most {args.keypoints}).
- Both networks run inside `Localizer.localize` on the same extracted features (extracted once), so the accuracy
  columns are a paired comparison. "Full budget" times each frame's descriptors repeated to exactly {args.keypoints} rows.
  Largest scene-coordinate difference between the two on these frames: {1000 * max_diff_m:.3f} mm.
- int8 (dynamic quantisation of the linear layers) is not used: no paired accuracy comparison was run for it.

| D2S runtime | D2S p50 (real keypoints) | D2S p50 ({args.keypoints} keypoints) | failed | median t | median R | 5 cm / 5° | 10 cm / 10° |
|---|---|---|---|---|---|---|---|
{rows_md}
"""
    publish_section("d2s-inference", body, args.benchmarks_file)


def add_inference_parser(sub) -> None:
    d = sub.add_parser("d2s-inference", help="the map's D2S network in torch vs onnxruntime, paired on the same frames")
    d.add_argument("--map", required=True)
    d.add_argument("--data", default=str(DEFAULT_DATA))
    d.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    d.add_argument("--query-every", type=int, default=12)
    d.add_argument("--frames", type=int, default=40)
    d.add_argument("--keypoints", type=int, default=1024)
    d.add_argument("--num-threads", type=int, default=2, help="torch and onnxruntime threads (0: library defaults)")
    d.add_argument("--benchmarks-file", default=str(BENCH_MD))
    d.set_defaults(func=bench_d2s_inference, parser=d)
