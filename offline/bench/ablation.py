"""``benchmark.py ablation``: D2S without vs with NeRF descriptor synthesis, same budget."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline.bench.common import (DEFAULT_DATA, LOAD_SAMPLES, REPO, d2s_nerf, fmt_deg, fmt_m, fmt_pct, machine, run,
                                  write_section)

ABLATION_VARIANTS = ("none", "matches", "depth", "both")
# The fast profile's budget until 2026-12-02 (it now trains 6000): kept so the maps and sections
# measured with it stay untagged; another budget tags its maps and section.
ABLATION_TRAIN_ITERATIONS = 3000


@dataclass(frozen=True)
class AblationOption:
    """A build setting the ablation can vary. ``name`` is the argparse destination; the flag,
    ``--name-with-dashes``, is the same for this benchmark and for ``d2s-nerf build``."""

    name: str
    tag: str | None          # suffix of the maps', summaries' and section's names, formatted with the value
    default: Any = None      # at the default: no tag, no build flag, not in the shown command
    synthesis_only: bool = False  # passed to the synthesis variants only (`none` is built without synthesis)
    always_built: bool = False    # passed to the build at its default too: the benchmark fixes it, not the build's profile
    type: type = str
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, args) -> Any:
        """The value set in ``args``, or None when it is the default."""
        value = getattr(args, self.name)
        return None if value is None or value == self.default else value

    def applies_to(self, variant: str) -> bool:
        return variant != "none" or not self.synthesis_only


# Options away from the build's defaults name their maps, summaries and section, so runs with other
# settings sit beside the default ones (the work directory, and so the NeRF, is shared). The order
# is the order of the tags in a name, of the build flags and of the shown command.
ABLATION_OPTIONS = (
    AblationOption("synthesis_renderer", "_{}", "nerfacto", synthesis_only=True, choices=("nerfacto", "rgbd-warp"),
                   help="rgbd-warp: novel views warped from the RGB-D mapping frames (sharp, no NeRF), to tell "
                        "synthesis's effect apart from render quality"),
    AblationOption("synthetic_ratio", "_ratio{}", synthesis_only=True, type=float,
                   help="share of synthetic images per training batch for the synthesis variants (build default 0.2)"),
    AblationOption("synthetic_unlabelled", "_unlabelled-{}", synthesis_only=True, choices=("unreliable", "ignored"),
                   help="what renders' unlabelled keypoints teach the reliability head (build default: unreliable)"),
    AblationOption("train_seed", "_trainseed{}", type=int,
                   help="seed of the D2S training alone, every variant (NeRF, renders and the other stages stay)"),
    AblationOption("train_iterations", "_it{}", ABLATION_TRAIN_ITERATIONS, type=int, always_built=True,
                   help=f"D2S training iterations (default {ABLATION_TRAIN_ITERATIONS}, the ablation's budget)"),
    # Untagged: it caps the renders shared in the work directory, and each summary records the count.
    AblationOption("synthesis_max_poses", None, type=int,
                   help="render at most this many novel views per fraction (default: the fast profile's)"),
)


def options_tag(args, variant: str | None = None) -> str:
    """The name suffix of ``variant``'s map (None: of the summaries and the section, every option)."""
    return "".join(o.tag.format(o.value(args)) for o in ABLATION_OPTIONS
                   if o.tag is not None and o.value(args) is not None and (variant is None or o.applies_to(variant)))


def options_build_flags(args, variant: str, synthesis_only: bool = False) -> list[str]:
    """The ``d2s-nerf build`` flags of the options set in ``args`` that apply to ``variant``
    (``synthesis_only``: of those that apply to the synthesis variants alone)."""
    flags: list[str] = []
    for o in ABLATION_OPTIONS:
        value = getattr(args, o.name) if o.always_built else o.value(args)
        if value is not None and o.applies_to(variant) and (o.synthesis_only or not synthesis_only):
            flags += [o.flag, str(value)]
    return flags


def variant_build_command(args, fraction: float, variant: str, map_dir: Path, work: Path) -> list[str]:
    cmd = d2s_nerf() + ["build", args.data, "--out", str(map_dir), "--work-dir", str(work), "--fraction", str(fraction),
                        "--profile", "fast", "--extractor", args.extractor, "--seed", str(args.seed), "--quiet"]
    cmd += ["--no-synthesis"] if variant == "none" else ["--synthesis", "--synthetic-labels", variant]
    return cmd + options_build_flags(args, variant)


