"""``benchmark.py covariance``: is the published pose covariance calibrated?

Held-out RedKitchen frames (neither mapping frames nor the frames the error model was measured
on) are localised in-process with the map's error model; each accepted pose's error against
ground truth is compared with its covariance: the share of errors inside the 1/2/3-sigma
ellipsoids (NEES <= 1, 4, 9) next to what a correct Gaussian covariance gives, and the mean and
median NEES (6 and 5.35 for a correct 6-DoF covariance). The same for the position block alone
(3 DoF), which is what a robot filter mostly uses, and for the covariance without the error
model (PnP's reprojection-only covariance: what the node published before).

A map without an error model is calibrated first (``offline/error_model_fit.py``) into a copy
under --runs, on frames disjoint from those checked here.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from offline.bench.common import (add_map_benchmark_arguments, load_average, machine_line, publish_section,
                                  runs_and_map, shown_command, shown_path)


def chi2_cdf(x: float, dof: int) -> float:
    """CDF of the chi-square distribution for 3 or 6 degrees of freedom (closed forms)."""
    h = x / 2.0
    if dof == 6:
        return 1.0 - math.exp(-h) * (1.0 + h + h * h / 2.0)
    if dof == 3:
        return math.erf(math.sqrt(h)) - math.sqrt(2.0 * x / math.pi) * math.exp(-h)
    raise ValueError(f"dof must be 3 or 6, got {dof}")


def calibration_row(nees_values: list[float], dof: int) -> dict[str, Any]:
    v = np.asarray(nees_values, dtype=np.float64)
    row: dict[str, Any] = {"n": int(v.size), "mean_nees": float(v.mean()) if v.size else None,
                           "median_nees": float(np.median(v)) if v.size else None}
    for k in (1, 2, 3):
        row[f"inside_{k}sigma"] = float(np.mean(v <= k * k)) if v.size else None
        row[f"expected_{k}sigma"] = chi2_cdf(float(k * k), dof)
    return row


def bench_covariance(args) -> None:
    from d2s_nerf_ros.error_model import ErrorModel, nees, pose_error_vector
    from d2s_nerf_ros.geometry import pose_error
    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.error_model_fit import calibration_frames, fit_error_model
    from offline.sources import open_source

    runs, map_dir = runs_and_map(args)
    frameset = open_source(Path(args.data), runs / "covariance_source")
    bundle = MapBundle.load(map_dir)
    mapping = {f["name"] for f in bundle.manifest.get("frames", [])}
    calibrated_here = "error_model" not in bundle.manifest
    load0 = load_average()
    if calibrated_here:
        # An older map: measure its error model into a copy, as `d2s-nerf calibrate --out` would.
        cal_frames = calibration_frames(frameset.frames, mapping, args.calibration_frames)
        model = fit_error_model(Localizer(bundle, LocalizerConfig(device="cpu")), cal_frames)
        bundle.set_error_model(model)
        target = runs / f"{map_dir.name}_calibrated"
        shutil.rmtree(target, ignore_errors=True)
        map_dir = bundle.save(target)
    model = MapBundle.load(map_dir).error_model
    excluded = mapping | set(model.frames)
    queries = [f for f in frameset.frames if f.name not in excluded][::args.query_every][:args.frames]
    localizer = Localizer.from_path(map_dir, LocalizerConfig(device="cpu"))
    reprojection_only = ErrorModel(coordinate_sigma_m=0.0, covariance_scale=1.0, source="reprojection only")

    rows, per_frame = {"calibrated": ([], [], []), "reprojection only": ([], [], [])}, []
    for i, frame in enumerate(queries):
        result = localizer.localize(frame.load_rgb(), frame.camera)
        if not result.success:
            per_frame.append({"name": frame.name, "success": False, "reason": result.reason})
            continue
        delta = pose_error_vector(result.T_world_cam, frame.T_world_cam)
        t_err, r_err = pose_error(result.T_world_cam, frame.T_world_cam)
        entry = {"name": frame.name, "success": True, "translation_error_m": t_err, "rotation_error_deg": r_err}
        for label, cov in (("calibrated", result.covariance),
                           ("reprojection only", reprojection_only.pose_covariance(
                               result.T_world_cam, result.inliers_2d, result.inliers_3d, frame.camera))):
            n6, n3, nr = nees(delta, cov), nees(delta[:3], cov[:3, :3]), nees(delta[3:], cov[3:, 3:])
            rows[label][0].append(n6)
            rows[label][1].append(n3)
            rows[label][2].append(nr)
            entry[label] = {"nees6": n6, "nees3": n3, "nees_rotation": nr,
                            "sigma_xyz_m": np.sqrt(np.diag(cov)[:3]).tolist()}
        per_frame.append(entry)
        print(f"  {i + 1}/{len(queries)} {frame.name}: {100 * t_err:.1f} cm, NEES {entry['calibrated']['nees6']:.1f} "
              f"(reprojection only {entry['reprojection only']['nees6']:.0f})", flush=True)
    load1 = load_average()
    summary = {label: {"6dof": calibration_row(v6, 6), "position": calibration_row(v3, 3),
                       "rotation": calibration_row(vr, 3)}
               for label, (v6, v3, vr) in rows.items()}
    (runs / "covariance.json").write_text(json.dumps({"error_model": model.to_dict(), "summary": summary,
                                                      "frames": per_frame}, indent=1))

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f} %"

    def num(v):
        return "n/a" if v is None else f"{v:.1f}"

    table = ["| covariance | block | poses | inside 1σ (expected) | inside 2σ (expected) | inside 3σ (expected) | mean NEES (expected) | median NEES (expected) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, blocks in summary.items():
        for block, r in blocks.items():
            dof = 6 if block == "6dof" else 3
            median_expected = 5.35 if dof == 6 else 2.37
            table.append(f"| {label} | {'pose (6 DoF)' if dof == 6 else block + ' (3 DoF)'} | {r['n']} | "
                         + " | ".join(f"{pct(r[f'inside_{k}sigma'])} ({pct(r[f'expected_{k}sigma'])})" for k in (1, 2, 3))
                         + f" | {num(r['mean_nees'])} ({dof}) | {num(r['median_nees'])} ({median_expected}) |")
    sigmas = [f["calibrated"]["sigma_xyz_m"] for f in per_frame if f.get("success")]
    median_sigma = np.median(np.asarray(sigmas), axis=0) if sigmas else None
    shown_map = shown_path(args.map)
    note = bundle.manifest.get("training", {}).get("note")  # e.g. a bundle made from a training checkpoint
    map_note = f" ({note})" if note else ""
    body = f"""## Pose covariance calibration on held-out frames

