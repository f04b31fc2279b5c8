"""Time spent per pipeline stage, summed over threads, for benchmarks and profiling.

Stages call :func:`stage` around their work; it costs one global read when nothing is
collecting, so it stays in the hot path. :func:`collect` turns collection on for the
duration of a block (one at a time per process) and yields the totals. Times are summed over
all threads, so with several workers the stages can add up to more than the wall time.
Written by hand because the profilers (cProfile, py-spy) report functions, not the stages a
user reasons about, and cost far more than two clock reads per batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator


class StageTimes(dict):
    """stage name -> wall seconds (summed over threads), plus the calling threads' CPU seconds
    in ``cpu`` (work done, whatever else the machine runs; threads that a library starts for
    itself, like GDAL's compressors, are not counted) and call counts in ``calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float, cpu: float = 0.0) -> None:
        with self._lock:
            self[name] = self.get(name, 0.0) + seconds
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu
            self.calls[name] = self.calls.get(name, 0) + 1


_ACTIVE: StageTimes | None = None


class stage:  # lower case: used like a function, ``with stage("read"):``
    """Add the time spent in the block to stage ``name`` (when a collection is active).

    A plain class rather than a generator context manager: entering and leaving one costs
    ~1 µs instead of ~5 µs, so it can wrap per-window work.
    """

    __slots__ = ("cpu", "name", "start", "times")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.times = _ACTIVE
        if self.times is not None:
            self.start, self.cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc) -> bool:
        if self.times is not None:
            self.times.add(self.name, time.perf_counter() - self.start, time.thread_time() - self.cpu)
        return False


@contextlib.contextmanager
def collect() -> Iterator[StageTimes]:
    """Collect stage times in this process while the block runs."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("stage times are already being collected")
    _ACTIVE = times = StageTimes()
    try:
        yield times
    finally:
        _ACTIVE = None