def ablation_command(args) -> str:
    """The benchmark's command line as the section shows it: what selects the runs, and every option set."""
    parts = [".venv/bin/python", "scripts/benchmark.py", "ablation", "--fractions", *map(str, args.fractions),
             "--variants", *args.variants, "--query-every", str(args.query_every), "--jobs", str(args.jobs)]
    parts += ["--extractor", args.extractor] if args.extractor != "aliked" else []
    parts += ["--seed", str(args.seed)] if args.seed != 0 else []
    for o in ABLATION_OPTIONS:
        parts += [o.flag, str(o.value(args))] if o.value(args) is not None else []
    return shlex.join(parts)


def add_ablation_parser(sub) -> None:
    a = sub.add_parser("ablation", help="D2S without vs with NeRF synthesis (matches/depth/both labels)")
    a.add_argument("--data", default=str(DEFAULT_DATA))
    a.add_argument("--runs", default=str(REPO / "runs" / "ablation"))
    a.add_argument("--fractions", type=float, nargs="+", default=[0.04, 0.02])
    a.add_argument("--variants", nargs="+", choices=ABLATION_VARIANTS, default=list(ABLATION_VARIANTS))
    a.add_argument("--extractor", default="aliked")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--query-every", type=int, default=12)
    a.add_argument("--psnr-frames", type=int, default=8)
    a.add_argument("--jobs", type=int, default=2, help="fractions built side by side")
    for o in ABLATION_OPTIONS:
        a.add_argument(o.flag, type=o.type, choices=o.choices, default=o.default, help=o.help)
    a.add_argument("--report-only", action="store_true",
                   help="write the section from the summaries a previous run saved in --runs")
    a.set_defaults(func=bench_ablation)


def heldout_render_psnr(work_dir: Path, data: str, map_dir: Path, query_every: int, n_frames: int,
                        render_fraction: float, renderer_kind: str = "nerfacto") -> dict:
    """PSNR of the renderer's views at real poses it never saw (held-out frames of the sequence)."""
    import numpy as np

    from offline.nerf.renderer import NerfactoRenderer, render_psnr
    from offline.sources import SourceOptions, open_source

    manifest = json.loads((map_dir / "manifest.json").read_text())
    map_names = {f["name"] for f in manifest["frames"]}
    frameset = open_source(Path(data), work_dir / "psnr_source", SourceOptions())
    held_out = [f for f in frameset.frames if f.name not in map_names][::query_every]
    picks = [held_out[i] for i in np.linspace(0, len(held_out) - 1, min(n_frames, len(held_out))).round().astype(int)]
    if renderer_kind == "rgbd-warp":
        from offline.synthesis.rgbd_warp import RGBDWarpRenderer

        renderer = RGBDWarpRenderer([f for f in frameset.frames if f.name in map_names])
    else:
        renderer = NerfactoRenderer(work_dir / "synthesis" / "nerf", device="cpu")
    return render_psnr(renderer, picks, resolution_fraction=render_fraction)


