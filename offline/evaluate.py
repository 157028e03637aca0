"""Scoring a localizer against ground truth: pose errors, recalls, latency, error CDF.

A query that does not localise counts as an infinite error: it lowers every recall and
pushes the medians up (to infinity when more than half of the queries fail).

JSON encoding of infinities: JSON has no ``Infinity``, so every non-finite number (an
infinite median, the error of a failed query) is written as ``null``. ``n_failed`` and the
per-query ``success`` flag say which it was.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from d2s_nerf_ros.geometry import pose_error, quat_wxyz_from_matrix
from offline.sources.frames import Frame

RESULTS_NAME = "results.json"
QUERIES_CSV_NAME = "queries.csv"
CDF_PLOT_NAME = "error_cdf.png"

# (translation in metres, rotation in degrees) pairs reported as recall_<cm>cm_<deg>deg.
RECALL_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.02, 2.0), (0.05, 5.0), (0.10, 10.0), (0.25, 2.0), (0.50, 5.0))


# Translation-only recalls (the pose's position within 2 / 5 / 10 cm), reported as recall_<cm>cm.
RECALL_TRANSLATION_CM: tuple[float, ...] = (2.0, 5.0, 10.0)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def _as_error_array(values: Iterable[Any]) -> np.ndarray:
    """Errors as float64 with every missing / NaN / negative entry turned into +inf (a failure)."""
    out = np.array([np.inf if v is None else float(v) for v in values], dtype=np.float64)
    out[~np.isfinite(out) | (out < 0)] = np.inf
    return out


def _recall_key(t_m: float, r_deg: float) -> str:
    cm = t_m * 100.0
    cm_text = f"{cm:g}"
    return f"recall_{cm_text}cm_{r_deg:g}deg"


def summarize_errors(errors_t_m: Sequence[float | None], errors_r_deg: Sequence[float | None],
                     n_failed: int = 0) -> dict[str, Any]:
    """Summary of pose errors.

    ``errors_t_m`` / ``errors_r_deg``: one entry per query that returned a pose (None, NaN
    or inf entries also count as failures); ``n_failed`` more queries failed outright.
    Medians and recalls are over all queries with failures as infinite errors; the means
    are over the localised queries only (None when there are none).
    """
    t = _as_error_array(errors_t_m)
    r = _as_error_array(errors_r_deg)
    if t.shape != r.shape:
        raise ValueError(f"errors_t_m and errors_r_deg differ in length ({len(t)} vs {len(r)})")
    if int(n_failed) < 0:
        raise ValueError(f"n_failed must be >= 0, got {n_failed}")
    failed_extra = np.full(int(n_failed), np.inf)
    t_all = np.concatenate([t, failed_extra])
    r_all = np.concatenate([r, failed_extra])
    localised = np.isfinite(t_all) & np.isfinite(r_all)
    n = len(t_all)
    summary: dict[str, Any] = {
        "n_queries": int(n),
        "n_failed": int(n - localised.sum()),
        "n_localized": int(localised.sum()),
        "median_translation_m": float(np.median(t_all)) if n else None,
        "median_rotation_deg": float(np.median(r_all)) if n else None,
        "mean_translation_m": float(np.mean(t_all[localised])) if localised.any() else None,
        "mean_rotation_deg": float(np.mean(r_all[localised])) if localised.any() else None,
    }
    for t_thr, r_thr in RECALL_THRESHOLDS:
        hits = (t_all <= t_thr) & (r_all <= r_thr)
        summary[_recall_key(t_thr, r_thr)] = float(hits.mean()) if n else 0.0
    for cm in RECALL_TRANSLATION_CM:
        summary[f"recall_{cm:g}cm"] = float((t_all <= cm / 100.0).mean()) if n else 0.0
    # The medians' 95 % intervals, block bootstrap over the queries in the order given (the
    # recording order for evaluate_localizer; failures counted outright come last).
    ci_t = block_bootstrap_ci(t_all)
    ci_r = block_bootstrap_ci(r_all, block_length=ci_t["block_length"] or None)
    summary["median_translation_ci95_m"] = [ci_t["low"], ci_t["high"]]
    summary["median_rotation_ci95_deg"] = [ci_r["low"], ci_r["high"]]
    summary["bootstrap"] = {"method": "circular moving-block bootstrap over consecutive queries, percentile interval",
                            "block_length": ci_t["block_length"], "n_resamples": ci_t["n_resamples"]}
    return summary


def _block_starts(n: int, block_length: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) indices of circular moving-block resamples of a length-n series."""
    n_blocks = -(-n // block_length)
    starts = rng.integers(0, n, size=(n_resamples, n_blocks))
    idx = (starts[:, :, None] + np.arange(block_length)[None, None, :]) % n
    return idx.reshape(n_resamples, -1)[:, :n]


def auto_block_length(values: Sequence[float]) -> int:
    """Block length for a bootstrap over consecutive queries: the larger of n^(1/3) (the usual
    rate for a block bootstrap of a quantile) and the first lag at which the errors' rank
    autocorrelation falls below 0.2 (so a block spans what neighbouring frames share: on
    RedKitchen the error is a smooth function of the distance to the nearest mapping frame),
    capped at n / 4 so that there are at least four blocks. Ranks, so failures (inf) count
    as the largest errors rather than breaking the estimate."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 8:
        return 1
    ranks = np.argsort(np.argsort(np.where(np.isnan(x), np.inf, x), kind="stable"), kind="stable").astype(np.float64)
    ranks -= ranks.mean()
    denom = float(ranks @ ranks)
    lag = 1
    if denom > 0:
        while lag < n // 4 and float(ranks[:-lag] @ ranks[lag:]) / denom >= 0.2:
            lag += 1
    return int(min(max(lag, math.ceil(n ** (1.0 / 3.0))), max(1, n // 4)))


def block_bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], np.ndarray] | None = None,
                       block_length: int | None = None, confidence: float = 0.95,
                       n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Percentile interval of ``statistic`` (default: the median) from a circular moving-block
    bootstrap over the series ``values`` in its order (queries in recording order: neighbouring
    frames see nearly the same image, so an iid bootstrap would make the interval too narrow).

    ``statistic`` maps an (R, n) array of resamples to R values. Infinite entries (failed
    queries) are kept: the interval may end at inf. Returns {"low", "high", "block_length",
    "n_resamples", "confidence"}; block_length None picks ``auto_block_length``.
    """
    x = np.asarray(values, dtype=np.float64)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(x) == 0:
        return {"low": None, "high": None, "block_length": 0, "n_resamples": 0, "confidence": confidence}
    block = auto_block_length(x) if block_length is None else int(block_length)
    if block < 1:
        raise ValueError(f"block_length must be >= 1, got {block}")
    block = min(block, len(x))
    stat = statistic or (lambda a: np.median(a, axis=1))
    idx = _block_starts(len(x), block, int(n_resamples), np.random.default_rng(seed))
    values_r = np.sort(np.asarray(stat(x[idx]), dtype=np.float64))
    # Order statistics rather than np.percentile: interpolating between inf values gives nan.
    alpha = (1.0 - confidence) / 2.0
    lo = values_r[int(math.floor(alpha * (len(values_r) - 1)))]
    hi = values_r[int(math.ceil((1.0 - alpha) * (len(values_r) - 1)))]
    return {"low": float(lo), "high": float(hi), "block_length": int(block), "n_resamples": int(n_resamples),
            "confidence": confidence}


def paired_median_change_ci(errors_a: np.ndarray, errors_b: np.ndarray, block_length: int | None = None,
                            confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Relative change of the median error from arm A to arm B, median_B / median_A - 1, with a
    bootstrap interval that holds both sources of noise: the training seeds (resampled with
    replacement within each arm) and the queries (circular blocks of consecutive queries, the
    same blocks for both arms: the comparison is paired per query).

    ``errors_a`` / ``errors_b``: (seeds, queries) arrays over the same queries in recording
    order, inf for a failed query. A median pools every (seed, query) entry of an arm.
    """
    a = np.atleast_2d(np.asarray(errors_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(errors_b, dtype=np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"both arms need errors for the same non-empty set of queries, got {a.shape} and {b.shape}")
    n = a.shape[1]
    block = auto_block_length(np.median(a, axis=0)) if block_length is None else int(block_length)
    rng = np.random.default_rng(seed)
    idx = _block_starts(n, min(block, n), int(n_resamples), rng)
    seeds_a = rng.integers(0, a.shape[0], size=(int(n_resamples), a.shape[0]))
    seeds_b = rng.integers(0, b.shape[0], size=(int(n_resamples), b.shape[0]))
    changes = np.empty(int(n_resamples))
    for i in range(int(n_resamples)):
        med_a = np.median(a[seeds_a[i]][:, idx[i]])
        med_b = np.median(b[seeds_b[i]][:, idx[i]])
        with np.errstate(invalid="ignore", divide="ignore"):
            changes[i] = med_b / med_a - 1.0
    changes = np.sort(changes[~np.isnan(changes)])  # inf / inf: both arms failed on most of the resample
    with np.errstate(invalid="ignore", divide="ignore"):
        point = float(np.median(b) / np.median(a) - 1.0)
    if len(changes) == 0:
        return {"change": point, "low": None, "high": None, "excludes_zero": False, "block_length": block}
    alpha = (1.0 - confidence) / 2.0
    lo = float(changes[int(math.floor(alpha * (len(changes) - 1)))])
    hi = float(changes[int(math.ceil((1.0 - alpha) * (len(changes) - 1)))])
    return {"change": point, "low": lo, "high": hi, "excludes_zero": bool(lo > 0 or hi < 0),
            "block_length": int(block), "n_resamples": int(n_resamples), "confidence": confidence}


def latency_summary(timings: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{stage: {"p50", "p90", "mean", "n"}} in milliseconds over the frames that report the stage."""
    stages: list[str] = []
    for t in timings:
        for key in t:
            if key not in stages:
                stages.append(key)
    out: dict[str, dict[str, float]] = {}
    for stage in stages:
        values = np.array([float(t[stage]) for t in timings if stage in t and t[stage] is not None], dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            continue
        out[stage] = {
            "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)),
            "mean": float(values.mean()),
            "n": int(len(values)),
        }
    return out


def json_safe(value: Any) -> Any:
    """``value`` with numpy types made plain and every non-finite float made None (JSON null)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_CSV_COLUMNS = ("name", "success", "reason", "translation_error_m", "rotation_error_deg", "n_keypoints",
                "n_reliable", "n_inliers", "est_x", "est_y", "est_z", "est_qw", "est_qx", "est_qy", "est_qz")


def write_results(out_dir: Path | str, summary: dict[str, Any], per_query_rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``results.json`` (the summary plus ``queries``) and ``queries.csv``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = json_safe(dict(summary, queries=list(per_query_rows)))
    _atomic_write_text(out_dir / RESULTS_NAME, json.dumps(doc, indent=1, allow_nan=False))

    stages = sorted({k for row in per_query_rows for k in (row.get("timings_ms") or {})})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*_CSV_COLUMNS, *(f"time_{s}_ms" for s in stages)])
    for row in per_query_rows:
        safe = json_safe(row)
        timings = safe.get("timings_ms") or {}
        cells = ["" if safe.get(c) is None else safe.get(c) for c in _CSV_COLUMNS]
        cells += ["" if timings.get(s) is None else timings[s] for s in stages]
        writer.writerow(cells)
    _atomic_write_text(out_dir / QUERIES_CSV_NAME, buffer.getvalue())
    return out_dir / RESULTS_NAME


def _cdf_curve(errors: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite errors and the fraction of ALL queries at or below each (failures never count)."""
    e = _as_error_array(errors)
    n = max(len(e), 1)
    finite = np.sort(e[np.isfinite(e)])
    return finite, np.arange(1, len(finite) + 1) / n


def plot_error_cdf(out_dir: Path | str, errors_t_m: Sequence[Sequence[float | None]],
                   errors_r_deg: Sequence[Sequence[float | None]], labels: Sequence[str]) -> Path:
    """``error_cdf.png``: translation and rotation error CDFs, one curve per method.

    Each inner sequence holds one method's errors for every query, None / inf for a failure,
    so a curve tops out at the fraction of queries that localised.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display onboard or in CI
    import matplotlib.pyplot as plt

    if not (len(errors_t_m) == len(errors_r_deg) == len(labels)):
        raise ValueError("plot_error_cdf needs one translation list, one rotation list and one label per method")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(10, 4))
    for errors_t, errors_r, label in zip(errors_t_m, errors_r_deg, labels):
        x, y = _cdf_curve(errors_t)
        ax_t.step(np.maximum(x * 100.0, 1e-3), y, where="post", label=label)
        x, y = _cdf_curve(errors_r)
        ax_r.step(np.maximum(x, 1e-4), y, where="post", label=label)
    for ax, xlabel, marks in ((ax_t, "translation error [cm]", (5, 10)), (ax_r, "rotation error [deg]", (5, 10))):
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of queries")
        for m in marks:
            ax.axvline(m, color="grey", linewidth=0.5, linestyle="--")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Pose error CDF (failed queries count as infinite error)")
    fig.tight_layout()
    path = out_dir / CDF_PLOT_NAME
    tmp = out_dir / (CDF_PLOT_NAME + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from offline.progress import progress_bar

    return progress_bar(items, desc=desc, unit="frame")


def evaluate_localizer(localize_fn: Callable[[Any, Any], Any], queries: Sequence[Frame], every: int = 1,
                       progress: bool = True, load_input: Callable[[Frame], Any] | None = None
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Localise every ``every``-th query and compare with its ``T_world_cam``.

    ``localize_fn(load_input(frame), frame.camera)`` returns a ``LocalizationResult``-like
    object (success, reason, T_world_cam, n_keypoints, n_reliable, n_inliers, timings_ms);
    ``load_input`` defaults to reading the frame's image (a feature cache passes the frame's
    cached features instead, with ``Localizer.localize_features``). A query whose input cannot
    be loaded or whose call raises counts as a failure with that reason; the evaluation goes
    on. Returns (summary with ``latency_ms``, one row per query).
    """
    load_input = load_input or (lambda frame: frame.load_rgb())
    if int(every) < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    selected = list(queries)[:: int(every)]
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, float]] = []
    t_start = time.perf_counter()
    for frame in _progress(selected, progress, "localising"):
        row: dict[str, Any] = {"name": frame.name, "success": False, "reason": "", "translation_error_m": None,
                               "rotation_error_deg": None, "n_keypoints": 0, "n_reliable": 0, "n_inliers": 0,
                               "timings_ms": {}}
        try:
            result = localize_fn(load_input(frame), frame.camera)
        except Exception as exc:  # one broken query must not end the evaluation
            row["reason"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        row["reason"] = str(getattr(result, "reason", ""))
        row["n_keypoints"] = int(getattr(result, "n_keypoints", 0))
        row["n_reliable"] = int(getattr(result, "n_reliable", 0))
        row["n_inliers"] = int(getattr(result, "n_inliers", 0))
        # What the acceptance gates saw (d2s_nerf_ros.localizer), for choosing their thresholds.
        row["inlier_ratio"] = float(getattr(result, "inlier_ratio", float("nan")))
        row["reprojection_rmse_px"] = float(getattr(result, "reprojection_rmse_px", float("nan")))
        row["timings_ms"] = {k: float(v) for k, v in (getattr(result, "timings_ms", None) or {}).items()}
        timings.append(row["timings_ms"])
        T = getattr(result, "T_world_cam", None)
        if bool(getattr(result, "success", False)) and T is not None and np.all(np.isfinite(T)):
            T = np.asarray(T, dtype=np.float64)
            dt, dr = pose_error(T, np.asarray(frame.T_world_cam, dtype=np.float64))
            q = quat_wxyz_from_matrix(T[:3, :3])
            row.update(success=True, translation_error_m=dt, rotation_error_deg=dr,
                       est_x=T[0, 3], est_y=T[1, 3], est_z=T[2, 3],
                       est_qw=q[0], est_qx=q[1], est_qy=q[2], est_qz=q[3])
        elif not row["reason"]:
            row["reason"] = "no pose returned"
        rows.append(row)
    summary = summarize_errors([r["translation_error_m"] for r in rows], [r["rotation_error_deg"] for r in rows], 0)
    summary["latency_ms"] = latency_summary(timings)
    summary["every"] = int(every)
    summary["wall_time_s"] = time.perf_counter() - t_start
    failures: dict[str, int] = {}
    for r in rows:
        if not r["success"]:
            failures[r["reason"]] = failures.get(r["reason"], 0) + 1
    summary["failure_reasons"] = failures
    return summary, rows
