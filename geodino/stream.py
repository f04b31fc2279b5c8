"""Executing lazy outputs in bounded memory: a few blocks at a time, sharing windows.

Handing a whole stitched scene to ``dask.compute`` lets the scheduler run window batches in
any order and keep their results until every block that needs them is done, so memory grows
with the scene (2.5 GB at 8192^2 for a cheap stitch). Here the graph is executed in waves of
a few output blocks in row-major order, through the active scheduler (threads, or a
dask.distributed client). Window-batch results that later waves still need are kept between
waves and passed back in as data, so each window is still inferred exactly once; everything
else is dropped as soon as its blocks are written. What stays held grows with the scene's
width, not its area (see BENCHMARKS.md for measured figures).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import dask
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


def _get():
    """The active scheduler's ``get``: a distributed client if one is set, else local threads."""
    try:
        from distributed import get_client

        return get_client().get
    except (ImportError, ValueError):
        pass
    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return dask.get
    from dask.threaded import get as threaded_get

    return threaded_get


def stream_blocks(arrays: Sequence, blocks_per_wave: int | None = None
                  ) -> Iterator[tuple[int, tuple[slice, slice], object]]:
    """Yield (array index, (row slice, col slice), block) for (band, y, x) dask arrays.

    Blocks are computed in row-major order, ``blocks_per_wave`` block positions at a time
    (the same position of every array together, since they share window batches).
    """
    graph = dict(HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays]))
    if blocks_per_wave is None:
        blocks_per_wave = max(4, int(dask.config.get("num_workers", None) or 2))
    positions: dict[tuple[int, int], list] = {}
    for i, a in enumerate(arrays):
        if len(a.chunks[0]) != 1:
            raise ValueError("stream_blocks takes arrays with a single chunk along bands")
        y0 = 0
        for r, height in enumerate(a.chunks[1]):
            x0 = 0
            for c, width in enumerate(a.chunks[2]):
                positions.setdefault((r, c), []).append(
                    ((a.name, 0, r, c), (i, (slice(y0, y0 + height), slice(x0, x0 + width)))))
                x0 += width
            y0 += height
    order = sorted(positions)
    waves = []
    for start in range(0, len(order), blocks_per_wave):
        entries = [e for pos in order[start:start + blocks_per_wave] for e in positions[pos]]
        keys = [k for k, _ in entries]
        culled, _ = cull(graph, keys)
        waves.append((keys, [p for _, p in entries], {k for k in culled if _is_batch(k)}))
    # the last wave that needs each batch: results are kept until then, and no longer
    last_use: dict = {}
    for w, (_, _, batches) in enumerate(waves):
        for k in batches:
            last_use[k] = w
    get = _get()

    def compute(w: int, cache: dict):
        keys, places, batches = waves[w]
        keep = sorted((k for k in batches if last_use[k] > w), key=str)
        culled, _ = cull(graph, keys + keep)
        for k in batches:
            if k in cache:
                culled[k] = _as_data(k, cache[k])
        results = get(culled, keys + keep)
        cache = {k: v for k, v in cache.items() if last_use[k] > w}
        cache.update(zip(keep, results[len(keys):]))
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