def bench_ablation(args) -> None:
    """D2S without vs with synthesis (each label mode), same seeds and training budget."""
    from concurrent.futures import ThreadPoolExecutor

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    variants = list(args.variants)
    if variants[0] != "none" and "none" in variants:
        variants.remove("none")
        variants.insert(0, "none")

    summary_tag = options_tag(args)

    def one_fraction(fraction: float) -> dict:
        tag = f"f{fraction}"
        work = runs / f"{tag}.work"
        log = runs / f"{tag}.log"
        out: dict = {"fraction": fraction, "variants": {}}
        summary_path = runs / f"{tag}{summary_tag}_summary.json"
        if summary_path.exists():
            # Variants an earlier run with the same settings measured stay in the summary (and the
            # section): a run of one more label mode adds a row instead of replacing the table.
            try:
                earlier = json.loads(summary_path.read_text())
                out["variants"] = {v: e for v, e in earlier.get("variants", {}).items() if v not in variants}
                if "psnr" in earlier:
                    out["psnr"] = earlier["psnr"]
            except (json.JSONDecodeError, AttributeError):
                pass
        for variant in variants:
            map_dir = runs / f"{tag}_{variant}{options_tag(args, variant)}"
            cmd = variant_build_command(args, fraction, variant, map_dir, work)
            build_s = run(cmd, log)
            eval_dir = map_dir.with_name(map_dir.name + "_eval")
            results_path = eval_dir / "results.json"
            fresh = (results_path.exists() and results_path.stat().st_mtime > (map_dir / "manifest.json").stat().st_mtime
                     and json.loads(results_path.read_text()).get("n_queries"))
            if not fresh:  # the evaluation of an unchanged map is reused (a resumed ablation)
                run(d2s_nerf() + ["evaluate", str(map_dir), args.data, "--out", str(eval_dir), "--every",
                                  str(args.query_every), "--method", "d2s", "--quiet"], log)
            manifest = json.loads((map_dir / "manifest.json").read_text())
            entry = {"build_s": build_s, "results": json.loads((eval_dir / "results.json").read_text()),
                     "timings_s": manifest.get("metrics", {}).get("timings_s", {}),
                     "n_frames": len(manifest["frames"]), "training": manifest.get("training", {}),
                     "synthesis": {k: v for k, v in manifest.get("synthesis", {}).items() if k != "decisions"}}
            if variant != "none" and "psnr" not in out:
                syn = manifest.get("synthesis", {})
                size = syn.get("render_size") or [None]
                cam_w = manifest.get("camera", {}).get("width")
                frac = (size[0] / cam_w) if size[0] and cam_w else 0.25
                out["psnr"] = heldout_render_psnr(work, args.data, map_dir, args.query_every, args.psnr_frames, frac,
                                                  args.synthesis_renderer)
                out["psnr"]["render_fraction"] = frac
            out["variants"][variant] = entry
            out["variants"] = {v: out["variants"][v] for v in sorted(out["variants"], key=ABLATION_VARIANTS.index)}
            summary_path.write_text(json.dumps(out, indent=1))
        return out

    if args.report_only:
        # Write the section from the per-fraction summaries an earlier (maybe unfinished) run left.
        summaries = []
        for fraction in args.fractions:
            path = runs / f"f{fraction}{summary_tag}_summary.json"
            if path.exists():
                summaries.append(json.loads(path.read_text()))
        if not summaries:
            sys.exit(f"no ablation summaries in {runs}: run the ablation first")
        wall_min = None
    else:
        jobs = max(1, min(args.jobs, len(args.fractions)))
        if jobs > 1:
            # Two builds side by side on a 2-core machine: one torch thread each, no oversubscription.
            os.environ["OMP_NUM_THREADS"] = "1"
        t0 = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            summaries = list(pool.map(one_fraction, args.fractions))
        wall_min = (time.perf_counter() - t0) / 60
    missing = [f"{s['fraction']}: {v}" for s in summaries for v in variants if v not in s["variants"]]

    date = datetime.date.today().isoformat()
    command = ablation_command(args)
    every_variant = ["d2s-nerf", "build", "--profile", "fast", "--extractor", args.extractor, "--seed", str(args.seed),
                     *options_build_flags(args, "none")]
    synthesis_flags = options_build_flags(args, "matches", synthesis_only=True)
    lines = [
        "## NeRF descriptor synthesis ablation (RedKitchen, sparse mapping)",
        "",
        f"- Command: `{command}` "
        + (f"({wall_min:.0f} min wall for everything below)" if wall_min is not None else
           "(section written with `--report-only` from the run's saved summaries)"),
        f"- Machine: {machine()}; date {date}"
        + (f"; 1-minute load average during the run {min(LOAD_SAMPLES):.1f} to {max(LOAD_SAMPLES):.1f}" if LOAD_SAMPLES
           else "; other jobs shared the CPU during the run (the times are noisy)"),
        f"- Every variant: `{shlex.join(every_variant)}` on the "
        "same mapping frames, one shared work directory per fraction (features, labels, augmentation, NeRF and "
        "renders computed once); `none` is `--no-synthesis`, the others `--synthetic-labels MODE`"
        + (f" with `{shlex.join(synthesis_flags)}`" if synthesis_flags else "")
        + f". Queries: every {args.query_every}th frame not used for mapping, held-out frames of the same recording "
        "as the mapping frames (not the 7-Scenes test split); a failed query counts as an infinite error.",
    ]
    if missing:
        lines.append(f"- **Not finished in this run** (fraction: variant): {', '.join(missing)}")
    earlier = sorted({v for s in summaries for v in s["variants"] if v not in variants}, key=ABLATION_VARIANTS.index)
    if earlier:
        lines.append(f"- Rows `{'`, `'.join(earlier)}`: from an earlier run of this command with the same settings "
                     "and other `--variants` (kept in the saved summary), not rerun here.")
    lines += [
        "",
        "| mapping frames | synthesis labels | median t | median R | 5 cm / 5° | 10 cm / 10° | Δ median t vs none "
        "| renders made / kept | synthetic labelled keypoints | synthetic share of batches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        base = s["variants"].get("none", {}).get("results", {}).get("median_translation_m")
        for variant, e in s["variants"].items():
            r, syn = e["results"], e["synthesis"]
            mt = r["median_translation_m"]
            delta = "—" if variant == "none" or base in (None, 0) or mt is None else f"{100 * (mt - base) / base:+.0f} %"
            made = f"{syn.get('n_poses', 0)} / {syn.get('n_kept', 0)}" if variant != "none" else "—"
            kps = str(syn.get("n_valid_keypoints", "—")) if variant != "none" else "—"
            # What the training actually used (from the map's manifest), whatever the build's default was then.
            share = e.get("training", {}).get("config", {}).get("synthetic_ratio")
            share = f"{share:g}" if variant != "none" and share is not None else "—"
            lines.append(f"| {e['n_frames']} | {variant} | {fmt_m(mt)} | {fmt_deg(r['median_rotation_deg'])} | "
                         f"{fmt_pct(r['recall_5cm_5deg'])} | {fmt_pct(r['recall_10cm_10deg'])} | {delta} | {made} | {kps} "
                         f"| {share} |")
    lines.append("")
    for s in summaries:
        syn_variant = next((e for v, e in s["variants"].items() if v != "none"), None)
        none = s["variants"].get("none")
        n = (none or syn_variant or {}).get("n_frames", "?")
        lines.append(f"**{n} mapping frames** (fraction {s['fraction']}):")
        if none:
            t = none["timings_s"]
            lines.append(f"- without synthesis: build stages {', '.join(f'{k} {v:.0f} s' for k, v in t.items())}; "
                         f"final training loss {none['training'].get('final_loss', float('nan')):.3f}")
        if syn_variant:
            syn = syn_variant["synthesis"]
            st = syn.get("timings_s", {})
            nerf = syn.get("nerf", {})
            psnr = s.get("psnr", {})
            hist = syn.get("match_count_histogram", {})
            heldout = (f"held-out real poses ({psnr.get('n', 0)} frames at {psnr.get('render_fraction', 0):.2f} "
                       f"resolution): PSNR median {psnr.get('psnr_median', float('nan')):.1f} dB, mean "
                       f"{psnr.get('psnr_mean', float('nan')):.1f} dB"
                       + (f", {100 * psnr['coverage_mean']:.0f} % of pixels covered" if "coverage_mean" in psnr else ""))
            if syn.get("renderer", "nerfacto") == "nerfacto":
                lines.append(
                    f"- NeRF (reduced nerfacto, {nerf.get('iterations', '?')} iterations): "
                    f"{nerf.get('train_seconds', 0) / 60:.1f} min, {nerf.get('seconds_per_iteration', float('nan')):.2f} s/iteration, "
                    f"train PSNR {nerf.get('final_train_psnr') or float('nan'):.1f} dB; " + heldout)
            else:
                lines.append(f"- renderer `{syn['renderer']}` (the 2 nearest RGB-D mapping frames warped into each "
                             f"view, no training); " + heldout)
            lines.append(
                f"- renders: {syn.get('n_poses_before_cap', '?')} novel poses, {syn.get('n_poses', '?')} rendered at "
                f"{'×'.join(map(str, syn.get('render_size') or []))} "
                + (f"({syn['render_seconds_mean']:.1f} s each), " if syn.get("render_seconds_mean") else
                   "(all from the render cache of an earlier run), ")
                + f"kept {syn.get('n_kept', '?')} with ≥ {syn.get('keep_threshold', '?')} LightGlue matches "
                f"(median {syn.get('match_count_median', float('nan')):.0f}); match-count histogram "
                f"{list(zip([round(e) for e in hist.get('bin_edges', [])[:-1]], hist.get('counts', [])))} (bin start, renders)")
            lines.append(f"- synthesis stage times: {', '.join(f'{k[:-2]} {v:.0f} s' for k, v in st.items() if k.endswith('_s'))}")
            for variant, e in s["variants"].items():
                if variant != "none":
                    lab = e["synthesis"].get("labels", {})
                    if isinstance(lab, dict):
                        lines.append(f"- labels `{variant}`: " + ", ".join(f"{k} {v}" for k, v in lab.items()))
        lines.append("")
    body = "\n".join(lines)
    write_section(f"ablation-{args.extractor}{summary_tag}", body)
    (runs / f"ablation{summary_tag}_summary.json").write_text(json.dumps(summaries, indent=1))
    print(body)
