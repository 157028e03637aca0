"""offline.node_process without ROS: tiny Python children stand in for the node."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from offline.node_process import (ChildProcess, LocalizerNodeProcess, localizer_node_command, ros_parameter_args,
                                  ros_parameter_text)

# Says "ready" once its SIGINT handler is in place, so the test never signals a child still starting up.
EXITS_ON_SIGINT = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(3))
print("out line", flush=True)
print("err line", file=sys.stderr, flush=True)
print("ready", flush=True)
time.sleep(60)
"""
IGNORES_SIGINT = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def python_child(tmp_path: Path, code: str, merged: bool = True) -> ChildProcess:
    return ChildProcess([sys.executable, "-c", code], tmp_path / "out.log",
                        None if merged else tmp_path / "err.log", cwd=tmp_path)


def wait_ready(child: ChildProcess, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "ready" not in child.stdout_path.read_text():
        assert child.alive(), f"the child exited with {child.returncode}"
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.02)


def test_child_that_exits_on_sigint_returns_its_status_and_stop_is_idempotent(tmp_path: Path):
    child = python_child(tmp_path, EXITS_ON_SIGINT, merged=False)
    wait_ready(child)
    assert child.alive() and child.returncode is None and child.pid > 0
    assert child.stop(timeout_s=10) == 3
    assert not child.alive() and child.returncode == 3
    assert child.stop(timeout_s=10) == 3  # a second stop changes nothing
    assert child.stdout_path.read_text().splitlines() == ["out line", "ready"]
    assert child.stderr_path.read_text().splitlines() == ["err line"]


def test_stderr_merges_into_stdout_without_a_stderr_path(tmp_path: Path):
    with python_child(tmp_path, EXITS_ON_SIGINT) as child:
        wait_ready(child)
    assert child.returncode == 3 and child.stderr_path is None
    assert child.stdout_path.read_text().splitlines() == ["out line", "err line", "ready"]


def test_child_that_ignores_sigint_is_killed_after_the_timeout(tmp_path: Path):
    child = python_child(tmp_path, IGNORES_SIGINT)
    wait_ready(child)
    t0 = time.monotonic()
    assert child.stop(timeout_s=0.5) == -9
    assert 0.5 <= time.monotonic() - t0 < 5.0
    assert child.stop() == -9


def test_wait_returns_the_status_or_times_out(tmp_path: Path):
    child = ChildProcess([sys.executable, "-c", "import sys; sys.exit(7)"], tmp_path / "out.log")
    assert child.wait(timeout=10) == 7
    assert child.stop() == 7
    sleeper = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleeper.log")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            sleeper.wait(timeout=0.1)
    finally:
        sleeper.stop(timeout_s=5)


def test_parameters_are_written_for_ros():
    assert ros_parameter_text(True) == "true" and ros_parameter_text(False) == "false"
    assert ros_parameter_text(256) == "256" and ros_parameter_text(0.5) == "0.5"
    assert ros_parameter_text("cpu") == "cpu" and ros_parameter_text("") == "''"
    assert ros_parameter_args({"publish_tf": False, "max_keypoints": 256, "reliability_threshold": 0.25,
                               "device": "cpu"}) == ["-p", "publish_tf:=false", "-p", "max_keypoints:=256",
                                                     "-p", "reliability_threshold:=0.25", "-p", "device:=cpu"]
    assert localizer_node_command({"map_path": "/maps/a", "device": "cpu"}, python="py") == [
        "py", "-m", "d2s_nerf_ros.node", "--ros-args", "-p", "map_path:=/maps/a", "-p", "device:=cpu"]


def test_localizer_node_process_runs_the_node_command(tmp_path: Path):
    # A stand-in interpreter that prints its arguments: the node's command line without starting ROS.
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(f"#!{sys.executable}\nimport sys\nprint(' '.join(sys.argv[1:]))\n")
    fake_python.chmod(0o755)
    node = LocalizerNodeProcess({"map_path": "/maps/a", "publish_tf": True}, tmp_path / "node.log",
                                python=str(fake_python))
    assert node.params == {"map_path": "/maps/a", "publish_tf": True}
    assert node.wait(timeout=10) == 0 and node.stop() == 0
    assert (tmp_path / "node.log").read_text().strip() == \
        "-m d2s_nerf_ros.node --ros-args -p map_path:=/maps/a -p publish_tf:=true"