- Command: `{shown_command(args, "covariance", always=("map",))}`
{machine_line(load0, load1)}
- Map: `{shown_map}`{map_note}; error model {'measured by this run into a copy (the map had none), ' if calibrated_here else ''}on
  {len(model.frames)} held-out frames: coordinate sigma {100 * model.coordinate_sigma_m:.1f} cm, covariance scale {model.covariance_scale:.1f}
  ({model.n_points} inliers of {model.n_frames} localised frames).
- Checked on {len(queries)} other held-out RedKitchen frames (every {args.query_every}th frame that is neither a mapping nor an
  error-model frame; frames of the same recording as the mapping frames, not the 7-Scenes test split), in-process
  `Localizer.localize` with the default gates; {len(sigmas)} accepted.
- NEES = eᵀ Σ⁻¹ e with e the pose error against ground truth in the covariance's convention (camera centre in map axes,
  rotation about the map axes). "Inside kσ": NEES <= k²; expected: the chi-square probability for a correct covariance.
  "reprojection only": PnP's covariance from pixel residuals alone (what the node published before the error model).
- Median published 1-sigma position (x, y, z): {', '.join(f'{100 * s:.1f} cm' for s in median_sigma) if median_sigma is not None else 'n/a'}.

{chr(10).join(table)}
"""
    publish_section("covariance", body, args.benchmarks_file)


def add_covariance_parser(sub) -> None:
    c = sub.add_parser("covariance", help="calibration of the pose covariance on held-out RedKitchen frames")
    add_map_benchmark_arguments(c)
    c.add_argument("--calibration-frames", type=int, default=12, help="when the map has no error model yet")
    c.add_argument("--query-every", type=int, default=5, help="every N-th remaining held-out frame")
    c.add_argument("--frames", type=int, default=60)
    c.set_defaults(func=bench_covariance, parser=c)
