"""Pose-error metrics on hand-computed cases, results.json / CSV / CDF plot outputs."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import make_pose, matrix_from_rotvec, pose_error
from offline.evaluate import (auto_block_length, block_bootstrap_ci, evaluate_localizer, json_safe, latency_summary,
                              paired_median_change_ci, plot_error_cdf, summarize_errors, write_results)
from offline.sources.frames import Frame

CAMERA = CameraIntrinsics(64, 48, 50.0, 50.0, 31.5, 23.5)


def test_pose_error_hand_computed_cases():
    T_gt = make_pose(np.eye(3), [1.0, 2.0, 3.0])
    # A pure 3-4-5 translation offset: 5 cm, no rotation.
    dt, dr = pose_error(make_pose(np.eye(3), [1.03, 2.04, 3.0]), T_gt)
    assert dt == pytest.approx(0.05) and dr == pytest.approx(0.0, abs=1e-6)
    # A 90 degree turn about z in place.
    R90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    dt, dr = pose_error(make_pose(R90, [1.0, 2.0, 3.0]), T_gt)
    assert dt == pytest.approx(0.0) and dr == pytest.approx(90.0)
    # 180 degrees about x, from an arbitrary start: the angle of the relative rotation.
    R0 = matrix_from_rotvec([0.2, 0.1, -0.4])
    dt, dr = pose_error(make_pose(matrix_from_rotvec([np.pi, 0, 0]) @ R0, [0, 0, 0]), make_pose(R0, [0, 0, 0]))
    assert dr == pytest.approx(180.0, abs=1e-5)


def test_summary_with_failures_as_infinite_errors():
    # 4 localised queries + 1 failed one.
    t = [0.01, 0.04, 0.08, 0.30]
    r = [0.5, 6.0, 3.0, 1.0]
    s = summarize_errors(t, r, n_failed=1)
    assert s["n_queries"] == 5 and s["n_failed"] == 1 and s["n_localized"] == 4
    # Sorted translation errors with the failure: 0.01 0.04 0.08 0.30 inf -> median 0.08.
    assert s["median_translation_m"] == pytest.approx(0.08)
    # Rotation: 0.5 1 3 6 inf -> median 3.
    assert s["median_rotation_deg"] == pytest.approx(3.0)
    # 5 cm / 5 deg: only query 0 (query 1 has 6 deg) -> 1/5.
    assert s["recall_5cm_5deg"] == pytest.approx(0.2)
    # 10 cm / 10 deg: queries 0, 1, 2 -> 3/5.
    assert s["recall_10cm_10deg"] == pytest.approx(0.6)
    assert s["recall_2cm_2deg"] == pytest.approx(0.2)
    # Means over the localised queries only.
    assert s["mean_translation_m"] == pytest.approx(np.mean(t))
    assert s["mean_rotation_deg"] == pytest.approx(np.mean(r))


def test_summary_none_and_nan_count_as_failures_and_medians_can_be_infinite():
    s = summarize_errors([0.01, None, float("nan")], [1.0, None, 2.0], n_failed=1)
    assert s["n_queries"] == 4 and s["n_failed"] == 3
    assert math.isinf(s["median_translation_m"])
    assert s["recall_5cm_5deg"] == pytest.approx(0.25)
    empty = summarize_errors([], [], n_failed=0)
    assert empty["n_queries"] == 0 and empty["median_translation_m"] is None
    all_failed = summarize_errors([], [], n_failed=3)
    assert all_failed["n_failed"] == 3 and all_failed["mean_translation_m"] is None
    assert math.isinf(all_failed["median_rotation_deg"]) and all_failed["recall_10cm_10deg"] == 0.0
    with pytest.raises(ValueError, match="length"):
        summarize_errors([0.1], [1.0, 2.0])
    with pytest.raises(ValueError, match="n_failed"):
        summarize_errors([0.1], [1.0], n_failed=-1)


def test_latency_percentiles():
    timings = [{"extract": float(i), "total": 10.0 * i} for i in range(1, 11)] + [{"total": 1000.0}]
    lat = latency_summary(timings)
    # numpy's linear percentile of 1..10: p50 = 5.5, p90 = 9.1.
    assert lat["extract"]["p50"] == pytest.approx(5.5) and lat["extract"]["p90"] == pytest.approx(9.1)
    assert lat["extract"]["n"] == 10 and lat["total"]["n"] == 11
    assert lat["total"]["p50"] == pytest.approx(60.0)
    assert latency_summary([]) == {}


def test_results_json_is_valid_json_with_required_keys(tmp_path: Path):
    s = summarize_errors([0.01], [1.0], n_failed=2)  # median is infinite
    s["latency_ms"] = latency_summary([{"extract": 1.0, "d2s": 2.0, "pnp": 3.0, "total": 6.0}])
    rows = [{"name": "a", "success": True, "reason": "", "translation_error_m": 0.01, "rotation_error_deg": 1.0,
             "timings_ms": {"total": 6.0}},
            {"name": "b", "success": False, "reason": "only 3 inliers, \"quoted\"", "translation_error_m": None,
             "rotation_error_deg": float("inf"), "timings_ms": {}}]
    path = write_results(tmp_path, s, rows)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    for key in ("n_queries", "n_failed", "median_translation_m", "median_rotation_deg", "recall_5cm_5deg",
                "recall_10cm_10deg", "latency_ms"):
        assert key in doc, key
    assert doc["median_translation_m"] is None  # inf is written as null
    assert doc["latency_ms"]["total"]["p50"] == 6.0 and "p90" in doc["latency_ms"]["pnp"]
    assert doc["queries"][1]["rotation_error_deg"] is None
    with open(tmp_path / "queries.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["name"] for row in table] == ["a", "b"]
    assert table[1]["reason"] == "only 3 inliers, \"quoted\"" and table[1]["translation_error_m"] == ""
    assert table[0]["time_total_ms"] == "6.0"


def test_json_safe():
    assert json_safe({"a": np.float32(1.5), "b": [np.inf, -np.inf, np.nan], "c": np.int64(3), "d": np.bool_(True),
                      "e": np.arange(2)}) == {"a": 1.5, "b": [None, None, None], "c": 3, "d": True, "e": [0, 1]}


def test_plot_error_cdf_writes_a_png(tmp_path: Path):
    path = plot_error_cdf(tmp_path, [[0.01, 0.2, None, float("inf")], [0.03, 0.04]], [[1.0, 2.0, None, 3.0], [0.5, 9.0]],
                          ["d2s", "match"])
    assert path == tmp_path / "error_cdf.png"
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(ValueError):
        plot_error_cdf(tmp_path, [[0.1]], [[1.0]], ["a", "b"])


# ----------------------------------------------------------------------------- evaluate_localizer


@dataclass
class FakeResult:
    # A LocalizationResult-shaped record (evaluate only reads attributes).
    success: bool
    reason: str
    T_world_cam: np.ndarray | None
    n_keypoints: int = 100
    n_reliable: int = 50
    n_inliers: int = 30
    timings_ms: dict = field(default_factory=dict)


def _frames(tmp_path: Path, n: int) -> list[Frame]:
    frames = []
    for i in range(n):
        path = tmp_path / f"f{i}.png"
        cv2.imwrite(str(path), np.full((48, 64, 3), 10 * i, np.uint8))
        frames.append(Frame(name=f"seq/f{i}", image_path=path, T_world_cam=make_pose(np.eye(3), [float(i), 0, 0]),
                            camera=CAMERA))
    return frames


def test_evaluate_localizer_against_ground_truth(tmp_path: Path):
    frames = _frames(tmp_path, 6)
    frames[5] = Frame(name="seq/missing", image_path=tmp_path / "nope.png", T_world_cam=np.eye(4), camera=CAMERA)
    calls = []

    def localize(image: np.ndarray, camera: CameraIntrinsics) -> FakeResult:
        index = len(calls)
        calls.append(image.shape)
        assert camera == CAMERA
        timings = {"extract": 1.0 + index, "total": 2.0 + index}
        if index == 1:
            return FakeResult(False, "only 3 inliers (minimum 15)", None, timings_ms=timings)
        if index == 3:
            raise RuntimeError("boom")
        # Estimate: ground truth (x = index) shifted by 3 cm along y.
        return FakeResult(True, "", make_pose(np.eye(3), [float(index), 0.03, 0.0]), timings_ms=timings)

    summary, rows = evaluate_localizer(localize, frames, every=1, progress=False)
    assert len(rows) == 6 and len(calls) == 5  # the missing image never reaches the localizer
    assert [r["success"] for r in rows] == [True, False, True, False, True, False]
    assert rows[0]["translation_error_m"] == pytest.approx(0.03)
    assert rows[1]["reason"].startswith("only 3 inliers")
    assert rows[3]["reason"] == "RuntimeError: boom"
    assert "cannot read image" in rows[5]["reason"]
    assert summary["n_queries"] == 6 and summary["n_failed"] == 3
    assert summary["recall_5cm_5deg"] == pytest.approx(0.5)
    # errors: 0.03 x3, inf x3 -> median of (0.03, 0.03, 0.03, inf, inf, inf) = inf
    assert math.isinf(summary["median_translation_m"])
    assert summary["latency_ms"]["total"]["n"] == 4  # frames whose localize returned
    write_results(tmp_path / "out", summary, rows)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["median_translation_m"] is None and doc["n_failed"] == 3

    summary2, rows2 = evaluate_localizer(lambda im, cam: FakeResult(True, "", np.eye(4)), frames[:5], every=2,
                                         progress=False)
    assert [r["name"] for r in rows2] == ["seq/f0", "seq/f2", "seq/f4"]
    with pytest.raises(ValueError, match="every"):
        evaluate_localizer(localize, frames, every=0)


# ------------------------------------------------------------------------------ confidence intervals
def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """A stationary Gaussian AR(1) series with unit marginal variance (median 0)."""
    x = np.empty(n)
    x[0] = rng.normal()
    noise = rng.normal(scale=math.sqrt(1 - phi ** 2), size=n)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + noise[i]
    return x


def test_median_interval_covers_a_known_median_at_about_the_nominal_rate():
    # Log-normal errors with a median of exactly 5 cm, independent draws of 120 queries.
    rng = np.random.default_rng(1)
    covered, repeats = 0, 300
    for i in range(repeats):
        errors = 0.05 * np.exp(rng.normal(scale=0.8, size=120))
        ci = block_bootstrap_ci(errors, n_resamples=600, seed=i)
        assert ci["low"] <= np.median(errors) <= ci["high"]
        covered += ci["low"] <= 0.05 <= ci["high"]
    # Nominal 95 %; a binomial over 300 repeats has an SD of ~1.3 points.
    assert 0.89 <= covered / repeats <= 0.99, covered / repeats


def test_block_bootstrap_is_wider_than_iid_on_a_correlated_series_and_keeps_its_coverage():
    rng = np.random.default_rng(2)
    block_cover = iid_cover = 0
    ratios = []
    repeats = 150
    for i in range(repeats):
        errors = 0.05 * np.exp(0.8 * _ar1(rng, 480, 0.9))  # neighbouring queries share most of their error
        block = block_bootstrap_ci(errors, n_resamples=500, seed=i)
        iid = block_bootstrap_ci(errors, block_length=1, n_resamples=500, seed=i)
        assert block["block_length"] > 5  # the autocorrelation, not only the n^(1/3) floor, sets it
        ratios.append((block["high"] - block["low"]) / (iid["high"] - iid["low"]))
        block_cover += block["low"] <= 0.05 <= block["high"]
        iid_cover += iid["low"] <= 0.05 <= iid["high"]
    assert np.median(ratios) > 1.8, np.median(ratios)
    # An iid bootstrap on this series claims a precision it does not have; the block one covers
    # the true median far more often (a block bootstrap of a short strongly correlated series is
    # still somewhat optimistic).
    assert iid_cover / repeats < 0.7, iid_cover / repeats
    assert block_cover / repeats > 0.8, block_cover / repeats


def test_block_length_rule_and_failures_in_the_interval():
    rng = np.random.default_rng(3)
    assert auto_block_length(rng.normal(size=1000)) == 10  # iid: the n^(1/3) floor
    assert auto_block_length([1.0, 2.0, 3.0]) == 1
    assert auto_block_length(np.sort(rng.normal(size=100))) == 25  # a trend: capped at n / 4
    # Failures are infinite errors: with most queries failed the interval's top is infinite.
    errors = np.r_[np.full(30, 0.02), np.full(70, np.inf)]
    ci = block_bootstrap_ci(errors, block_length=5, n_resamples=200)
    assert ci["high"] == math.inf
    with pytest.raises(ValueError):
        block_bootstrap_ci(errors, block_length=0)
    assert block_bootstrap_ci([])["low"] is None


def test_summary_has_translation_recalls_and_the_median_interval():
    t = [0.01, 0.03, 0.04, 0.08, 0.2, None]
    s = summarize_errors(t, [1.0, 1.0, 1.0, 1.0, 1.0, None], n_failed=1)
    assert s["n_queries"] == 7
    assert s["recall_2cm"] == pytest.approx(1 / 7)
    assert s["recall_5cm"] == pytest.approx(3 / 7)
    assert s["recall_10cm"] == pytest.approx(4 / 7)
    low, high = s["median_translation_ci95_m"]
    assert low <= s["median_translation_m"] <= high
    assert s["bootstrap"]["block_length"] >= 1
    assert json.loads(json.dumps(json_safe(s)))["median_translation_ci95_m"][1] in (None, high)


def test_paired_change_interval_sees_a_real_effect_and_not_a_null_one():
    rng = np.random.default_rng(4)
    # Three seeds per arm on the same 300 correlated queries: a shared per-query difficulty
    # (the pairing), seed-to-seed noise of ~9 % (as measured on RedKitchen) and per-(seed, query) noise.
    difficulty = 0.05 * np.exp(0.8 * _ar1(rng, 300, 0.9))

    def arm(scale: float) -> np.ndarray:
        seed_factor = np.exp(rng.normal(scale=0.09, size=(3, 1)))
        return scale * difficulty * seed_factor * np.exp(rng.normal(scale=0.3, size=(3, 300)))

    null = paired_median_change_ci(arm(1.0), arm(1.0), n_resamples=500)
    assert null["low"] < 0 < null["high"] and not null["excludes_zero"]
    effect = paired_median_change_ci(arm(1.0), arm(0.6), n_resamples=500)
    assert effect["excludes_zero"] and effect["high"] < 0 and effect["low"] < -0.4 + 0.2
    assert -0.55 < effect["change"] < -0.25
    with pytest.raises(ValueError):
        paired_median_change_ci(np.ones((3, 10)), np.ones((3, 9)))
