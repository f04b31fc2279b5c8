"""Process-wide settings that geodino's own runs use, applied at the edge and undone after.

Importing geodino changes nothing outside it (DESIGN invariant 10). What used to be set at
import now applies as follows:

- GDAL's block cache: 16 MB inside :func:`gdal_settings` (around :func:`geodino.runner.run_scenes`
  and the whole CLI command), through ``rasterio.Env``, which restores the earlier value on
  exit. GDAL's default fills 5% of RAM with every tile read or written, so resident memory grew
  with the scene; windows on one row share only a few source tiles (16384^2 stitch peak RSS
  620 MB with 64 MB -> ~340 MB). A ``GDAL_CACHEMAX`` the user set (environment, or an enclosing
  ``rasterio.Env``) wins. dask.distributed workers that a run starts get it through their
  environment (``distributed.nanny.pre-spawn-environ``), scoped the same way.
- One glibc malloc arena (as ``MALLOC_ARENA_MAX=1``): only in the ``geodino`` command itself
  (:func:`limit_malloc_arenas`, called by ``geodino.cli.entry``) and in the dask.distributed
  workers a run starts (:func:`worker_environ`, which also keeps glibc's adaptive mmap
  threshold there), because ``mallopt`` cannot be
  undone portably and a notebook's process is not ours. Library users get glibc's default
  (one arena per thread, up to 8 per core); set ``MALLOC_ARENA_MAX=1`` in the environment for
  the flatter memory the CLI has (16384^2/2048^2 stitch peak 1.27x -> 1.22x, no slower).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

GDAL_CACHE_MB = 16


@contextlib.contextmanager
def gdal_settings() -> Iterator[None]:
    """geodino's GDAL block cache for the duration of a run, unless the user chose one."""
    import dask
    import rasterio
    from rasterio.env import getenv, hasenv

    if "GDAL_CACHEMAX" in os.environ or (hasenv() and "GDAL_CACHEMAX" in getenv()):
        yield
        return
    workers_env = {}
    try:
        # its config defaults must be loaded before one key is scoped: dask.config.set would
        # otherwise restore a config without them on exit (the runs import it anyway)
        import distributed  # noqa: F401
    except ImportError:
        pass
    else:
        workers_env["distributed.nanny.pre-spawn-environ.GDAL_CACHEMAX"] = str(GDAL_CACHE_MB)
    # bytes: rasterio hands an integer to GDALSetCacheMax64 as it is, so 16 would be 16 bytes,
    # no block cache at all (every tile decoded again for each window and row that reads it)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), dask.config.set(workers_env):
        yield


# dask.distributed's default for its workers (distributed.yaml, ``pre-spawn-environ``)
DISTRIBUTED_TRIM_THRESHOLD = 65536


def worker_environ() -> dict:
    """dask config for the worker processes a run starts itself (``--scheduler local``).

    - One malloc arena, as in the CLI's own process (:func:`limit_malloc_arenas`), unless the
      user set ``MALLOC_ARENA_MAX``.
    - No ``MALLOC_TRIM_THRESHOLD_``. dask.distributed sets it to 64 KiB for every worker it
      spawns. In glibc, setting any trim or mmap threshold also switches off the adaptive mmap
      threshold, so each window-sized array (weights, blended sums, class codes: 1-16 MB) is
      mmapped, faulted in page by page and unmapped again. The worker then spent 8.2-10.0 CPU-s
      on what the threaded run does in ~5.5: blending 1.34 against 0.34 CPU-s, argmax 1.2 against
      0.5 (8192^2, BENCHMARKS.md). Memory goes back to the system anyway: blocks leave the
      worker as soon as they are gathered. A threshold other than distributed's default (the
      user's own) is kept, as is one set in the environment.
    - OpenMP threads that sleep when idle (``OMP_WAIT_POLICY=PASSIVE``). Every process runs
      torch with as many threads as the machine has cores (:meth:`geodino.predict.ModelBundle.load`:
      the same float reductions, so the same bytes, whatever the scheduler), so two workers
      on one machine ask for twice its cores, and libgomp's waiting threads spin on cores the
      other worker needs: two workers spent 8.4 CPU-s at 8192^2, 3 s of them in the land-cover
      upsampling (torch), against 5.3 with passive waits (same thread count, same results).
      A policy the user set wins.
    - No statistical profiler (``distributed.worker.profile``): it samples every thread's stack
      each 10 ms for a dashboard these clusters do not start. With two worker processes their
      CPU went from 8.5 to 7.3 s at 8192^2.

    Workers of a cluster the user started (a scheduler address) keep their own environment.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        value = environ.get("MALLOC_TRIM_THRESHOLD_")
        if value is not None and str(value) == str(DISTRIBUTED_TRIM_THRESHOLD):
            del environ["MALLOC_TRIM_THRESHOLD_"]
    if "MALLOC_ARENA_MAX" not in os.environ:
        environ.setdefault("MALLOC_ARENA_MAX", "1")
    if "OMP_WAIT_POLICY" not in os.environ:
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.profile.enabled": False}


def limit_malloc_arenas() -> bool:
    """Use one glibc malloc arena for the rest of this process (the CLI's own process only).

    Reader, blender and writer threads each get an arena by default; window-sized buffers freed
    in one and never reused fragment them all, and resident memory creeps up with the number of
    windows. A ``MALLOC_ARENA_MAX`` the user set wins. Returns whether the setting was applied.
    """
    import ctypes

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, 1))  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        return False


class Signals:
    """Which termination signal arrived (None: none yet)."""

    received: int | None = None


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[Signals]:
    """Turn SIGTERM (batch schedulers, dask, ``kill``) into KeyboardInterrupt, like SIGINT, so
    the same clean-up runs; remember which signal it was for the exit code (130 or 143).
    Handlers are restored afterwards; off the main thread nothing is installed (Python only
    delivers signals there)."""
    state = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.received is None:
            state.received = signum
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_code_for(signum: int | None) -> int:
    """The shell convention: 128 + signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + (signum or signal.SIGINT)


__all__ = ["GDAL_CACHE_MB", "exit_code_for", "gdal_settings", "limit_malloc_arenas", "signals_as_interrupts",
           "worker_environ"]
