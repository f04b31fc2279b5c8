"""Executing lazy outputs in bounded memory: a few blocks at a time, sharing windows.

Handing a whole stitched scene to ``dask.compute`` lets the scheduler run window batches in
any order and keep their results until every block that needs them is done, so memory grows
with the scene (2.5 GB at 8192^2 for a cheap stitch). Here the graph is executed in waves of
a few output blocks, in the order in which their windows are inferred (row-major), through
the active scheduler (threads, or a dask.distributed client). Window-batch results that
later waves still need are kept between waves, cropped to the part those waves use, and
passed back in as data, so each window is still inferred exactly once. With blocks that
start where windows start (:func:`geodino.stitch.block_size`; a little before, with
upsampled outputs: :func:`geodino.stitch.upsample_shift`), what is held between rows of
blocks is the window overlap strip across the scene's width; everything else is dropped as
soon as its blocks are written (see BENCHMARKS.md for measured figures).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import dask
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph
from dask.optimization import cull

BATCH_PREFIX = "geodino-batch-"


def _as_data(key, value):
    """A graph node that is this value as data (never executed)."""
    try:
        from dask._task_spec import DataNode

        return DataNode(key, value)
    except ImportError:  # older dask
        from dask.core import literal

        return literal(value)


def _is_batch(key) -> bool:
    return isinstance(key, tuple) and isinstance(key[0], str) and key[0].startswith(BATCH_PREFIX)


def _fused(graph: dict, keys: Sequence) -> dict:
    """Each requested block and the chain of single-use tasks under it as one task.

    xarray's selections on the stitched outputs (``isel(band=0)``, ``expand_dims``) add two
    ``getitem`` tasks above every assembled block, so an 8192^2 run with two outputs had 2212
    tasks for 768 that do work. Threads run a task in microseconds, but dask.distributed
    spends about a millisecond of scheduler, worker and client time on each (BENCHMARKS.md).
    Batch tasks (many users, kept between waves) and the requested keys stay addressable.
    Written here rather than with ``dask.optimization.fuse_linear``: on task-spec graphs that
    left the fused task naming a key it had removed ("Missing dependency"), and
    ``fuse_linear_task_spec`` renames the fused task and adds an alias task per block, which
    is the per-task cost this removes. Older dask without task specs: the graph as it is.
    """
    try:
        from dask._task_spec import GraphNode, Task, convert_legacy_graph
    except ImportError:
        return graph
    graph = convert_legacy_graph(graph)
    users: dict = {}
    for k, node in graph.items():
        for d in node.dependencies:
            users[d] = users.get(d, 0) + 1
    keep = set(keys) | {k for k in graph if _is_batch(k)}
    for key in keys:
        chain = [key]
        while True:
            deps = graph[chain[0]].dependencies
            if len(deps) != 1:
                break
            (dep,) = deps
            node = graph.get(dep)
            if dep in keep or users.get(dep) != 1 or not isinstance(node, GraphNode) or node.block_fusion:
                break
            chain.insert(0, dep)
        if len(chain) > 1:
            graph[key] = Task.fuse(*(graph[k] for k in chain), key=key)
            for k in chain[:-1]:
                del graph[k]
    return graph


def _client():
    """The active dask.distributed client, or None.

    Without distributed imported there can be no client: importing it only to ask would cost
    a threaded run ~0.3 s of interpreter time (the GIL) while its first windows are read.
    """
    import sys

    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _get():
    """The local scheduler's ``get``: the synchronous one if configured, else threads."""
    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return dask.get
    from dask.threaded import get as threaded_get

    return threaded_get


