"""The localizer node (``python -m d2s_nerf_ros.node``) as a child process with its output in files.

Used by the demo, the benchmarks and the DDS tests, which all start the node with ROS parameters,
talk to it over DDS and stop it the way a user would (Ctrl-C), falling back to SIGKILL so that a
hung node can never hang its caller:

    node = LocalizerNodeProcess({"map_path": str(map_dir), "device": "cpu"}, work / "node.log")
    try:
        ...
    finally:
        status = node.stop()

Only the standard library is imported here: the node's torch and rclpy live in the child.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

NODE_MODULE = "d2s_nerf_ros.node"
STOP_TIMEOUT_S = 20.0   # a clean ROS shutdown of the node takes a few seconds on 2 busy cores
KILL_WAIT_S = 10.0      # SIGKILL cannot be refused; this only bounds the wait for the kernel to reap


def ros_parameter_text(value: Any) -> str:
    """``value`` as the right-hand side of ``-p name:=value`` (which ROS reads as YAML).

    Python's ``True``/``False`` would be read as strings, so bools become ``true``/``false``;
    an empty string becomes ``''`` since ``name:=`` alone is not a parameter value.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def ros_parameter_args(params: Mapping[str, Any]) -> list[str]:
    """``["-p", "name:=value", ...]`` for each parameter, in the mapping's order."""
    args: list[str] = []
    for name, value in params.items():
        args += ["-p", f"{name}:={ros_parameter_text(value)}"]
    return args


def localizer_node_command(params: Mapping[str, Any], python: str = sys.executable) -> list[str]:
    """The command line that runs the localizer node with ``params``."""
    return [python, "-m", NODE_MODULE, "--ros-args", *ros_parameter_args(params)]


class ChildProcess:
    """Any command as a child process whose stdout and stderr go to files.

    ``stderr_path`` None merges stderr into the stdout file. ``env`` and ``cwd`` None inherit
    this process's. ``stop()`` sends SIGINT, then SIGKILL after ``timeout_s``, and closes the
    files; it may be called any number of times, and the context manager calls it on exit.
    """

    def __init__(self, command: Sequence[str], stdout_path: Path | str, stderr_path: Path | str | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None) -> None:
        self.command = [str(part) for part in command]
        self.stdout_path = Path(stdout_path)
        self.stderr_path = Path(stderr_path) if stderr_path is not None else None
        self._files = [open(self.stdout_path, "wb")]
        try:
            if self.stderr_path is not None:
                self._files.append(open(self.stderr_path, "wb"))
            stderr = self._files[1] if self.stderr_path is not None else subprocess.STDOUT
            self.proc = subprocess.Popen(self.command, cwd=cwd, env=dict(env) if env is not None else None,
                                         stdout=self._files[0], stderr=stderr)
        except BaseException:
            self._close_files()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), None while it runs."""
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """The exit status once it exits; ``subprocess.TimeoutExpired`` if it still runs after ``timeout`` s."""
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGINT (for the node: a clean ROS shutdown), SIGKILL if it has not exited after ``timeout_s``.

        Returns the exit status (-9 when it had to be killed); the output files are closed.
        """
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=KILL_WAIT_S)
            return self.proc.returncode
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class LocalizerNodeProcess(ChildProcess):
    """``python -m d2s_nerf_ros.node --ros-args -p name:=value ...`` as a child process.

    ``params`` are the node's ROS parameters (see ``ros_parameter_text`` for how values are
    written); the rest is as for ``ChildProcess``, except that the environment always names the
    package's Fast DDS profile unless it names one already (``offline.demo.fastdds_profile_env``),
    so the node's publishers and subscribers use the large shared-memory segment. ``pid`` is the
    node's own process, so /proc gives its memory and CPU time.
    """

    def __init__(self, params: Mapping[str, Any], stdout_path: Path | str, stderr_path: Path | str | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                 python: str = sys.executable) -> None:
        from offline.demo import fastdds_profile_env

        self.params = dict(params)
        super().__init__(localizer_node_command(self.params, python), stdout_path, stderr_path,
                         env=fastdds_profile_env(None if env is None else dict(env)), cwd=cwd)


__all__ = ["ChildProcess", "LocalizerNodeProcess", "NODE_MODULE", "STOP_TIMEOUT_S", "localizer_node_command",
           "ros_parameter_args", "ros_parameter_text"]
