"""``benchmark.py extractors``: local feature extractors side by side on 20-frame RedKitchen maps.

One map per extractor, built one after the other with the same command (fast profile, same
mapping frames, same work directory: the NeRF and its renders do not depend on the extractor,
so the second build takes them from the first one's cache and says so), then, per map, on the
same query frames: D2S and the matching baseline (``d2s-nerf evaluate``), and the node process
(end-to-end latency through DDS).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

from offline.bench.common import (BENCH_MD, DEFAULT_DATA, LOAD_SAMPLES, REPO, d2s_nerf, fmt_deg, fmt_m, fmt_ms,
                                  fmt_pct, held_out_frames, machine_line, publish_section, run, shown_command)


def _ci(res: dict, key: str, fmt) -> str:
    low, high = res.get(key) or (None, None)
    if low is None or high is None:
        return ""
    return f" ({fmt(low)}-{fmt(high)})"


def bench_extractors(args) -> None:
    from offline.bench.node import run_node_latency
    from offline.sources import open_source

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "extractors.log"
    work_dir = runs / "extractors.work"
    feature_cache = runs / "extractors_query_features"
    summary = runs / "extractors.json"
    # Extractors measured by an earlier run into the same --runs stay in the table (a run for one
    # extractor adds its row); each row keeps the load and date of the run that measured it.
    results: dict[str, dict] = json.loads(summary.read_text()) if summary.is_file() else {}
    for extractor in args.extractors:
        map_dir = runs / f"extractors_{extractor}"
        build_cmd = d2s_nerf() + ["build", str(args.data), "--out", str(map_dir), "--fraction", str(args.fraction),
                                  "--profile", "fast", "--extractor", extractor, "--work-dir", str(work_dir), "--quiet"]
        build_cmd += ["--synthesis"] if args.synthesis else ["--no-synthesis"]
        first_sample = len(LOAD_SAMPLES)
        build_s = run(build_cmd, log)
        build_load = LOAD_SAMPLES[first_sample:]
        manifest = json.loads((map_dir / "manifest.json").read_text())
        entry = {"build_s": build_s, "build_load": [min(build_load), max(build_load)], "build_cmd": build_cmd,
                 "timings_s": manifest.get("metrics", {}).get("timings_s", {}),
                 "cached": sorted(k for k, v in manifest.get("metrics", {}).get("cached", {}).items() if v),
                 "synthesis": manifest.get("synthesis", {}), "n_frames": len(manifest.get("frames", [])),
                 "extractor_config": manifest.get("extractor", {})}
        for method in ("d2s", "match"):
            out = runs / f"extractors_{extractor}_eval_{method}"
            cmd = d2s_nerf() + ["evaluate", str(map_dir), str(args.data), "--out", str(out), "--every",
                                str(args.query_every), "--method", method, "--num-threads", str(args.num_threads),
                                "--quiet"]
            if method == "d2s":
                cmd += ["--feature-cache", str(feature_cache)]
            run(cmd, log)
            entry[method] = json.loads((out / "results.json").read_text())
        # The node: the first --node-frames of the same held-out frames, one at a time.
        frameset = open_source(args.data, runs / "extractors_source")
        queries = held_out_frames(frameset.frames, manifest, args.node_query_every, args.node_frames)
        node_args = SimpleNamespace(image_qos="sensor_data", rate=0.5, gap=0.5, answer_timeout=30.0)
        params = {"map_path": str(map_dir.resolve()), "device": "cpu", "image_qos": "sensor_data", "odom_frame": "",
                  "base_frame": "", "extractor_backend": "auto", "num_threads": args.num_threads}
        entry["node"] = {k: v for k, v in run_node_latency(params, queries, node_args, runs, f"-{extractor}").items()
                         if k != "frames"}
        entry["date"] = datetime.date.today().isoformat()
        results[extractor] = entry
        summary.write_text(json.dumps(results, indent=1, default=str))
    loads = [load for e in results.values() for load in e["build_load"]] + LOAD_SAMPLES
    publish_section("extractors", extractors_section(args, results, (min(loads), max(loads))), args.benchmarks_file)


def extractors_section(args, results: dict[str, dict], load_range: tuple[float, float]) -> str:
    """The BENCHMARKS section from the per-extractor results of ``bench_extractors``."""
    rows = []
    for extractor, e in results.items():
        d2s, match, node = e["d2s"], e["match"], e["node"]
        rows.append(
            f"| {extractor} | {e['extractor_config'].get('max_keypoints', '?')} | {e['build_s'] / 60:.1f} min | "
            f"{fmt_m(d2s['median_translation_m'])}{_ci(d2s, 'median_translation_ci95_m', fmt_m)} | "
            f"{fmt_deg(d2s['median_rotation_deg'])} | {fmt_pct(d2s.get('recall_5cm', 0))} / "
            f"{fmt_pct(d2s.get('recall_10cm', 0))} | {d2s['n_failed']} | "
            f"{fmt_m(match['median_translation_m'])}{_ci(match, 'median_translation_ci95_m', fmt_m)} | "
            f"{fmt_deg(match['median_rotation_deg'])} | {fmt_ms(node['latency_ms']['p50'])} | "
            f"{node['n_poses']} of {node['n_sent']} | {node['node_cpu_s_per_frame']:.2f} s |")
    stage_lines = []
    for extractor, e in results.items():
        cached = (f"; from the shared work directory's cache: {', '.join(e['cached'])} (their times are those of "
                  "the build that computed them)") if e["cached"] else ""
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in e["timings_s"].items())
        syn = e["synthesis"]
        syn_text = (f"; synthesis kept {syn.get('n_kept', '?')} of {syn.get('n_poses', '?')} renders, "
                    f"{syn.get('n_valid_keypoints', '?')} synthetic labelled keypoints") if syn else ""
        stage_lines.append(f"- `{extractor}` ({e.get('date', 'date not recorded')}) build: {e['build_s'] / 60:.1f} min wall, 1-minute load "
                           f"{e['build_load'][0]:.1f} to {e['build_load'][1]:.1f}; stages {stages}{cached}{syn_text}. "
                           f"Node: backend auto ({'onnxruntime' if extractor == 'aliked' else 'torch'}), start-up "
                           f"{e['node']['node_startup_s']:.0f} s, median error through the node "
                           f"{fmt_m(e['node']['median_translation_m'])}.")
    first = next(iter(results.values()))
    shown_build = shlex.join(["d2s-nerf", *(os.path.relpath(c, REPO) if c.startswith(str(REPO) + os.sep) else c
                                            for c in first["build_cmd"][len(d2s_nerf()):])])
    body = f"""## Extractors side by side: ALIKED and XFeat on 20-frame RedKitchen maps

