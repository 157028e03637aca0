"""What every benchmark shares: the machine line, load sampling, running a d2s-nerf command,
number formats and the writer of docs/BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_MD = REPO / "docs" / "BENCHMARKS.md"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "7scenes_redkitchen"

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
    import threading

    print("$", shlex.join(cmd), flush=True)
    LOAD_SAMPLES.append(load_average())
    done = threading.Event()

    def sample_load() -> None:  # a long build's load is not its start's and end's
        while not done.wait(30.0):
            LOAD_SAMPLES.append(load_average())

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        with open(log_path, "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    finally:
        done.set()
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


def write_section(name: str, body: str, path: Path | str = BENCH_MD) -> None:
    """Replace the section ``name`` (between its BEGIN/END markers) of the markdown file ``path``
    with ``body``, or append it; the rest of the file is kept byte for byte."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery number here was written by `scripts/benchmark.py`; rerun it to refresh a section.\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def machine_line(load_before: float, load_after: float) -> str:
    """The line every section states its conditions in: machine, date, 1-minute load around the run."""
    return (f"- Machine: {machine()}; date {datetime.date.today().isoformat()}; "
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after")


def publish_section(name: str, body: str, path: Path | str = BENCH_MD) -> None:
    """Write ``body`` as the section ``name`` of ``path`` and show it on stdout."""
    write_section(name, body, path)
    print(body)


def held_out_frames(frames, manifest: dict, every: int, count: int = 0) -> list:
    """Every ``every``-th of ``frames`` that is not one of the map's mapping frames, at most ``count`` (0: all)."""
    mapping = {f["name"] for f in manifest.get("frames", [])}
    held_out = [f for f in frames if f.name not in mapping][::every]
    return held_out[:count] if count else held_out


def copy_work_dir(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """A copy of a build's work directory (its cached stages) without its trainings, staged bundles
    and the ``skip`` patterns: the builds run on the copy write their own trainings into it."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("train-*", "bundle-staged-*", *skip))


def results_row(label: str, res: dict) -> str:
    lat = res.get("latency_ms", {}).get("total", {})
    return (f"| {label} | {res['n_queries']} | {res['n_failed']} | {fmt_m(res['median_translation_m'])} | "
            f"{fmt_deg(res['median_rotation_deg'])} | {fmt_pct(res['recall_5cm_5deg'])} | {fmt_pct(res['recall_10cm_10deg'])} | "
            f"{lat.get('p50', float('nan')):.0f} / {lat.get('p90', float('nan')):.0f} |")


TABLE_HEAD = ("| method | queries | failed | median t | median R | 5 cm / 5° | 10 cm / 10° | latency p50 / p90 ms |\n"
              "|---|---|---|---|---|---|---|---|")


def percentile(values, q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def fmt_ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"


def shown_command(args, subcommand: str, always: tuple[str, ...] = ()) -> str:
    """The exact command line of this run: the options that differ from their defaults, and ``always``."""
    parts = [".venv/bin/python", "scripts/benchmark.py", subcommand]
    for dest, value in vars(args).items():
        if dest in ("func", "parser", "which") or (value == args.parser.get_default(dest) and dest not in always):
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        elif value is not None:
            shown = os.path.relpath(value, REPO) if isinstance(value, str) and value.startswith(str(REPO) + os.sep) else value
            parts += [flag, f"{shown:g}" if isinstance(shown, float) else str(shown)]
    return shlex.join(parts)




def runs_and_map(args) -> tuple[Path, Path]:
    """(--runs, created; --map, which must be a built map bundle) of a benchmark that scores a map."""
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    map_dir = Path(args.map)
    if not (map_dir / "manifest.json").is_file():
        sys.exit(f"no map at {map_dir}: build one (`benchmark.py core` writes runs/bench/core_map) or name it with --map")
    return runs, map_dir


def shown_path(path: Path | str) -> str:
    """``path`` relative to the checkout when inside it (as a reader would type it), else as given."""
    resolved = Path(path).resolve()
    return os.path.relpath(resolved, REPO) if resolved.is_relative_to(REPO) else str(path)


def add_map_benchmark_arguments(parser) -> None:
    """--map (a RedKitchen map, default the one `benchmark.py core` builds), --data, --runs, --benchmarks-file."""
    parser.add_argument("--map", default=str(REPO / "runs" / "bench" / "core_map"), help="RedKitchen map bundle")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--benchmarks-file", default=str(BENCH_MD), help="markdown file whose section is rewritten")
