"""Batches of backbone-ready windows, read ahead on background threads.

Reading and normalising the next windows overlaps with inference on the current batch;
at most ``prefetch`` batches are in flight, so memory does not grow with the scene.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from geodino.tiling import Tile, read_tile


@dataclass
class Batch:
    tiles: list[Tile]
    inputs: np.ndarray  # (B, 3, S, S) float32, normalised
    valid: np.ndarray  # (B, S, S) bool

    def __len__(self) -> int:
        return len(self.tiles)


def iter_batches(scene, normalise, tiles: Iterable[Tile], batch_size: int = 8, *, workers: int = 2,
                 prefetch: int = 2, skip_empty: bool = True) -> Iterator[Batch]:
    """Yield batches of windows in grid order; windows with no valid pixel are skipped."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    tiles = list(tiles)
    pending: collections.deque = collections.deque()
    ahead = max(1, prefetch) * batch_size
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="geodino-read") as pool:
        it = iter(tiles)

        def fill() -> None:
            while len(pending) < ahead:
                tile = next(it, None)
                if tile is None:
                    return
                pending.append((tile, pool.submit(read_tile, scene, normalise, tile)))

        fill()
        batch_tiles, xs, vs = [], [], []
        while pending:
            tile, fut = pending.popleft()
            fill()
            x, v = fut.result()
            if skip_empty and not v.any():
                continue
            batch_tiles.append(tile)
            xs.append(x)
            vs.append(v)
            if len(batch_tiles) == batch_size:
                yield Batch(batch_tiles, np.stack(xs), np.stack(vs))
                batch_tiles, xs, vs = [], [], []
        if batch_tiles:
            yield Batch(batch_tiles, np.stack(xs), np.stack(vs))
