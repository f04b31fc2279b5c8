"""Overlap-add stitching on dask: each window inferred once, weighted, summed, divided.

The graph has two layers. *Batch* tasks read a batch of windows (on the global window grid),
run the predictor once and return, per output, each window's prediction multiplied by its
blend weights together with the weights, cropped to the scene. *Block* tasks assemble one
output chunk from the batches whose windows touch it: they add contributions in global
window order and divide by the summed weight. Chunks are therefore only a memory and
parallelism knob: the same pixel gets the same sum in the same order whatever the chunking
(DESIGN invariant 2). Pixels with zero summed weight (no valid input) are NaN.

Several outputs (e.g. canopy height at full resolution and embeddings on the patch grid)
share the batch tasks, so computing them together runs the model once per window.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from geodino.scene import Grid
from geodino.tiling import Tile, blend_weights, read_tile


@dataclass(frozen=True)
class OutputSpec:
    """One stitched output: ``channels`` values per pixel on the grid coarsened by ``scale``."""

    channels: int
    scale: int = 1
    names: tuple[str, ...] | None = None


@dataclass
class WindowResult:
    """One window's weighted prediction, cropped to the output grid.

    At full resolution only the validity mask is kept (a quarter of the bytes of float
    weights) and the weights are rebuilt from the cached taper when a block needs them.
    """

    tile: Tile
    row: int  # offset of ``values`` in the output grid
    col: int
    values: np.ndarray  # (C, h, w) float32 prediction x weight
    mask: np.ndarray | None  # (h, w) bool validity (full resolution)
    coarse_weight: np.ndarray | None  # (h, w) float32 weights (coarsened outputs)
    shape: tuple[int, int, int] = (0, 0, 0)  # scene height, width and overlap

    @property
    def weight(self) -> np.ndarray:
        if self.coarse_weight is not None:
            return self.coarse_weight
        h, w = self.mask.shape
        height, width, overlap = self.shape
        return blend_weights(self.tile, height, width, overlap)[:h, :w] * self.mask


Predictor = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def _coarsen_weight(w: np.ndarray, s: int) -> np.ndarray:
    if s == 1:
        return w
    h, wd = w.shape
    return w.reshape(h // s, s, wd // s, s).mean(axis=(1, 3))


def run_batch(scene, normalise, tiles: Sequence[Tile], predictor: Predictor, outputs: Mapping[str, OutputSpec],
              overlap: int, on_done: Callable[[int], None] | None = None) -> dict[str, list[WindowResult]]:
    """Read, infer and weight one batch of windows; windows without valid pixels are skipped."""
    h, w = scene.grid.height, scene.grid.width
    kept, xs, weights, valids = [], [], [], []
    for tile in tiles:
        x, valid = read_tile(scene, normalise, tile)
        if not valid.any():
            continue
        kept.append(tile)
        xs.append(x)
        valids.append(valid)
        weights.append(blend_weights(tile, h, w, overlap, valid))
    results: dict[str, list[WindowResult]] = {name: [] for name in outputs}
    if kept:
        preds = predictor(np.stack(xs))
        for name, spec in outputs.items():
            s = spec.scale
            oh, ow = math.ceil(h / s), math.ceil(w / s)
            pred = preds[name]
            for i, tile in enumerate(kept):
                wt = _coarsen_weight(weights[i], s)
                r0, c0 = tile.row // s, tile.col // s
                rh, cw = min(wt.shape[0], oh - r0), min(wt.shape[1], ow - c0)
                wt = np.ascontiguousarray(wt[:rh, :cw], dtype=np.float32)
                vals = np.asarray(pred[i, :, :rh, :cw], dtype=np.float32) * wt[None]
                if s == 1:
                    mask = np.ascontiguousarray(valids[i][:rh, :cw])
                    results[name].append(WindowResult(tile, r0, c0, vals, mask, None, (h, w, overlap)))
                else:
                    results[name].append(WindowResult(tile, r0, c0, vals, None, wt))
    if on_done is not None:
        on_done(len(tiles))
    return results


def assemble_block(name: str, channels: int, r0: int, r1: int, c0: int, c1: int, *batches) -> np.ndarray:
    """Sum the weighted contributions to block [r0:r1, c0:c1] in window order and normalise."""
    acc = np.zeros((channels, r1 - r0, c1 - c0), np.float32)
    wsum = np.zeros((r1 - r0, c1 - c0), np.float32)
    contributions = sorted((res for b in batches for res in b[name]), key=lambda res: res.tile.index)
    for res in contributions:
        h, w = res.values.shape[-2:]
        ir0, ir1 = max(r0, res.row), min(r1, res.row + h)
        ic0, ic1 = max(c0, res.col), min(c1, res.col + w)
        if ir1 <= ir0 or ic1 <= ic0:
            continue
        src = (slice(ir0 - res.row, ir1 - res.row), slice(ic0 - res.col, ic1 - res.col))
        dst = (slice(ir0 - r0, ir1 - r0), slice(ic0 - c0, ic1 - c0))
        acc[(slice(None),) + dst] += res.values[(slice(None),) + src]
        wsum[dst] += res.weight[src]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum[None]
    out[:, wsum <= 0] = np.nan
    return out


def _batches(tiles: Sequence[Tile], batch_size: int) -> list[list[Tile]]:
    """Consecutive windows, never spanning two rows of windows: a batch that did would be
    needed by blocks a whole row apart and held in memory in between."""
    out: list[list[Tile]] = []
    for tile in tiles:
        if out and len(out[-1]) < batch_size and out[-1][-1].row == tile.row:
            out[-1].append(tile)
        else:
            out.append([tile])
    return out


def _chunks(n: int, size: int) -> tuple[int, ...]:
    return tuple(min(size, n - i) for i in range(0, n, size))


class _Counter:
    """Windows done, shared by the batch tasks of one local run (progress reporting)."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self.callback = callback
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self.callback is not None:
            with self.lock:
                self.callback(n)

    def __reduce__(self):  # on other processes progress is not reported
        return (_Counter, (None,))


