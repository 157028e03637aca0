"""``benchmark.py seeds``: two build variants over several training seeds, compared per query.

Each arm is the same ``d2s-nerf build`` plus its own flags, trained once per ``--seeds`` value
(``--train-seed``: everything but the D2S training comes from one shared work directory), and
scored on the same queries: every ``--query-every``-th frame of the source that is neither a
mapping frame nor a validation frame, features from one shared query-feature cache. The table
gives each arm's median error per seed, the mean and spread over seeds, and the paired change
of the median from arm A to arm B with a bootstrap interval over seeds and blocks of
consecutive queries (``offline.evaluate.paired_median_change_ci``).
"""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

from offline.bench.common import (LOAD_SAMPLES, REPO, copy_work_dir, d2s_nerf, fmt_deg, fmt_m, fmt_pct, machine,
                                  publish_section, run)

SAME_RECORDING_NOTE = ("The queries are held-out frames of the same RedKitchen recording as the mapping frames "
                       "(seq-01 of the shared development split), not the 7-Scenes test split: the numbers are not "
                       "comparable with the papers' tables.")


def _errors(results: dict, names: list[str], key: str) -> np.ndarray:
    by_name = {q["name"]: q.get(key) for q in results["queries"]}
    return np.array([np.inf if by_name.get(n) is None else float(by_name[n]) for n in names])


def _arm_runs(args, runs: Path, arm: str, flags: list[str], log: Path) -> list[dict]:
    out = []
    for seed in args.seeds:
        map_dir = runs / f"{arm}_seed{seed}"
        cmd = d2s_nerf() + ["build", args.data, "--out", str(map_dir), "--work-dir", str(runs / "work"),
                            "--fraction", str(args.fraction), "--profile", "fast", "--train-seed", str(seed),
                            "--quiet", *flags]
        manifest_path = map_dir / "manifest.json"
        build_s = None
        if not (args.reuse and manifest_path.exists()):
            build_s = run(cmd, log)
        eval_dir = runs / f"{arm}_seed{seed}_eval"
        results_path = eval_dir / "results.json"
        if not (results_path.exists() and results_path.stat().st_mtime > manifest_path.stat().st_mtime):
            run(d2s_nerf() + ["evaluate", str(map_dir), args.data, "--out", str(eval_dir), "--every",
                              str(args.query_every), "--method", "d2s", "--device", "cpu", "--quiet",
                              "--feature-cache", str(runs / "query_features")], log)
        manifest = json.loads(manifest_path.read_text())
        out.append({"seed": seed, "build_s": build_s, "results": json.loads(results_path.read_text()),
                    "training": {k: v for k, v in manifest.get("training", {}).items() if k != "build"},
                    "train_s": manifest.get("metrics", {}).get("timings_s", {}).get("training"),
                    "command": shlex.join(["d2s-nerf"] + cmd[3:])})
    return out


def _arm_row(label: str, flags: str, entries: list[dict]) -> str:
    med_t = [e["results"]["median_translation_m"] for e in entries]
    med_r = [e["results"]["median_rotation_deg"] for e in entries]
    finite_t = [v for v in med_t if v is not None]
    spread = (f"{100 * statistics.mean(finite_t):.1f} ± {100 * statistics.stdev(finite_t):.1f} cm"
              if len(finite_t) >= 2 else "n/a")
    rec = {k: statistics.mean(e["results"].get(k, 0.0) for e in entries) for k in ("recall_2cm", "recall_5cm", "recall_10cm")}
    its = [e["training"].get("iterations_planned") or e["training"].get("config", {}).get("iterations") for e in entries]
    train_min = [e["train_s"] / 60 for e in entries if e.get("train_s")]
    train_text = f"{statistics.mean(train_min):.1f}" if train_min else "n/a"
    return (f"| {label} | `{flags or '(none)'}` | {', '.join(fmt_m(v) for v in med_t)} | {spread} | "
            f"{', '.join(fmt_deg(v) for v in med_r)} | {fmt_pct(rec['recall_2cm'])} / {fmt_pct(rec['recall_5cm'])} / "
            f"{fmt_pct(rec['recall_10cm'])} | {', '.join(str(i) for i in its)} | {train_text} |")


