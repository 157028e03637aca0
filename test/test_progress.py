"""Progress display: live bars only on a terminal, a few whole lines in logs."""

from __future__ import annotations

import io

from offline import progress
from offline.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_not_redraws(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # only the 10 % steps limit the lines now
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="train D2S", unit="it", stream=log)
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.update(1)
        if i == 500:
            bar.set_postfix(loss="0.1234")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 10 <= len(lines) <= 12, lines  # start, every 10 %, done
    assert lines[0].startswith("train D2S: 0/1000 it (0 %)") and lines[0].endswith("started")
    assert lines[-1].startswith("train D2S: 1000/1000 it (100 %)") and lines[-1].endswith("done")
    assert any("loss=0.1234" in line for line in lines)


def test_time_limits_lines_too_and_iteration_passes_every_item():
    log = io.StringIO()
    items = list(progress_bar(range(5000), desc="features", unit="frame", stream=log))
    assert items == list(range(5000))
    # 5000 quick steps take far less than LOG_EVERY_S: just the start and the end.
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        "features: 0/5000 frame (0 %)", "features: 5000/5000 frame (100 %)"]


def test_terminal_gets_tqdm_and_disabled_prints_nothing():
    from tqdm import tqdm

    bar = progress_bar(total=3, desc="x", stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    assert list(progress_bar([1, 2, 3], desc="x", enabled=False, stream=quiet)) == [1, 2, 3]
    assert quiet.getvalue() == ""
