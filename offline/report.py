"""The map report: one self-contained HTML page (figures embedded as PNG) written into
the bundle, so an engineer can judge a map in a minute before deploying it."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from offline.labelled import LabelledImage
from offline.sources.frames import Frame


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img_tag(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def trajectory_figure(frames: list[Frame], synthetic_positions: np.ndarray | None, points: np.ndarray | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    if points is not None and len(points):
        sel = points[np.random.default_rng(0).choice(len(points), min(len(points), 5000), replace=False)]
        ax.scatter(sel[:, 0], sel[:, 1], s=0.3, c="0.75", label="labelled 3D points")
    pos = np.array([f.T_world_cam[:3, 3] for f in frames])
    ax.plot(pos[:, 0], pos[:, 1], "-o", ms=3, c="tab:blue", label="mapping frames")
    for f in frames:  # viewing direction: the camera's z axis
        d = f.T_world_cam[:3, 2] * 0.1
        ax.arrow(f.T_world_cam[0, 3], f.T_world_cam[1, 3], d[0], d[1], color="tab:blue", width=0.002)
    if synthetic_positions is not None and len(synthetic_positions):
        ax.scatter(synthetic_positions[:, 0], synthetic_positions[:, 1], s=6, c="tab:orange", label="synthetic views (kept)")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title("Seen from above (map frame x-y)")
    ax.axis("equal")
    ax.legend(loc="best", fontsize=8)
    return fig


def training_figure(history: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    its = [h["iteration"] for h in history]
    for key in ("loss", "xyz_loss", "rel_loss", "reproj_loss"):
        vals = [h.get(key) for h in history]
        if any(v is not None and np.isfinite(v) and v != 0 for v in vals):
            ax.plot(its, [np.nan if v is None else v for v in vals], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_title("D2S training")
    ax.legend(fontsize=8)
    return fig


CURVE_PANELS = (("median_error_m", "median 3D error of labelled keypoints [m]", True),
                ("reliable_within_10cm", "reliable labelled predictions within 10 cm", False),
                ("reliable_per_image", "reliable predictions per image", False),
                ("median_pose_t_m", "median pose error (PnP) [m]", True))


def learning_curves_figure(curves: list[dict[str, Any]]):
    """The training's learning curves: training frames solid, validation frames dashed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    its = [c["iteration"] for c in curves]
    for ax, (key, title, log_scale) in zip(axes.flat, CURVE_PANELS):
        for part, style in (("train", "-o"), ("validation", "--s")):
            values = [(c.get(part) or {}).get(key) for c in curves]
            if any(v is not None for v in values):
                ax.plot(its, [np.nan if v is None else v for v in values], style, ms=3,
                        label="training frames" if part == "train" else "validation frames")
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # e.g. no depth: no labelled validation keypoints, so no 3D-error curve
            ax.text(0.5, 0.5, "no labelled keypoints", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def histogram_figure(counts: list[int], threshold: float | None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(counts, bins=30, color="tab:orange")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"keep threshold {threshold:.0f}")
        ax.legend()
    ax.set_xlabel("matches between render and reference frame")
    ax.set_ylabel("renders")
    ax.set_title("Synthetic view filter")
    return fig


def samples_figure(pairs: list[tuple[np.ndarray, np.ndarray, str]]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(7, 2.6 * len(pairs)), squeeze=False)
    for row, (real, render, title) in enumerate(pairs):
        axes[row, 0].imshow(real)
        axes[row, 0].set_title("real (reference)", fontsize=8)
        axes[row, 1].imshow(render)
        axes[row, 1].set_title(title, fontsize=8)
        for a in axes[row]:
            a.axis("off")
    return fig


def write_report(map_dir: Path, report_path: Path, frames: list[Frame], real: list[LabelledImage],
                 history: list[dict[str, Any]], synthesis_stats: dict[str, Any],
                 query_frames: list[Frame] | None = None, extra_sections: list[tuple[str, str]] | None = None,
                 map_name: str | None = None, learning_curves: list[dict[str, Any]] | None = None) -> Path:
    """Write the report page to ``report_path`` (the caller adds it to the bundle); ``map_name``
    titles it (default: ``map_dir``'s name)."""
    import matplotlib

    matplotlib.use("Agg")
    sections: list[tuple[str, str]] = []
    manifest = json.loads((Path(map_dir) / "manifest.json").read_text())
    tr = manifest.get("training", {})
    n_kp = sum(len(im.valid) for im in real)
    facts = [
        ("mapping frames", len(frames)),
        ("extractor", f"{manifest['extractor'].get('name')} ({manifest['extractor'].get('max_keypoints')} keypoints)"),
        ("labelled keypoints", f"{tr.get('n_labelled_keypoints')} of {n_kp} ({100.0 * (tr.get('n_labelled_keypoints') or 0) / max(n_kp, 1):.0f} %)"),
        ("augmented images", tr.get("n_augmented_images")),
        ("synthetic images", tr.get("n_synthetic_images")),
        ("final training loss", tr.get("final_loss")),
    ]
    for name, secs in manifest.get("metrics", {}).get("timings_s", {}).items():
        facts.append((f"time: {name}", f"{secs:.1f} s"))
    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    sections.append(("Summary", f"<table>{table}</table>"))

    points = np.concatenate([im.points3D[im.valid] for im in real]) if real else None
    syn_pos = None
    if synthesis_stats.get("kept_positions"):
        syn_pos = np.asarray(synthesis_stats["kept_positions"], dtype=float)
    sections.append(("Trajectory", _img_tag(_png(trajectory_figure(frames, syn_pos, points)), "trajectory")))
    if history:
        sections.append(("Training", _img_tag(_png(training_figure(history)), "training curves")))
    if learning_curves:
        val = tr.get("validation_frames") or []
        steps = sorted({c["iteration"] for c in learning_curves if c["iteration"] > 0})
        warmed = any(c.get("after_head_warmup") for c in learning_curves)
        note = (f"<p>Scored every {steps[0] if steps else '?'} iterations on "
                f"a few real training frames and on {len(val)} validation frames ({html.escape(', '.join(val))}): "
                "real frames of the recording that are neither mapping frames nor scored as queries. A training "
                "curve that stays high is underfitting; a validation curve far above it is overfitting."
                + (" The second point at iteration 0 follows the head warm-up (the per-keypoint head trained "
                   "alone on shuffled keypoints before the attention layers join)." if warmed else "") + "</p>")
        sections.append(("Learning curves", note + _img_tag(_png(learning_curves_figure(learning_curves)),
                                                          "learning curves")))
    if synthesis_stats.get("match_counts"):
        thr = synthesis_stats.get("keep_threshold")
        sections.append(("Synthetic views", _img_tag(_png(histogram_figure(synthesis_stats["match_counts"], thr)), "match histogram")))
    samples = synthesis_stats.get("samples") or []
    pairs = []
    for s in samples[:3]:
        try:
            from offline.sources.frames import load_rgb

            pairs.append((load_rgb(Path(s["reference_image"])), load_rgb(Path(s["render_image"])),
                          f"render s={s.get('s', 0):.2f}, {s.get('matches', '?')} matches"))
        except (KeyError, ValueError, OSError):
            continue
    if pairs:
        sections.append(("Real vs rendered", _img_tag(_png(samples_figure(pairs)), "real vs rendered")))
    if query_frames:
        sections.append(("Localisation on held-out frames", _query_section(map_dir, query_frames)))
    for title, body in extra_sections or []:
        sections.append((title, body))

    body = "\n".join(f"<h2>{html.escape(t)}</h2>\n{b}" for t, b in sections)
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>d2s_nerf map report</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:auto}} td{{padding:2px 12px}} img{{max-width:100%}}</style>
</head><body><h1>Map report: {html.escape(map_name or Path(map_dir).name)}</h1>{body}</body></html>"""
    path = Path(report_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _query_section(map_dir: Path, queries: list[Frame]) -> str:
    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from offline.evaluate import evaluate_localizer

    loc = Localizer.from_path(map_dir, LocalizerConfig())
    summary, rows = evaluate_localizer(loc.localize, queries, progress=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = np.sort(np.array([r["translation_error_m"] if r["translation_error_m"] is not None else np.inf for r in rows]))
    ax.plot(np.minimum(t, 10) * 100, np.arange(1, len(t) + 1) / len(t))
    ax.set_xscale("log")
    ax.set_xlabel("translation error [cm]")
    ax.set_ylabel("fraction of queries")
    ax.set_title("Error CDF")
    keys = ("n_queries", "n_failed", "median_translation_m", "median_rotation_deg", "recall_5cm_5deg", "recall_10cm_10deg")
    table = "".join(f"<tr><td>{k}</td><td>{summary.get(k)}</td></tr>" for k in keys)
    return f"<table>{table}</table>" + _img_tag(_png(fig), "error cdf")