def stitch(scene, normalise, tiles: Sequence[Tile], predictor: Predictor, outputs: Mapping[str, OutputSpec], *,
           overlap: int, batch_size: int = 8, chunks: int = 1024,
           progress: Callable[[int], None] | None = None) -> dict[str, xr.DataArray]:
    """Lazy stitched outputs on the scene's processing grid (or its coarsened grids).

    Returns one dask-backed DataArray (channel, y, x) per output, float32, NaN where no valid
    input contributes, with CRS and transform attached. Nothing runs until blocks are computed.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    grid: Grid = scene.grid
    tiles = list(tiles)
    token = tokenize(scene, normalise, tiles, getattr(predictor, "token", id(predictor)), dict(outputs),
                     overlap, batch_size, chunks)
    batch_name = f"geodino-batch-{token}"
    counter = _Counter(progress)
    batches = _batches(tiles, batch_size)
    batch_layer = {(batch_name, i): (run_batch, scene, normalise, b, predictor, dict(outputs), overlap, counter)
                   for i, b in enumerate(batches)}
    results = {}
    for name, spec in outputs.items():
        s = spec.scale
        oh, ow = math.ceil(grid.height / s), math.ceil(grid.width / s)
        csize = max(1, chunks // s)
        rchunks, cchunks = _chunks(oh, csize), _chunks(ow, csize)
        out_name = f"geodino-{name}-{token}"
        layer = {}
        r0 = 0
        for bi, rh in enumerate(rchunks):
            c0 = 0
            for bj, cw in enumerate(cchunks):
                needed = sorted({k for k, b in enumerate(batches) for t in b
                                 if t.row // s < r0 + rh and (t.row + t.size) // s > r0
                                 and t.col // s < c0 + cw and (t.col + t.size) // s > c0})
                layer[(out_name, 0, bi, bj)] = (assemble_block, name, spec.channels, r0, r0 + rh, c0, c0 + cw,
                                                *[(batch_name, k) for k in needed])
                c0 += cw
            r0 += rh
        graph = HighLevelGraph(layers={batch_name: batch_layer, out_name: layer},
                               dependencies={batch_name: set(), out_name: {batch_name}})
        arr = da.Array(graph, out_name, chunks=((spec.channels,), rchunks, cchunks), dtype=np.float32)
        out_grid = grid if s == 1 else grid.coarsen(s)
        results[name] = to_dataarray(arr, out_grid, spec.names)
    return results


def to_dataarray(arr, grid: Grid, names: Sequence[str] | None = None) -> xr.DataArray:
    """Wrap a (channel, y, x) array with pixel-centre coordinates, CRS and transform."""
    import rioxarray  # noqa: F401

    t = grid.transform
    xs = t.c + t.a * (np.arange(grid.width) + 0.5)
    ys = t.f + t.e * (np.arange(grid.height) + 0.5)
    coords = {"band": np.arange(1, arr.shape[0] + 1), "y": ys, "x": xs}
    out = xr.DataArray(arr, dims=("band", "y", "x"), coords=coords)
    if names is not None:
        out = out.assign_coords(band_name=("band", list(names)))
    out = out.rio.write_crs(grid.crs).rio.write_transform(t)
    out = out.rio.write_nodata(np.nan, encoded=False)
    return out