- Command: `{shown_command(args, 'extractors')}`
  (first build: `{shown_build}`; then the same with each other `--extractor`)
{machine_line(*load_range)} (lowest and highest during the whole run)
- Maps: {first['n_frames']} mapping frames each (`--fraction {args.fraction}`, the same frames), fast profile,
  {'with the default NeRF synthesis' if args.synthesis else 'no synthesis (`--no-synthesis`)'}; every map trained with the
  same schedule. Matching baseline: LightGlue for ALIKED, LighterGlue for XFeat (the weights each package ships).
- Queries: every {args.query_every}th held-out frame (`d2s-nerf evaluate --every {args.query_every}`; {first['d2s']['n_queries']}
  frames) for D2S and matching, the same frames for every map; held-out frames of the *same recording* as the mapping
  frames (the shared development split), not the 7-Scenes test split. Medians with their 95 % interval (block bootstrap
  over consecutive frames). Node: every {args.node_query_every}th held-out frame, {args.node_frames} frames, 640x480 rgb8
  best effort over DDS with the Fast DDS profile, one at a time; `num_threads` {args.num_threads}.

| extractor | keypoints | build | D2S median t (95 % CI) | D2S median R | D2S recall 5 / 10 cm | D2S failed | matching median t (95 % CI) | matching median R | node latency p50 | node poses | node CPU per frame |
|---|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n\n" + "\n".join(stage_lines) + "\n"
    return body


def add_extractors_parser(sub) -> None:
    e = sub.add_parser("extractors", help="ALIKED and XFeat side by side: D2S, matching, node latency, build time")
    e.add_argument("--extractors", nargs="+", default=["aliked", "xfeat"], choices=["aliked", "xfeat", "sift"])
    e.add_argument("--data", default=str(DEFAULT_DATA))
    e.add_argument("--runs", default=str(REPO / "runs" / "extractors"))
    e.add_argument("--fraction", type=float, default=0.04)
    e.add_argument("--no-synthesis", dest="synthesis", action="store_false",
                   help="build without NeRF synthesis (default: with it, passed as --synthesis)")
    # 4: ~120 of the 480 held-out frames: a median interval of useful width, and the matching
    # baseline (about 2 s a query on a CPU) still finishes in minutes
    e.add_argument("--query-every", type=int, default=4)
    e.add_argument("--node-query-every", type=int, default=12)
    e.add_argument("--node-frames", type=int, default=40)
    e.add_argument("--num-threads", type=int, default=2, help="evaluation's and the node's num_threads")
    e.add_argument("--benchmarks-file", default=str(BENCH_MD))
    e.set_defaults(func=bench_extractors, parser=e)
