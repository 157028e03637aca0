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
        assert ("--no-synthesis" in cmd) == (variant == "none")
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
