#!/usr/bin/env python
"""Benchmarks whose output lands in docs/BENCHMARKS.md (command, machine, date, numbers).

    .venv/bin/python scripts/benchmark.py core --data ../shared/data/7scenes_redkitchen
    .venv/bin/python scripts/benchmark.py ablation --fractions 0.04 0.02
    .venv/bin/python scripts/benchmark.py node-latency --map runs/bench/core_map   # the ROS 2 node, 640x480
    .venv/bin/python scripts/benchmark.py soak --frames 5000                      # the node's memory
    .venv/bin/python scripts/benchmark.py wrong-scene --map runs/bench/core_map   # poses for another scene
    .venv/bin/python scripts/benchmark.py covariance --map runs/bench/core_map    # covariance calibration

Each run rewrites its own section of docs/BENCHMARKS.md (between markers) and keeps the
raw JSON next to the maps in --runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from offline.bench.ablation import ABLATION_TRAIN_ITERATIONS, ABLATION_VARIANTS, bench_ablation  # noqa: E402
from offline.bench.common import DEFAULT_DATA, REPO  # noqa: E402
from offline.bench.core import bench_core  # noqa: E402
from offline.bench.covariance import add_covariance_parser  # noqa: E402
from offline.bench.node import add_node_benchmark_parsers  # noqa: E402
from offline.bench.wrong_scene import add_wrong_scene_parser  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="which", required=True)
    c = sub.add_parser("core")
    c.add_argument("--data", default=str(DEFAULT_DATA))
    c.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    c.add_argument("--fraction", type=float, default=0.04)
    c.add_argument("--extractor", default="aliked")
    # 12: 40 of the 480 held-out frames, so the (slow on a CPU) matching baseline finishes in minutes
    c.add_argument("--query-every", type=int, default=12)
    c.add_argument("--train-iterations", type=int)
    c.add_argument("--labels")
    c.add_argument("--work-dir", help="stage cache to build in (default: next to the map)")
    c.add_argument("--synthesis", action="store_true",
                   help="build with the default NeRF synthesis (its own section: the full build's time)")
    c.add_argument("--synthetic-ratio", type=float, help="with --synthesis: share of synthetic images per batch")
    c.set_defaults(func=bench_core)

    a = sub.add_parser("ablation", help="D2S without vs with NeRF synthesis (matches/depth/both labels)")
    a.add_argument("--data", default=str(DEFAULT_DATA))
    a.add_argument("--runs", default=str(REPO / "runs" / "ablation"))
    a.add_argument("--fractions", type=float, nargs="+", default=[0.04, 0.02])
    a.add_argument("--variants", nargs="+", choices=ABLATION_VARIANTS, default=list(ABLATION_VARIANTS))
    a.add_argument("--extractor", default="aliked")
    a.add_argument("--train-iterations", type=int, default=ABLATION_TRAIN_ITERATIONS)  # the fast profile's budget
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--query-every", type=int, default=12)
    a.add_argument("--psnr-frames", type=int, default=8)
    a.add_argument("--jobs", type=int, default=2, help="fractions built side by side")
    a.add_argument("--synthesis-max-poses", type=int,
                   help="render at most this many novel views per fraction (default: the fast profile's)")
    a.add_argument("--synthetic-ratio", type=float,
                   help="share of synthetic images per training batch for the synthesis variants (build default 0.2)")
    a.add_argument("--synthetic-unlabelled", choices=["unreliable", "ignored"],
                   help="what renders' unlabelled keypoints teach the reliability head (build default: unreliable)")
    a.add_argument("--synthesis-renderer", choices=["nerfacto", "rgbd-warp"], default="nerfacto",
                   help="rgbd-warp: novel views warped from the RGB-D mapping frames (sharp, no NeRF), to tell "
                        "synthesis's effect apart from render quality")
    a.add_argument("--train-seed", type=int,
                   help="seed of the D2S training alone, every variant (NeRF, renders and the other stages stay)")
    a.add_argument("--report-only", action="store_true",
                   help="write the section from the summaries a previous run saved in --runs")
    a.set_defaults(func=bench_ablation)
    add_node_benchmark_parsers(sub)
    add_wrong_scene_parser(sub)
    add_covariance_parser(sub)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
