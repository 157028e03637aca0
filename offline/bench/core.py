"""``benchmark.py core``: D2S against the hloc-like matching baseline on one RedKitchen map."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path

from offline.bench.common import (LOAD_SAMPLES, REPO, TABLE_HEAD, d2s_nerf, machine, results_row, run,
                                  write_section)


def bench_core(args) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "core.log"
    map_dir = runs / "core_map"
    build_cmd = d2s_nerf() + ["build", args.data, "--out", str(map_dir), "--fraction", str(args.fraction),
                              "--profile", "fast", "--extractor", args.extractor, "--quiet"]
    # Without --synthesis the core benchmark measures D2S alone; with it, the whole build with synthesis
    # (NeRF, renders, filter, synthetic labels) and its time, stage by stage.
    if not args.synthesis:
        build_cmd += ["--no-synthesis"]
    else:
        build_cmd += ["--synthesis"] + ([] if args.synthetic_ratio is None else ["--synthetic-ratio", str(args.synthetic_ratio)])
    if args.work_dir:
        # e.g. the synthesis ablation's work directory: its cached stages and training are reused
        build_cmd += ["--work-dir", args.work_dir]
    if args.train_iterations:
        build_cmd += ["--train-iterations", str(args.train_iterations)]
    if args.labels:
        build_cmd += ["--labels", args.labels]
    build_s = run(build_cmd, log)
    results = {}
    for method in ("d2s", "match"):
        out = runs / f"core_eval_{method}"
        run(d2s_nerf() + ["evaluate", str(map_dir), args.data, "--out", str(out), "--every", str(args.query_every),
                          "--method", method, "--quiet"], log)
        results[method] = json.loads((out / "results.json").read_text())
    manifest = json.loads((map_dir / "manifest.json").read_text())
    timings = manifest.get("metrics", {}).get("timings_s", {})
    cached = sorted(k for k, v in manifest.get("metrics", {}).get("cached", {}).items() if v)
    cached_note = (f" in this run: {', '.join(cached)} came from the work directory's cache, so the stage times "
                   "below are those of the run that computed them" if cached else "")
    date = datetime.date.today().isoformat()
    shown_build = ["d2s-nerf" if c in (sys.executable, "-m", "offline.cli") else c for c in build_cmd]
    shown_build = [c for i, c in enumerate(shown_build) if not (c == "d2s-nerf" and i > 0 and shown_build[i - 1] == "d2s-nerf")]
    title = "with NeRF synthesis, fresh build" if args.synthesis else "D2S vs structure-based matching"
    syn_flags = ((" --synthesis" + (f" --synthetic-ratio {args.synthetic_ratio}" if args.synthetic_ratio is not None else ""))
                 if args.synthesis else "")
    syn = manifest.get("synthesis", {})
    syn_line = (f"- Synthesis: {syn.get('n_poses', '?')} views rendered of {syn.get('n_poses_before_cap', '?')} novel poses, "
                f"{syn.get('n_kept', '?')} kept, {syn.get('n_valid_keypoints', '?')} synthetic labelled keypoints; its steps: "
                + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in syn.get("timings_s", {}).items() if k.endswith("_s")) + "\n"
                if args.synthesis else "")
    body = f"""## Localization core: {title} (RedKitchen, sparse mapping)

- Command: `.venv/bin/python scripts/benchmark.py core --runs {os.path.relpath(args.runs, REPO)} --fraction {args.fraction} --extractor {args.extractor} --query-every {args.query_every}{' --train-iterations ' + str(args.train_iterations) if args.train_iterations else ''}{' --labels ' + args.labels if args.labels else ''}{syn_flags}{' --work-dir ' + os.path.relpath(args.work_dir, REPO) if args.work_dir else ''}`
  (build: `{shlex.join(shown_build)}`)
- Machine: {machine()}; date {date}; 1-minute load average during the run {min(LOAD_SAMPLES):.1f} to {max(LOAD_SAMPLES):.1f} (other jobs share the CPU, so the times are noisy)
- Mapping frames: {len(manifest['frames'])}; labelled keypoints: {manifest['training']['n_labelled_keypoints']}; augmented images: {manifest['training']['n_augmented_images']}
- Build wall time: {build_s / 60:.1f} min{cached_note} (stages: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; training {manifest['training']['config']['iterations']} iterations)
{syn_line}- Queries: every {args.query_every}th frame not used for mapping ({results['d2s']['n_queries']} frames); a failed query counts as an infinite error.
  Latency is the whole localisation on this CPU (feature extraction dominates; the baseline also matches against 3 retrieved mapping frames).

{TABLE_HEAD}
{results_row('D2S (this package)', results['d2s'])}
{results_row('match to mapping frames (hloc-like baseline)', results['match'])}
"""
    write_section(f"core-{args.extractor}-{args.fraction}{'-synthesis' if args.synthesis else ''}", body)
    (runs / "core_summary.json").write_text(json.dumps({"build_s": build_s, "results": results}, indent=1))
    print(body)