def bench_seeds(args) -> None:
    from offline.evaluate import paired_median_change_ci

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "seeds.log"
    if args.work_dir_from and not (runs / "work").exists():
        # A copy, never the original: the builds here write their trainings into it.
        copy_work_dir(Path(args.work_dir_from), runs / "work")
    arms = {"A": shlex.split(args.baseline), "B": shlex.split(args.variant)}
    summary_path = runs / "seeds_summary.json"
    if args.report_only:
        summary = json.loads(summary_path.read_text())
    else:
        summary = {"arms": {arm: _arm_runs(args, runs, arm, flags, log) for arm, flags in arms.items()},
                   "query_every": args.query_every}
    # The section describes the run that made the summary, whatever --report-only was given.
    args.query_every = summary.get("query_every", args.query_every)
    entries_a, entries_b = summary["arms"]["A"], summary["arms"]["B"]
    names = [q["name"] for q in entries_a[0]["results"]["queries"]]
    for e in entries_a + entries_b:
        if [q["name"] for q in e["results"]["queries"]] != names:
            sys.exit("the arms were scored on different queries (other mapping or validation frames?): "
                     "a paired comparison needs the same frames")
    paired = {}
    for key, unit in (("translation_error_m", "t"), ("rotation_error_deg", "R")):
        ea = np.stack([_errors(e["results"], names, key) for e in entries_a])
        eb = np.stack([_errors(e["results"], names, key) for e in entries_b])
        paired[unit] = paired_median_change_ci(ea, eb)
    summary["paired"] = paired
    summary_path.write_text(json.dumps(summary, indent=1, allow_nan=False, default=str))

    def change(p: dict) -> str:
        if p["low"] is None:
            return "n/a"
        return (f"{100 * p['change']:+.0f} % [{100 * p['low']:+.0f} %, {100 * p['high']:+.0f} %] — "
                + ("**excludes 0**" if p["excludes_zero"] else "includes 0"))

    load = (f"; 1-minute load average during the run {min(LOAD_SAMPLES):.1f} to {max(LOAD_SAMPLES):.1f}"
            if LOAD_SAMPLES else "")
    n_frames = len(entries_a[0]["training"].get("validation_frames", []))
    body = f"""## Seeds: {args.label_b} vs {args.label_a} ({args.name})

- Command: `.venv/bin/python scripts/benchmark.py seeds --name {args.name} --fraction {args.fraction} --seeds {' '.join(map(str, args.seeds))} --query-every {args.query_every} --baseline {shlex.quote(args.baseline)} --variant {shlex.quote(args.variant)} --label-a {shlex.quote(args.label_a)} --label-b {shlex.quote(args.label_b)}`
  (one build: `{entries_a[0]['command']}`)
- Machine: {machine()}; date {datetime.date.today().isoformat()}{load}; D2S trains on every core unless the flags give `--num-threads`; {'one build at a time' if not args.note else 'how the builds ran: ' + args.note}.
- Queries: {len(names)} frames (every {args.query_every}. frame that is neither one of the {entries_a[0]['training'].get('n_real_images', '?')} mapping frames nor one of the {n_frames} validation frames); a failed query counts as an infinite error. {SAME_RECORDING_NOTE}
- Paired change: median error of arm B over arm A, minus 1; 95 % interval from {paired['t'].get('n_resamples', '?')} bootstrap resamples of the seeds (within each arm) and of blocks of {paired['t']['block_length']} consecutive queries (shared by both arms).

| arm | build flags | median t per seed | mean ± SD over seeds | median R per seed | recall 2 / 5 / 10 cm (mean) | iterations | D2S training min (mean) |
|---|---|---|---|---|---|---|---|
{_arm_row('A: ' + args.label_a, args.baseline, entries_a)}
{_arm_row('B: ' + args.label_b, args.variant, entries_b)}

- Paired change of the median translation error, B vs A: {change(paired['t'])}
- Paired change of the median rotation error, B vs A: {change(paired['R'])}
"""
    publish_section(f"seeds-{args.name}", body)


def add_seeds_parser(sub, default_data: str) -> None:
    s = sub.add_parser("seeds", help="two build variants, >= 3 training seeds each, compared per query (paired)")
    s.add_argument("--name", required=True, help="names the section and, with --runs, the run directory")
    s.add_argument("--data", default=default_data)
    s.add_argument("--runs", help="default: runs/seeds/NAME")
    s.add_argument("--work-dir-from", help="a build work directory whose stages to reuse (copied, never written)")
    s.add_argument("--fraction", type=float, default=0.04)
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--query-every", type=int, default=1)
    s.add_argument("--baseline", default="--no-synthesis",
                   help="build flags of arm A (one quoted string; a single flag needs '=': --baseline=--synthesis)")
    s.add_argument("--variant", required=True,
                   help="build flags of arm B (one quoted string; a single flag needs '=': --variant=--no-synthesis)")
    s.add_argument("--label-a", default="baseline")
    s.add_argument("--label-b", default="variant")
    s.add_argument("--reuse", action="store_true", help="keep maps an earlier run of this command built")
    s.add_argument("--report-only", action="store_true", help="write the section from the saved summary")
    s.add_argument("--note", default="", help="how the runs were made, when not one build at a time on an idle "
                                              "machine (e.g. two arms side by side); printed under the machine line")

    def run_it(args) -> None:
        if len(args.seeds) < 3 and not args.report_only:
            print("note: fewer than 3 seeds per arm cannot separate a 25 % effect from seed noise", file=sys.stderr)
        args.runs = args.runs or str(REPO / "runs" / "seeds" / args.name)
        bench_seeds(args)

    s.set_defaults(func=run_it)
