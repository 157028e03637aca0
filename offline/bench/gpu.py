"""``benchmark.py gpu``: the section of docs/BENCHMARKS.md written from a GPU run's JSON.

``scripts/gpu_benchmark.py`` runs on the lent device machine (which cannot write this
repository); its ``gpu_benchmark.json`` comes back through ``$OUT``, and this turns it into the
``gpu`` section here. The tables are made by ``results_markdown``, which the device-side
script also prints, so both show the same thing. Imports only the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path

from offline.bench.common import BENCH_MD, write_section

GPU_SECTION = "gpu"
RESULTS_FORMAT = "d2s_gpu_benchmark"
# The exact call of the device tool that produced a result (also in the script's docstring).
DEVICE_RUN_COMMAND = ("set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
                      "--upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 "
                      "|| exit; nvidia-smi -L; python3 scripts/gpu_benchmark.py --data .gpu --out $OUT 2>&1 "
                      "| tee $OUT/gpu_benchmark.log")


def _fmt_stage(latency: dict, stage: str) -> str:
    s = latency.get(stage)
    return f"{s['p50']:.1f} / {s['p90']:.1f} ms" if s else "n/a"


def results_markdown(report: dict) -> str:
    """The run's machine line, the localisation table (one row per device) and the training table."""
    env = report["environment"]
    lines = [f"Run {env['date_utc']} on {env['gpu'] or 'no GPU'} + {env['cpu_count']} cores of {env['cpu']} "
             f"(torch {env['versions']['torch']}, CUDA {env['cuda']}, {env['torch_threads']} CPU threads, "
             f"1-minute load {env['load_average'][0]:.2f}); map `{report['map']['name']}` ({report['map']['extractor']}), "
             f"{report['n_frames']} held-out frames of the map's own recording (not the 7-Scenes test split).", ""]
    if report["localization"]:
        lines += ["| device | frames | failed | median t | median R | 5 cm / 5° | extract p50 / p90 | d2s p50 / p90 | "
                  "pnp p50 / p90 | total p50 / p90 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for device, run in report["localization"].items():
            acc, lat = run["accuracy"], run["latency_ms"]
            t, r = acc["median_translation_m"], acc["median_rotation_deg"]
            lines.append(f"| {device} | {acc['n_queries']} | {acc['n_failed']} | "
                         f"{'failed' if t is None else f'{100 * t:.1f} cm'} | {'failed' if r is None else f'{r:.2f}°'} | "
                         f"{100 * acc['recall_5cm_5deg']:.0f} % | {_fmt_stage(lat, 'extract')} | {_fmt_stage(lat, 'd2s')} | "
                         f"{_fmt_stage(lat, 'pnp')} | {_fmt_stage(lat, 'total')} |")
    agreement = report.get("pose_agreement")
    if agreement and agreement["max_translation_error_difference_m"] is not None:
        lines += ["", f"Same frames on both devices: {agreement['frames_with_same_outcome']} of {report['n_frames']} "
                      f"with the same outcome; pose errors differ by at most "
                      f"{100 * agreement['max_translation_error_difference_m']:.2f} cm / "
                      f"{agreement['max_rotation_error_difference_deg']:.3f}°."]
    if report["training"]:
        lines += ["", "| D2S training | device | layers, head | batch (images × keypoints) | data | it/s |",
                  "|---|---|---|---|---|---|"]
        for run in report["training"]:
            rate = run["iterations_per_s"]
            lines.append(f"| {run['profile']} profile | {run['device']}{' (bf16 autocast)' if run['bf16_autocast'] else ''} | "
                         f"{run['model']['n_layers']}, {tuple(run['model']['head_dims'])} | "
                         f"{run['images_per_batch']} × {run['keypoints_per_image']} | {run['data'].split(' (')[0]} | "
                         f"{'n/a' if rate is None else f'{rate:.3g}'} |")
    if report.get("errors"):
        lines += ["", "Errors: " + "; ".join(report["errors"])]
    return "\n".join(lines) + "\n"


def gpu_section(report: dict) -> str:
    return "\n".join([
        "## GPU: the localizer and D2S training on a lent device (`scripts/gpu_benchmark.py`)",
        "",
        f"- Device command (`run`, carry `[\".gpu\"]`, timeout_s 300): `{DEVICE_RUN_COMMAND}`",
        f"- On the device: `{report['command']}`; `.gpu/` from `scripts/gpu_prepare.sh "
        f"{report['carried']['map']['source']} {report['carried']['frames']['n']}`",
        "- Localisation: the project's `Localizer`, per-stage p50 / p90 after warm-up, CUDA synchronised around "
        "every frame; the CPU row is the device's own cores, not a robot's. Training: `train_d2s` at each "
        "profile's model and batch size (details and what was not measurable: the script's docstring).",
        "",
        results_markdown(report),
    ])


def bench_gpu(args) -> None:
    path = Path(args.results)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read {path}: {e}")
    if report.get("format") != RESULTS_FORMAT:
        raise SystemExit(f"{path} is not a gpu_benchmark.json (format {report.get('format')!r})")
    if not report.get("environment", {}).get("gpu"):
        raise SystemExit(f"{path} was measured without a GPU ({report['devices']}): not published")
    write_section(GPU_SECTION, gpu_section(report), args.benchmarks_file)
    print(f"wrote section '{GPU_SECTION}' of {args.benchmarks_file}")


def add_gpu_benchmark_parser(sub) -> None:
    g = sub.add_parser("gpu", help="write the GPU section from a gpu_benchmark.json that a device run returned")
    g.add_argument("--results", required=True, help="gpu_benchmark.json from scripts/gpu_benchmark.py's $OUT")
    g.add_argument("--benchmarks-file", default=str(BENCH_MD), help="markdown file whose section is rewritten")
    g.set_defaults(func=bench_gpu, parser=g)
