"""Progress reporting for long work: items done, rate and ETA on stderr."""

from __future__ import annotations

import sys
import threading
import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress


class Progress:
    """A thread-safe counter shown as a rich progress bar (windows done, windows/s, ETA).

    Disabled automatically when stderr is not a terminal, except for a final summary line.
    """

    def __init__(self, description: str, total: int | None = None, unit: str = "windows",
                 enabled: bool | None = None) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        # None: a bar on a terminal, plain lines every `line_every` seconds elsewhere (logs);
        # False: silent
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.log_lines = enabled is None and not self.enabled
        self.line_every = 10.0
        self._last_line = time.perf_counter()
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        self._start = time.perf_counter()
        if self.enabled:
            self._bar = _RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, rate="")
        return self

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self._refresh()

    def update_to(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
            self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total,
                             rate=f"{self.rate:.2f} {self.unit}/s")
        elif self.log_lines:
            now = time.perf_counter()
            finished = self.total is not None and self.done >= self.total
            if finished or now - self._last_line >= self.line_every:
                self._last_line = now
                print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        """One plain progress line: done/total, rate, ETA (for logs, where no bar is drawn)."""
        text = f"{self.description}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        rate = self.rate
        text += f", {rate:.2f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {(self.total - self.done) / rate:.0f} s"
        return text

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

