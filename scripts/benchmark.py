#!/usr/bin/env python
"""Benchmarks whose output lands in docs/BENCHMARKS.md (command, machine, date, numbers).

    .venv/bin/python scripts/benchmark.py core --data ../shared/data/7scenes_redkitchen
    .venv/bin/python scripts/benchmark.py synthesis --data ../shared/data/7scenes_redkitchen

Each run rewrites its own section of docs/BENCHMARKS.md (between markers) and keeps the
raw JSON next to the maps in --runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_MD = REPO / "docs" / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{os.cpu_count()} cores of {cpu}, {gpu}"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


LOAD_SAMPLES: list[float] = []


def run(cmd: list[str], log_path: Path) -> float:
    """Run a d2s-nerf command, tee its output to a log; returns wall seconds. Samples the
    1-minute load average before and after: timings on a shared machine need it."""
    print("$", shlex.join(cmd), flush=True)
    LOAD_SAMPLES.append(load_average())
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    secs = time.perf_counter() - t0
    LOAD_SAMPLES.append(load_average())
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}), see {log_path}: {shlex.join(cmd)}")
    return secs


def d2s_nerf() -> list[str]:
    return [sys.executable, "-m", "offline.cli"]


def fmt_m(v) -> str:
    return "failed" if v is None else f"{100 * v:.1f} cm"


def fmt_deg(v) -> str:
    return "failed" if v is None else f"{v:.2f}°"


def fmt_pct(v) -> str:
    return f"{100 * v:.0f} %"


def write_section(name: str, body: str) -> None:
    BENCH_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n\nEvery number here was written by `scripts/benchmark.py`; rerun it to refresh a section.\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)


def results_row(label: str, res: dict) -> str:
    lat = res.get("latency_ms", {}).get("total", {})
    return (f"| {label} | {res['n_queries']} | {res['n_failed']} | {fmt_m(res['median_translation_m'])} | "
            f"{fmt_deg(res['median_rotation_deg'])} | {fmt_pct(res['recall_5cm_5deg'])} | {fmt_pct(res['recall_10cm_10deg'])} | "
            f"{lat.get('p50', float('nan')):.0f} / {lat.get('p90', float('nan')):.0f} |")


TABLE_HEAD = ("| method | queries | failed | median t | median R | 5 cm / 5° | 10 cm / 10° | latency p50 / p90 ms |\n"
              "|---|---|---|---|---|---|---|---|")


def bench_core(args) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "core.log"
    map_dir = runs / "core_map"
    build_cmd = d2s_nerf() + ["build", args.data, "--out", str(map_dir), "--fraction", str(args.fraction),
                              "--profile", "fast", "--extractor", args.extractor, "--no-synthesis", "--quiet"]
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
    date = datetime.date.today().isoformat()
    shown_build = ["d2s-nerf" if c in (sys.executable, "-m", "offline.cli") else c for c in build_cmd]
    shown_build = [c for i, c in enumerate(shown_build) if not (c == "d2s-nerf" and i > 0 and shown_build[i - 1] == "d2s-nerf")]
    body = f"""## Localization core: D2S vs structure-based matching (RedKitchen, sparse mapping)

- Command: `.venv/bin/python scripts/benchmark.py core --fraction {args.fraction} --extractor {args.extractor} --query-every {args.query_every}{' --train-iterations ' + str(args.train_iterations) if args.train_iterations else ''}{' --labels ' + args.labels if args.labels else ''}`
  (build: `{shlex.join(shown_build)}`)
- Machine: {machine()}; date {date}; 1-minute load average during the run {min(LOAD_SAMPLES):.1f} to {max(LOAD_SAMPLES):.1f} (other jobs share the CPU, so the times are noisy)
- Mapping frames: {len(manifest['frames'])}; labelled keypoints: {manifest['training']['n_labelled_keypoints']}; augmented images: {manifest['training']['n_augmented_images']}
- Build wall time: {build_s / 60:.1f} min (stages: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; training {manifest['training']['config']['iterations']} iterations)
- Queries: every {args.query_every}th frame not used for mapping ({results['d2s']['n_queries']} frames); a failed query counts as an infinite error.
  Latency is the whole localisation on this CPU (feature extraction dominates; the baseline also matches against 3 retrieved mapping frames).

{TABLE_HEAD}
{results_row('D2S (this package)', results['d2s'])}
{results_row('match to mapping frames (hloc-like baseline)', results['match'])}
"""
    write_section(f"core-{args.extractor}-{args.fraction}", body)
    (runs / "core_summary.json").write_text(json.dumps({"build_s": build_s, "results": results}, indent=1))
    print(body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="which", required=True)
    c = sub.add_parser("core")
    c.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "7scenes_redkitchen"))
    c.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    c.add_argument("--fraction", type=float, default=0.04)
    c.add_argument("--extractor", default="aliked")
    # 12: 40 of the 480 held-out frames, so the (slow on a CPU) matching baseline finishes in minutes
    c.add_argument("--query-every", type=int, default=12)
    c.add_argument("--train-iterations", type=int)
    c.add_argument("--labels")
    c.set_defaults(func=bench_core)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
