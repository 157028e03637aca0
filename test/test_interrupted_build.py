"""A build that cannot finish: a full disk or an interrupted run gives a clear message and a
non-zero exit, never leaves a half-written bundle under --out, and a rerun of the same command
resumes from the cached stages.

Everything runs the real ``d2s-nerf build`` in a subprocess on a generated bag. The write
failure is the kernel's: the child's file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes
a write past it fail with EFBIG, as ENOSPC would on a full disk.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2s_nerf_ros.map_bundle import MapBundle
from offline.demo_scene import write_demo_bag

pytestmark = pytest.mark.builds  # maps or colcon: left out of make test-fast

REPO_ROOT = Path(__file__).resolve().parents[1]
N_FRAMES = 24
TRAIN_ITERATIONS = 40
# 8 mapping frames of 320x240, SIFT, no synthesis: the smallest build that runs every stage.
BUILD_OPTIONS = ["--every", "3", "--extractor", "sift", "--max-keypoints", "400", "--no-synthesis",
                 "--train-iterations", str(TRAIN_ITERATIONS), "--device", "cpu"]
CACHED_STAGES = ("features", "matches", "triangulation", "augmentation")


@pytest.fixture(scope="module")
def bag(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("interrupted") / "bag"
    write_demo_bag(path, n_frames=N_FRAMES, storage="mcap", pose_source="tf")
    return path


def _env() -> dict[str, str]:
    # Unbuffered, so that the logs can be read while the build runs; a progress line every 10 % of
    # the training (not every 30 s, the default in logs), so the test can follow a 40-step training.
    return dict(os.environ, PYTHONUNBUFFERED="1", D2S_PROGRESS_EVERY_S="0")


def _command(bag: Path, out: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "offline.cli", "build", str(bag), "--out", str(out), "--work-dir", str(work),
            *BUILD_OPTIONS, *extra]


def _file_size_limit(max_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def _build(bag: Path, out: Path, work: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(bag, out, work, "--quiet"), cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600,
                          preexec_fn=_file_size_limit(max_file_bytes) if max_file_bytes else None)


def _cached(stdout: str) -> set[str]:
    return {stage for stage in CACHED_STAGES if f"[{stage}] cached" in stdout}


def _assert_write_failure(proc: subprocess.CompletedProcess, work: Path) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert line.startswith("d2s-nerf build: error: cannot write: File too large"), line
    assert f"stages stay cached in {work}" in line and "rerun the same command to resume" in line, line
    return line


def _assert_no_bundle(out: Path) -> None:
    assert not out.exists(), f"{out} must not exist after a failed build"
    leftovers = sorted(p.name for p in out.parent.glob(out.name + ".tmp-*"))
    assert not leftovers, f"half-written bundle directories left behind: {leftovers}"


def _bundle_checksums(path: Path) -> dict[str, str]:
    return json.loads((path / "manifest.json").read_text())["files"]


def test_disk_full_fails_cleanly_and_a_rerun_resumes(bag, tmp_path):
    out, work = tmp_path / "map", tmp_path / "map.work"

    # 1. A fresh build whose writes may not exceed 3 MB: features.npz (~1.7 MB) and the labels
    #    fit, the augmentation bank (~7 MB) does not, so the run dies inside a stage.
    proc = _build(bag, out, work, max_file_bytes=3_000_000)
    _assert_write_failure(proc, work)
    _assert_no_bundle(out)
    assert "[augmentation] running" in proc.stdout and "[augmentation] done" not in proc.stdout, proc.stdout
    for stage in ("features", "matches", "triangulation"):
        assert (work / f"{stage}.done.json").is_file(), f"the finished stage {stage} must stay cached"
    assert not (work / "augmentation.done.json").exists()

    # 2. Without the limit the same command resumes: the finished stages are loaded, not recomputed.
    proc = _build(bag, out, work)
    assert proc.returncode == 0, proc.stderr
    assert _cached(proc.stdout) == {"features", "matches", "triangulation"}, proc.stdout
    assert "[augmentation] running" in proc.stdout
    complete = MapBundle.load(out)
    checksums = _bundle_checksums(out)

    # 3. Rebuild onto the complete bundle with a limit below the size of its weights file (every
    #    stage and the training checkpoint are cached, so only the bundle write can fail): the
    #    earlier bundle must survive untouched.
    weights_bytes = (out / "d2s.safetensors").stat().st_size
    limit = weights_bytes // 2
    other_writes = [*(work / "source" / "images").iterdir(), work / "report.html", work / "training_history.json"]
    assert max(p.stat().st_size for p in other_writes) < limit, "the limit must only hit the bundle"
    proc = _build(bag, out, work, max_file_bytes=limit)
    line = _assert_write_failure(proc, work)
    assert "d2s.safetensors" in line, line
    assert _cached(proc.stdout) == set(CACHED_STAGES), proc.stdout
    assert not list(tmp_path.glob("map.tmp-*")) and not list(tmp_path.glob("map.old-*"))
    assert _bundle_checksums(out) == checksums
    assert MapBundle.load(out).manifest == complete.manifest

    # 4. The same onto a new path: nothing appears there.
    out2 = tmp_path / "map2"
    proc = _build(bag, out2, work, max_file_bytes=limit)
    _assert_write_failure(proc, work)
    _assert_no_bundle(out2)

    # 5. With room again it completes from the cache alone, with the same trained weights.
    proc = _build(bag, out2, work)
    assert proc.returncode == 0, proc.stderr
    assert _cached(proc.stdout) == set(CACHED_STAGES), proc.stdout
    rebuilt = MapBundle.load(out2)
    assert _bundle_checksums(out2)["d2s.safetensors"] == checksums["d2s.safetensors"]
    assert rebuilt.manifest["training"]["final_loss"] == complete.manifest["training"]["final_loss"]


# ------------------------------------------------------------------------------ interruptions

def _training_progress(stderr: str) -> list[int]:
    """Iterations reported by the training progress bar, in order."""
    return [int(n) for n, total in re.findall(r"train D2S:[^\r\n]*?(\d+)/(\d+)", stderr)
            if int(total) == TRAIN_ITERATIONS]


class _Running:
    """A build in a subprocess whose logs are files, readable while it runs."""

    def __init__(self, command: list[str], logs: Path):
        self.stdout_path, self.stderr_path = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=out, stderr=err)

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_until_training(self, min_iteration: int, timeout_s: float = 300.0) -> int:
        """Block until the progress bar shows ``min_iteration`` iterations done; return that count."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = _training_progress(self.stderr())
            if done and done[-1] >= min_iteration:
                return done[-1]
            if self.proc.poll() is not None:
                pytest.fail(f"the build ended (exit {self.proc.returncode}) before training was under way:\n"
                            f"{self.stdout()}\n{self.stderr()}")
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"training did not reach iteration {min_iteration} in {timeout_s} s")

    def signal_and_wait(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=120)


