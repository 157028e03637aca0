"""``benchmark.py training-threads``: D2S and nerfacto training speed with 1 and 2 torch threads.

Chooses the fast profile's training threads from a measurement on the machine as it is (run it
on an idle one): the same short training, alternating the thread counts, repeated.

- D2S: ``d2s-nerf build --no-synthesis --train-iterations N --num-threads T`` on a copy of a
  finished build's work directory holding its cached features, labels and augmentation, so
  only the training runs (the learning-curve probes included, as in a real build).
- nerfacto (fast profile): trained on the same build's mapping frames for a short and a longer
  run; the difference over the extra iterations gives seconds per iteration without start-up.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from offline.bench.common import (BENCH_MD, DEFAULT_DATA, REPO, copy_work_dir, d2s_nerf, load_average, machine_line,
                                  publish_section, run, shown_command, shown_path)

def bench_training_threads(args) -> None:
    from offline.nerf.nerfacto import NerfactoConfig, train_nerfacto
    from offline.sources import open_source

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work_dir)
    if not (work_dir / "mapping_frames.json").is_file():
        raise SystemExit(f"{work_dir} is not a build's work directory (no mapping_frames.json): build a map first")
    log = runs / "training_threads.log"
    threads = list(dict.fromkeys(args.threads))
    load0 = load_average()
    d2s: dict[int, list[float]] = {t: [] for t in threads}
    for repeat in range(args.repeats):
        for t in threads:
            copy = runs / f"threads_work_{t}"
            shutil.rmtree(copy, ignore_errors=True)
            copy_work_dir(work_dir, copy, skip=("synthesis*",))  # D2S alone: no NeRF to copy
            out = runs / f"threads_map_{t}"
            run(d2s_nerf() + ["build", str(args.data), "--out", str(out), "--work-dir", str(copy), "--fraction",
                              str(args.fraction), "--profile", "fast", "--no-synthesis", "--train-iterations",
                              str(args.d2s_iterations), "--num-threads", str(t), "--quiet"], log)
            seconds = json.loads((out / "manifest.json").read_text())["metrics"]["timings_s"]["training"]
            d2s[t].append(seconds / args.d2s_iterations)
            print(f"D2S, {t} thread(s), repeat {repeat + 1}: {1000 * d2s[t][-1]:.0f} ms/iteration", flush=True)

    names = {f["name"] for f in json.loads((work_dir / "mapping_frames.json").read_text()).get("frames", [])}
    frameset = open_source(args.data, runs / "threads_source")
    frames = frameset.subset([i for i, f in enumerate(frameset.frames) if f.name in names])
    nerf: dict[int, list[float]] = {t: [] for t in threads}
    short, long = 20, 20 + args.nerf_iterations
    for repeat in range(args.repeats):
        for t in threads:
            seconds = {}
            for iterations in (short, long):
                root = runs / f"threads_nerf_{t}_{iterations}"
                shutil.rmtree(root, ignore_errors=True)
                config = NerfactoConfig(profile="fast", iterations=iterations, seed=0, device="cpu", cpu_threads=t,
                                        checkpoint_every=10 * long, log_every=10 * long)
                t0 = time.perf_counter()
                train_nerfacto(list(frames.frames), config, root, log=lambda _: None)
                seconds[iterations] = time.perf_counter() - t0
            nerf[t].append((seconds[long] - seconds[short]) / (long - short))
            print(f"nerfacto, {t} thread(s), repeat {repeat + 1}: {1000 * nerf[t][-1]:.0f} ms/iteration", flush=True)
    load1 = load_average()
    (runs / "training_threads.json").write_text(json.dumps({"d2s_s_per_iteration": d2s, "nerf_s_per_iteration": nerf},
                                                           indent=1))
    publish_section("training-threads", threads_section(args, d2s, nerf, len(frames), (load0, load1)),
                    args.benchmarks_file)


def threads_section(args, d2s: dict[int, list[float]], nerf: dict[int, list[float]], n_frames: int,
                    loads: tuple[float, float]) -> str:
    """The BENCHMARKS section: seconds per iteration per thread count, and the ratio to 1 thread."""
    def row(what: str, values: dict[int, list[float]]) -> list[str]:
        base = np.median(values[min(values)])
        return [f"| {what} | {t} | {', '.join(f'{1000 * v:.0f}' for v in runs)} ms | {1000 * np.median(runs):.0f} ms | "
                f"{base / np.median(runs):.2f}x |" for t, runs in values.items()]

    table = ["| training | threads | per iteration (each repeat) | median | speed vs fewest threads |",
             "|---|---|---|---|---|", *row(f"D2S, fast profile ({args.d2s_iterations} iterations)", d2s),
             *row(f"nerfacto, fast profile ({args.nerf_iterations} iterations after 20)", nerf)]
    return f"""## Training threads: D2S and nerfacto with 1 and 2 torch threads

- Command: `{shown_command(args, "training-threads", always=("work_dir",))}`
{machine_line(*loads)} (run it on an idle machine: the choice is about an idle one)
- Work directory `{shown_path(args.work_dir)}` ({n_frames} RedKitchen mapping frames): D2S retrained from its cached
  features, labels and augmentation (`d2s-nerf build --no-synthesis --train-iterations {args.d2s_iterations} --num-threads T`,
  the build's training time including its learning-curve probes); nerfacto trained on the same frames, seconds per
  iteration from a {20 + args.nerf_iterations}- minus a 20-iteration run. Thread counts alternate, {args.repeats} repeats.

{chr(10).join(table)}

The fast profile trains with torch's default threads (every core); `d2s-nerf build --num-threads 1` keeps one
core free on a machine that other jobs load.
"""


def add_threads_parser(sub) -> None:
    t = sub.add_parser("training-threads", help="D2S and nerfacto training speed with 1 and 2 torch threads")
    t.add_argument("--work-dir", required=True, help="a finished build's work directory (its cached stages are copied)")
    t.add_argument("--data", default=str(DEFAULT_DATA))
    t.add_argument("--fraction", type=float, default=0.04, help="the build's --fraction (its mapping frames)")
    t.add_argument("--runs", default=str(REPO / "runs" / "threads"))
    t.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--d2s-iterations", type=int, default=250)
    t.add_argument("--nerf-iterations", type=int, default=100)
    t.add_argument("--benchmarks-file", default=str(BENCH_MD))
    t.set_defaults(func=bench_training_threads, parser=t)