def _malloc_trim():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand memory freed inside the malloc heap back to the system (glibc's malloc_trim).

    Window buffers freed between long-lived allocations (GDAL's block cache, results kept
    for the next row) leave holes that glibc keeps resident; trimming after every wave keeps
    resident memory near what is in use (16384^2 stitch 1.52x -> 1.22x the 2048^2 peak).
    The call itself is cheap, but it also returns the model's freed activations, which the
    next batch faults in again: the tiny model's 8192^2 run took ~15% longer (BENCHMARKS.md).
    """
    if _TRIM is not None:
        _TRIM(0)


def _plan(graph: dict, arrays: Sequence, batches_per_wave: int):
    """Waves of blocks in the order their window batches complete, and each batch's users.

    A wave holds the blocks completed by the next ``batches_per_wave`` batches, so that many
    batch tasks (each reading its windows, then taking its turn on the model) run at once:
    reading and normalising the next batches overlap the current model call. Waves of a
    fixed number of blocks needed at most one new batch each (blocks are about a window
    wide), so reading, inference and blending took turns however many cores there were.
    """
    blocks = []  # (sort key, dask key, (array index, slices), output grid shape, batch keys)
    for i, a in enumerate(arrays):
        if a.ndim != 3 or len(a.chunks[0]) != 1:
            raise ValueError("stream_blocks takes (band, y, x) arrays with a single chunk along bands")
        y0 = 0
        for r, height in enumerate(a.chunks[1]):
            x0 = 0
            for c, width in enumerate(a.chunks[2]):
                key = (a.name, 0, r, c)
                slices = (slice(y0, y0 + height), slice(x0, x0 + width))
                batches = {k for k in cull(graph, [key])[0] if _is_batch(k)}
                last = max((k[1] for k in batches), default=-1)
                blocks.append(((last, y0, x0, i), key, (i, slices), a.shape[1:], batches))
                x0 += width
            y0 += height
    blocks.sort(key=lambda b: b[0])
    groups, horizon = [], None
    for block in blocks:
        last = block[0][0]
        if horizon is None or last >= horizon:
            groups.append([])
            horizon = last + batches_per_wave
        groups[-1].append(block)
    waves, uses = [], {}
    for w, members in enumerate(groups):
        batches = set().union(*(b[4] for b in members))
        waves.append(([b[1] for b in members], [b[2] for b in members], batches))
        for _, _, (_, slices), shape, deps in members:
            for k in deps:
                uses.setdefault(k, []).append((w, shape, slices))
    return waves, uses


def stream_blocks(arrays: Sequence, batches_per_wave: int | None = None
                  ) -> Iterator[tuple[int, tuple[slice, slice], object]]:
    """Yield (array index, (row slice, col slice), block) for (band, y, x) dask arrays.

    Blocks are computed in waves, ordered by the last window batch they need (so row-major
    on the window grid; blocks of several arrays that share batches go together); each wave
    brings in ``batches_per_wave`` new batches, computed at the same time (default: one per
    worker thread, 2 to 8). While the caller consumes one wave, the next one computes in the
    background.
    """
    graph = dict(HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays]))
    graph = _fused(graph, [k for a in arrays for k in flatten(a.__dask_keys__())])
    if batches_per_wave is None:
        batches_per_wave = min(8, max(2, int(dask.config.get("num_workers", None) or 2)))
    waves, uses = _plan(graph, arrays, batches_per_wave)
    last_use = {k: max(w for w, _, _ in u) for k, u in uses.items()}
    client = _client()
    if client is not None:
        yield from _stream_distributed(client, graph, waves, last_use)
        return
    get = _get()

    def compute(w: int, cache: dict):
        keys, _, batches = waves[w]
        keep = sorted((k for k in batches if last_use[k] > w and k not in cache), key=str)
        culled, _ = cull(graph, keys + keep)
        for k in batches:
            if k in cache:
                culled[k] = _as_data(k, cache[k])
        results = get(culled, keys + keep)
        cache = {k: v for k, v in cache.items() if last_use[k] > w}
        cache.update(zip(keep, results[len(keys):]))
        for k, v in cache.items():
            trim = getattr(v, "trimmed", None)
            if trim is not None:
                cache[k] = trim([(shape, slices) for u, shape, slices in uses[k] if u > w])
        release_free_memory()
        return results[:len(keys)], cache

    # While the caller writes one wave's blocks, the next wave computes in the background.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="geodino-wave") as pool:
        pending = pool.submit(compute, 0, {}) if waves else None
        for w in range(len(waves)):
            blocks, cache = pending.result()
            pending = pool.submit(compute, w + 1, cache) if w + 1 < len(waves) else None
            try:
                for (index, slices), block in zip(waves[w][1], blocks):
                    yield index, slices, block
            except GeneratorExit:
                if pending is not None:
                    pending.cancel()
                raise


def _stream_distributed(client, graph: dict, waves: list, last_use: dict):
    """Waves on a dask.distributed cluster: batch results stay on the workers as futures.

    Passing batch results back in as data (the local way) would ship them to the scheduler
    with every wave ("Sending large graph"). Here a later wave's graph names the batches it
    shares with earlier waves by their futures, so the graph carries only tasks (a few KB
    per wave, whatever the scene size), and only finished blocks travel to this process.
    The next wave is submitted before this one's blocks are handed to the caller.
    """
    held: dict = {}  # batch key -> Future, until its last wave

    def submit(w: int):
        keys, _, batches = waves[w]
        keep = sorted((k for k in batches if last_use[k] > w and k not in held), key=str)
        culled, _ = cull(graph, keys + keep)
        for k in batches:
            if k in held:
                culled[k] = held[k]
        futures = client.get(culled, keys + keep, sync=False)
        held.update(zip(keep, futures[len(keys):]))
        for k in [k for k in held if last_use[k] <= w]:
            del held[k]  # the cluster frees a batch once no wave needs it
        return futures[:len(keys)]

    pending = submit(0) if waves else None
    for w in range(len(waves)):
        current = pending
        pending = submit(w + 1) if w + 1 < len(waves) else None
        blocks = client.gather(current)
        for (index, slices), block in zip(waves[w][1], blocks):
            yield index, slices, block
