"""One progress display for every long stage: a live tqdm bar on a terminal, sparse plain lines otherwise.

tqdm redraws its bar with carriage returns many times a second; written to a pipe or a log
file (CI, ``nohup``, a build started by a benchmark) that is thousands of fragments for one
stage. When stderr is not a terminal, ``progress_bar`` prints a whole line at start, every
``LOG_EVERY_FRACTION`` of the work or ``LOG_EVERY_S`` seconds (whichever comes later), and at
the end; same call signature either way.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

LOG_EVERY_FRACTION = 0.1
LOG_EVERY_S = 30.0
# D2S_PROGRESS_EVERY_S overrides LOG_EVERY_S (e.g. 0 in tests that follow a short build's progress).
PROGRESS_EVERY_ENV = "D2S_PROGRESS_EVERY_S"


def log_every_s() -> float:
    """Seconds between two progress lines when stderr is not a terminal."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_EVERY_ENV, LOG_EVERY_S)))
    except ValueError:
        return LOG_EVERY_S


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, enabled: bool = True, stream=None):
    """A tqdm bar on a terminal, else a ``LineProgress``; disabled: counts silently."""
    stream = stream if stream is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    interactive = enabled and hasattr(stream, "isatty") and stream.isatty()
    if interactive:
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
        except ImportError:
            pass
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, enabled=enabled, stream=stream)


class LineProgress:
    """The subset of tqdm's interface the stages use (iterate, update, set_postfix, close), as sparse lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool = True, stream=None) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = int(initial)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.postfix = ""
        self.start = time.monotonic()
        self.last_time = self.start
        self.last_n = self.n
        self.closed = False
        self._line("started")

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable cannot be iterated; use update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        step = max(1, int(self.total * LOG_EVERY_FRACTION)) if self.total else None
        due_by_work = step is None or self.n - self.last_n >= step
        if due_by_work and now - self.last_time >= log_every_s() and (self.total is None or self.n < self.total):
            self._line()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.last_n or self.n == 0:
                self._line("done")

    def _line(self, note: str = "") -> None:
        now = time.monotonic()
        self.last_time, self.last_n = now, self.n
        if not self.enabled:
            return
        elapsed = now - self.start
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        rate = f", {self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 and self.n else ""
        extra = f" [{self.postfix}]" if self.postfix else ""
        tail = f" {note}" if note else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{pct}, {elapsed:.0f} s{rate}{extra}{tail}",
              file=self.stream, flush=True)
