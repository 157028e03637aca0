"""The benchmark modules' pure parts (no builds): the BENCHMARKS.md section writer and the
ablation's option table, from which map names, build flags and the shown command come."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from offline.bench.ablation import (ABLATION_OPTIONS, ablation_command, add_ablation_parser, options_build_flags,
                                    options_tag, variant_build_command)
from offline.bench.common import write_section

# --------------------------------------------------------------------------- write_section

DOC = ("# Benchmarks\n\nintro, kept as is  \n\n"
       "<!-- BEGIN alpha -->\nold alpha\n<!-- END alpha -->\n\n"
       "between the sections: trailing spaces   \n\t tabs, unicode 5 cm / 5°\n\n"
       "<!-- BEGIN beta -->\nold beta\nline two\n<!-- END beta -->\n\ntail without newline")


def test_write_section_replaces_only_its_own_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(DOC)
    write_section("alpha", "new alpha\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", md)
    text = md.read_text()
    before, after = DOC.split("<!-- BEGIN alpha -->")[0], DOC.split("<!-- END alpha -->")[1]
    assert text == before + "<!-- BEGIN alpha -->\nnew alpha\n\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- END alpha -->" + after
    # A body with regex replacement syntax is written literally; rewriting is idempotent.
    write_section("beta", r"path \1 \g<0> $1", md)
    write_section("beta", r"path \1 \g<0> $1", md)
    assert md.read_text() == text.replace("old beta\nline two", r"path \1 \g<0> $1")


def test_write_section_appends_a_new_section_and_keeps_the_rest(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(DOC)
    write_section("gamma", "gamma body", md)
    text = md.read_text()
    assert text == DOC + "\n\n<!-- BEGIN gamma -->\ngamma body\n<!-- END gamma -->\n"
    # A prefix of another section's name is another section.
    write_section("alph", "x", md)
    assert "old alpha" in md.read_text() and md.read_text().endswith("<!-- BEGIN alph -->\nx\n<!-- END alph -->\n")


def test_write_section_creates_the_file(tmp_path):
    md = tmp_path / "docs" / "BENCHMARKS.md"
    write_section("first", "body", md)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n") and text.endswith("<!-- BEGIN first -->\nbody\n<!-- END first -->\n")


# --------------------------------------------------------------------------- ablation options

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_ablation_parser(parser.add_subparsers(dest="which"))
    return parser.parse_args(["ablation", *argv])


def test_defaults_give_no_tag_no_flags_and_a_short_command():
    args = parse()
    assert options_tag(args) == "" and options_tag(args, "none") == options_tag(args, "matches") == ""
    # The training budget is the benchmark's, whatever the build profile's default becomes.
    assert options_build_flags(args, "none") == options_build_flags(args, "depth") == ["--train-iterations", "3000"]
    assert ablation_command(args) == (".venv/bin/python scripts/benchmark.py ablation --fractions 0.04 0.02 "
                                      "--variants none matches depth both --query-every 12 --jobs 2")


def test_a_synthesis_option_tags_and_flags_the_synthesis_variants_only():
    args = parse("--fractions", "0.04", "--variants", "none", "matches", "--synthesis-renderer", "rgbd-warp",
                 "--synthetic-ratio", "0.2", "--synthetic-unlabelled", "ignored")
    assert options_tag(args, "none") == ""
    assert options_tag(args, "matches") == options_tag(args) == "_rgbd-warp_ratio0.2_unlabelled-ignored"
    assert options_build_flags(args, "none") == ["--train-iterations", "3000"]
    assert options_build_flags(args, "matches", synthesis_only=True) == [
        "--synthesis-renderer", "rgbd-warp", "--synthetic-ratio", "0.2", "--synthetic-unlabelled", "ignored"]
    assert options_build_flags(args, "matches") == options_build_flags(args, "matches", synthesis_only=True) + [
        "--train-iterations", "3000"]
    assert ablation_command(args).endswith("--jobs 2 --synthesis-renderer rgbd-warp --synthetic-ratio 0.2 "
                                           "--synthetic-unlabelled ignored")


def test_training_options_tag_every_variant_and_reach_the_build(tmp_path):
    args = parse("--train-seed", "1", "--train-iterations", "500", "--synthesis-max-poses", "60")
    assert options_tag(args, "none") == options_tag(args, "both") == "_trainseed1_it500"  # max poses: untagged
    for variant in ("none", "depth"):
        cmd = variant_build_command(args, 0.04, variant, tmp_path / f"f0.04_{variant}", tmp_path / "f0.04.work")
        shown = shlex.join(cmd)
        assert "--train-seed 1" in shown and "--train-iterations 500" in shown and "--synthesis-max-poses 60" in shown
        # Explicit both ways: the arms must not depend on the profile's synthesis default.
        assert ("--no-synthesis" in cmd) == (variant == "none") and ("--synthesis" in cmd) == (variant != "none")
        assert ("--synthetic-labels depth" in shown) == (variant == "depth")
    assert ablation_command(args).endswith("--train-seed 1 --train-iterations 500 --synthesis-max-poses 60")
    # The fast profile's own budget, given explicitly, is the default: no tag, not in the shown command.
    assert options_tag(parse("--train-iterations", "3000")) == ""
    assert "--train-iterations" not in ablation_command(parse("--train-iterations", "3000"))


def test_the_build_accepts_every_option_it_is_given(tmp_path):
    """Every option set at once: ``d2s-nerf build``'s own parser takes each variant's command."""
    from offline.cli import build_parser

    args = parse("--synthesis-renderer", "rgbd-warp", "--synthetic-ratio", "0.3", "--synthetic-unlabelled", "ignored",
                 "--train-seed", "2", "--train-iterations", "100", "--synthesis-max-poses", "10")
    assert all(o.value(args) is not None for o in ABLATION_OPTIONS)
    for variant in ("none", "matches"):
        cmd = variant_build_command(args, 0.04, variant, tmp_path / "map", tmp_path / "work")
        parsed = build_parser().parse_args(cmd[cmd.index("build"):])
        for o in ABLATION_OPTIONS:
            if o.applies_to(variant):
                assert getattr(parsed, o.name) == getattr(args, o.name), o.name


def test_extractors_section_has_one_row_per_extractor_with_intervals_and_cache_notes():
    from offline.bench.extractors import add_extractors_parser, extractors_section

    parser = argparse.ArgumentParser()
    add_extractors_parser(parser.add_subparsers(dest="which"))
    args = parser.parse_args(["extractors"])
    assert args.extractors == ["aliked", "xfeat"] and args.synthesis and args.query_every == 4

    def evaluation(median: float, low: float, high: float) -> dict:
        return {"n_queries": 120, "n_failed": 1, "median_translation_m": median, "median_rotation_deg": 2.0,
                "median_translation_ci95_m": [low, high], "recall_5cm": 0.3, "recall_10cm": 0.6}

    def entry(name: str, cached: list[str], build_s: float) -> dict:
        return {"build_s": build_s, "build_load": [0.2, 1.9], "cached": cached, "n_frames": 20,
                "build_cmd": ["python", "-m", "offline.cli", "build", "DATA", "--extractor", name],
                "timings_s": {"features": 30.0, "training": 900.0}, "synthesis": {"n_kept": 40, "n_poses": 60},
                "extractor_config": {"max_keypoints": 1024}, "d2s": evaluation(0.09, 0.07, 0.12),
                "match": evaluation(0.016, 0.013, 0.02),
                "node": {"latency_ms": {"p50": 312.0}, "n_poses": 40, "n_sent": 40, "node_cpu_s_per_frame": 0.65,
                         "node_startup_s": 9.0, "median_translation_m": 0.083}}

    body = extractors_section(args, {"aliked": entry("aliked", [], 1500.0), "xfeat": entry("xfeat", ["synthesis"], 700.0)},
                              (0.2, 1.9))
    rows = [line for line in body.splitlines() if line.startswith("| aliked") or line.startswith("| xfeat")]
    assert len(rows) == 2
    assert "| aliked | 1024 | 25.0 min | 9.0 cm (7.0 cm-12.0 cm) |" in rows[0]
    assert "1.6 cm (1.3 cm-2.0 cm)" in rows[1] and "312 ms" in rows[1] and "40 of 40" in rows[1]
    assert "from the shared work directory's cache: synthesis" in body
    assert "same recording" in body and "not the 7-Scenes test split" in body
    assert "`d2s-nerf build DATA --extractor aliked`" in body


def test_training_threads_section_gives_medians_and_speed_ratios():
    from offline.bench.threads import add_threads_parser, threads_section

    parser = argparse.ArgumentParser()
    add_threads_parser(parser.add_subparsers(dest="which"))
    args = parser.parse_args(["training-threads", "--work-dir", "some.work"])
    assert args.threads == [1, 2] and args.repeats == 2
    body = threads_section(args, {1: [0.36, 0.38], 2: [0.19, 0.20]}, {1: [0.34, 0.34], 2: [0.24, 0.21]}, 20, (0.3, 1.8))
    assert "| D2S, fast profile (250 iterations) | 2 | 190, 200 ms | 195 ms | 1.90x |" in body
    assert "| nerfacto, fast profile (100 iterations after 20) | 1 | 340, 340 ms | 340 ms | 1.00x |" in body
    assert "--work-dir some.work" in body and "20 RedKitchen mapping frames" in body
