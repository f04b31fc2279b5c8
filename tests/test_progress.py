from __future__ import annotations

import re

from geodino.progress import Progress


def test_plain_progress_lines_for_logs(capsys):
    with Progress("scene", total=10) as bar:  # stderr is not a terminal under pytest
        bar.line_every = 0.0
        bar.advance(5)
        bar.advance(5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"scene: 5/10 windows \(50%\), [0-9.]+ windows/s, ETA \d+ s", lines[0])
    assert lines[-1].startswith("scene: 10/10 windows (100%)") and "ETA" not in lines[-1]


def test_silent_when_disabled(capsys):
    with Progress("scene", total=3, enabled=False) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""
    assert bar.done == 3
