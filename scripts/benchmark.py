#!/usr/bin/env python
"""Benchmarks whose output lands in docs/BENCHMARKS.md (command, machine, date, numbers).

    .venv/bin/python scripts/benchmark.py core --data ../shared/data/7scenes_redkitchen
    .venv/bin/python scripts/benchmark.py ablation --fractions 0.04 0.02
    .venv/bin/python scripts/benchmark.py node-latency --map runs/bench/core_map   # the ROS 2 node, 640x480
    .venv/bin/python scripts/benchmark.py soak --frames 5000                      # the node's memory
    .venv/bin/python scripts/benchmark.py seeds --name cosine --variant "--no-synthesis --lr-schedule cosine"
    .venv/bin/python scripts/benchmark.py gpu --results OUT/gpu_benchmark.json    # a device run of scripts/gpu_benchmark.py
    .venv/bin/python scripts/benchmark.py delivery --map runs/bench/core_map      # raw frames over DDS, Fast DDS profile
    .venv/bin/python scripts/benchmark.py d2s-inference --map runs/bench/core_map # D2S: torch vs onnxruntime
    .venv/bin/python scripts/benchmark.py wrong-scene --map runs/bench/core_map   # poses for another scene
    .venv/bin/python scripts/benchmark.py covariance --map runs/bench/core_map    # covariance calibration
    .venv/bin/python scripts/benchmark.py extractors                              # ALIKED vs XFeat maps, side by side
    .venv/bin/python scripts/benchmark.py training-threads --work-dir runs/bench/core_map.work  # 1 vs 2 threads

Each run rewrites its own section of docs/BENCHMARKS.md (between markers) and keeps the
raw JSON next to the maps in --runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from offline.bench.ablation import add_ablation_parser  # noqa: E402
from offline.bench.common import DEFAULT_DATA, REPO  # noqa: E402
from offline.bench.core import bench_core  # noqa: E402
from offline.bench.gpu import add_gpu_benchmark_parser  # noqa: E402
from offline.bench.delivery import add_delivery_parser  # noqa: E402
from offline.bench.extractors import add_extractors_parser  # noqa: E402
from offline.bench.threads import add_threads_parser  # noqa: E402
from offline.bench.inference import add_inference_parser  # noqa: E402
from offline.bench.node import add_node_benchmark_parsers  # noqa: E402
from offline.bench.seeds import add_seeds_parser  # noqa: E402
from offline.bench.covariance import add_covariance_parser  # noqa: E402
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

    add_ablation_parser(sub)
    add_extractors_parser(sub)
    add_threads_parser(sub)
    add_node_benchmark_parsers(sub)
    add_seeds_parser(sub, str(DEFAULT_DATA))
    add_gpu_benchmark_parser(sub)
    add_delivery_parser(sub)
    add_inference_parser(sub)
    add_wrong_scene_parser(sub)
    add_covariance_parser(sub)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