def test_killed_and_interrupted_builds_resume(bag, tmp_path):
    out, work = tmp_path / "map", tmp_path / "map.work"
    command = _command(bag, out, work)  # not --quiet: the progress bar shows that training runs

    # 1. SIGKILL during training: no chance to clean up, yet no bundle appears.
    run = _Running(command, tmp_path / "killed")
    run.wait_until_training(1)
    assert [p for p in work.glob("train-*") if p.is_dir()], "the training work directory exists once training runs"
    assert run.signal_and_wait(signal.SIGKILL) == -signal.SIGKILL
    _assert_no_bundle(out)
    assert _cached(run.stdout()) == set(), run.stdout()

    # 2. The same command again, stopped with Ctrl-C during training: exit 130, a resume hint,
    #    and the training progress so far kept in a checkpoint.
    run = _Running(command, tmp_path / "interrupted")
    seen = run.wait_until_training(2)
    assert _cached(run.stdout()) == set(CACHED_STAGES), run.stdout()
    assert run.signal_and_wait(signal.SIGINT) == 130, run.stderr()
    stderr = run.stderr()
    assert "Traceback" not in stderr, stderr
    assert "interrupted: rerun the same command to resume" in stderr, stderr
    _assert_no_bundle(out)
    [train_dir] = [p for p in work.glob("train-*") if p.is_dir()]
    checkpoint = json.loads((train_dir / "latest.json").read_text())["checkpoint"]
    stopped_at = json.loads((train_dir / checkpoint / "state.json").read_text())["iteration"]
    assert seen <= stopped_at < TRAIN_ITERATIONS, (seen, stopped_at)

    # 3. Once more to the end: every stage is cached, training continues from its checkpoint.
    proc = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _cached(proc.stdout) == set(CACHED_STAGES), proc.stdout
    progress = _training_progress(proc.stderr)
    assert progress and progress[0] == stopped_at and progress[-1] == TRAIN_ITERATIONS, progress
    bundle = MapBundle.load(out)
    assert bundle.manifest["training"]["final_loss"] is not None
    assert not list(tmp_path.glob("map.tmp-*"))
