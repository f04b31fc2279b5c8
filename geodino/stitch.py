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

from geodino.scene import Grid, ensure_block_cache
from geodino.tiling import Tile, blend_weights, coarse_taper, coarsen_weights, read_tile
from geodino.timing import stage


@dataclass(frozen=True)
class OutputSpec:
    """One stitched output: ``channels`` values per pixel on the grid coarsened by ``scale``.

    ``upsample``: the predictor gives values on the coarse grid (e.g. a head's patch-grid
    logits) but the output is wanted at full resolution. Values are then blended on the
    coarse grid, and each full-resolution block is interpolated bilinearly from the blended
    sums and weights around it (normalised convolution: patches without valid input carry
    no weight), so the model never makes, and blending never moves, full-resolution maps.
    """

    channels: int
    scale: int = 1
    names: tuple[str, ...] | None = None
    upsample: bool = False


VALID = "_valid"  # batch results: each window's full-resolution validity (no values)


@dataclass
class WindowResult:
    """One window's weighted prediction, cropped to the output grid (or to what is still needed).

    At full resolution only the validity mask is kept (a quarter of the bytes of float
    weights) and the weights are rebuilt from the cached taper when a block needs them.
    Validity entries (:data:`VALID`) have a mask and no values.
    """

    tile: Tile
    row: int  # offset of ``values`` (or ``mask``) in the output grid
    col: int
    values: np.ndarray | None  # (C, h, w) float32 prediction x weight
    mask: np.ndarray | None  # (h, w) bool validity (full resolution)
    coarse_weight: np.ndarray | None  # (h, w) float32 weights (coarsened outputs)
    shape: tuple[int, int, int] = (0, 0, 0)  # scene height, width and overlap
    offset: tuple[int, int] = (0, 0)  # where ``values`` starts inside the window

    @property
    def weight(self) -> np.ndarray:
        h, w = self.values.shape[-2:]
        return self.weight_at(slice(0, h), slice(0, w))

    def weight_at(self, rows: slice, cols: slice) -> np.ndarray:
        """Blend weights of ``values[:, rows, cols]`` (slices with explicit start and stop)."""
        if self.coarse_weight is not None:
            return self.coarse_weight[rows, cols]
        height, width, overlap = self.shape
        r, c = self.offset
        taper = blend_weights(self.tile, height, width, overlap)
        part, mask = taper[r + rows.start:r + rows.stop, c + cols.start:c + cols.stop], self.mask[rows, cols]
        return part if mask.all() else part * mask  # all valid (most windows): the taper, read-only

    def bounds(self) -> tuple[int, int, int, int]:
        h, w = (self.values if self.values is not None else self.mask).shape[-2:]
        return self.row, self.row + h, self.col, self.col + w

    def crop(self, r0: int, r1: int, c0: int, c1: int) -> WindowResult:
        """The part inside output rows [r0, r1) and columns [c0, c1), copied so the rest is freed."""
        if (r0, r1, c0, c1) == self.bounds():
            return self
        rows = slice(r0 - self.row, r1 - self.row)
        cols = slice(c0 - self.col, c1 - self.col)

        def part(a):
            return None if a is None else np.ascontiguousarray(a[..., rows, cols])

        return WindowResult(self.tile, r0, c0, part(self.values), part(self.mask), part(self.coarse_weight),
                            self.shape, (self.offset[0] + rows.start, self.offset[1] + cols.start))


class BatchResult(dict):
    """One batch's results: output name -> [WindowResult], plus each output's grid and scale.

    :meth:`trimmed` keeps only what the blocks still to be computed can use, so results held
    between rows of blocks shrink to the overlap they share with the next row.
    """

    grids: dict[str, tuple[int, int]]
    scales: dict[str, int]
    upsampled: frozenset = frozenset()  # outputs whose full-resolution blocks interpolate coarse values

    def trimmed(self, needed: Sequence[tuple[tuple[int, int], tuple[slice, slice]]]) -> BatchResult:
        """Crop to the blocks in ``needed``: (output (height, width), (row slice, col slice)) each.

        A full-resolution block needs coarse values one coarse pixel around it (the
        interpolation of upsampled outputs); a coarse block needs its own coarse rectangle.
        """
        full = self.grids.get(VALID) or next((g for n, g in self.grids.items() if self.scales[n] == 1), None)
        known = set(self.grids.values())
        if any(tuple(shape) not in known and tuple(shape) != full for shape, _ in needed):
            return self  # a consumer on some other grid: keep everything
        out = BatchResult()
        out.grids, out.scales, out.upsampled = self.grids, self.scales, self.upsampled
        for name, results in self.items():
            grid, s = self.grids[name], self.scales[name]
            rects = []
            for shape, (rows, cols) in needed:
                if tuple(shape) == grid:
                    rects.append((rows.start, rows.stop, cols.start, cols.stop))
                elif name in self.upsampled and tuple(shape) == full:
                    rects.append((rows.start // s - 1, -(-rows.stop // s) + 1,
                                  cols.start // s - 1, -(-cols.stop // s) + 1))
            kept = []
            for res in results:
                r0, r1, c0, c1 = res.bounds()
                hits = [(max(r0, a), min(r1, b), max(c0, c), min(c1, d)) for a, b, c, d in rects]
                hits = [h for h in hits if h[0] < h[1] and h[2] < h[3]]
                if hits:
                    kept.append(res.crop(min(h[0] for h in hits), max(h[1] for h in hits),
                                         min(h[2] for h in hits), max(h[3] for h in hits)))
            out[name] = kept
        return out


Predictor = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def run_batch(scene, normalise, tiles: Sequence[Tile], predictor: Predictor, outputs: Mapping[str, OutputSpec],
              overlap: int, on_done: Callable[[int], None] | None = None) -> BatchResult:
    """Read, infer and weight one batch of windows; windows without valid pixels are skipped."""
    h, w = scene.grid.height, scene.grid.width
    kept, weights, valids = [], [], []
    size = tiles[0].size if tiles else 0
    inputs = np.empty((len(tiles), scene.count, size, size), np.float32)  # windows read straight into it
    for tile in tiles:
        _, valid = read_tile(scene, normalise, tile, out=inputs[len(kept)])
        if not valid.any():
            continue  # the slot is reused by the next window
        kept.append(tile)
        valids.append(valid)
        with stage("weight"):
            weights.append(blend_weights(tile, h, w, overlap, valid))
    results = BatchResult({name: [] for name in outputs})
    results.grids = {name: (math.ceil(h / spec.scale), math.ceil(w / spec.scale)) for name, spec in outputs.items()}
    results.scales = {name: spec.scale for name, spec in outputs.items()}
    results.upsampled = frozenset(name for name, spec in outputs.items() if spec.upsample)
    if results.upsampled:
        results[VALID] = []
        results.grids[VALID], results.scales[VALID] = (h, w), 1
    if kept:
        with stage("model"):
            preds = predictor(inputs[:len(kept)])
        with stage("weight"):
            _weigh(results, preds, kept, weights, valids, outputs, h, w, overlap)
    if on_done is not None:
        on_done(len(tiles))
    return results


def _weigh(results: BatchResult, preds, kept, weights, valids, outputs, h: int, w: int, overlap: int) -> None:
    """Each kept window's prediction times its blend weights, cropped to the output grid."""
    masks = []
    for i, tile in enumerate(kept):
        rh, cw = min(tile.size, h - tile.row), min(tile.size, w - tile.col)
        masks.append(np.ascontiguousarray(valids[i][:rh, :cw]))
        if VALID in results:
            results[VALID].append(WindowResult(tile, tile.row, tile.col, None, masks[i], None, (h, w, overlap)))
    for name, spec in outputs.items():
        s = spec.scale
        oh, ow = math.ceil(h / s), math.ceil(w / s)
        pred = preds[name]
        for i, tile in enumerate(kept):
            if s > 1 and valids[i].all():  # the weights are the taper: coarsened once for all such windows
                wt = coarse_taper(tile, h, w, overlap, s)
            else:
                wt = coarsen_weights(weights[i], s)
            r0, c0 = tile.row // s, tile.col // s
            rh, cw = min(wt.shape[0], oh - r0), min(wt.shape[1], ow - c0)
            wt = np.ascontiguousarray(wt[:rh, :cw], dtype=np.float32)
            vals = np.multiply(pred[i, :, :rh, :cw], wt[None], dtype=np.float32)
            if s == 1:
                results[name].append(WindowResult(tile, r0, c0, vals, masks[i], None, (h, w, overlap)))
            else:
                results[name].append(WindowResult(tile, r0, c0, vals, None, wt))


def _accumulate(name: str, channels: int, r0: int, r1: int, c0: int, c1: int, batches
                ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums and summed weights over rows [r0, r1) and columns [c0, c1), in window order."""
    acc = np.zeros((channels, r1 - r0, c1 - c0), np.float32)
    wsum = np.zeros((r1 - r0, c1 - c0), np.float32)
    contributions = sorted((res for b in batches for res in b[name]), key=lambda res: res.tile.index)
    for res in contributions:
        rr0, rr1, rc0, rc1 = res.bounds()
        ir0, ir1 = max(r0, rr0), min(r1, rr1)
        ic0, ic1 = max(c0, rc0), min(c1, rc1)
        if ir1 <= ir0 or ic1 <= ic0:
            continue
        src = (slice(ir0 - res.row, ir1 - res.row), slice(ic0 - res.col, ic1 - res.col))
        dst = (slice(ir0 - r0, ir1 - r0), slice(ic0 - c0, ic1 - c0))
        acc[(slice(None),) + dst] += res.values[(slice(None),) + src]
        wsum[dst] += res.weight_at(*src)
    return acc, wsum


def assemble_block(name: str, channels: int, r0: int, r1: int, c0: int, c1: int, *batches) -> np.ndarray:
    """Sum the weighted contributions to block [r0:r1, c0:c1] in window order and normalise."""
    with stage("blend"):
        acc, wsum = _accumulate(name, channels, r0, r1, c0, c1, batches)
        covered = wsum > 0
        np.divide(acc, wsum, out=acc, where=covered)
        acc[:, ~covered] = np.nan
        return acc


def _valid_block(r0: int, r1: int, c0: int, c1: int, batches) -> np.ndarray:
    """Full-resolution validity of a block: a pixel is valid where any window read it valid."""
    valid = np.zeros((r1 - r0, c1 - c0), bool)
    for b in batches:
        for res in b[VALID]:
            rr0, rr1, rc0, rc1 = res.bounds()
            ir0, ir1, ic0, ic1 = max(r0, rr0), min(r1, rr1), max(c0, rc0), min(c1, rc1)
            if ir1 > ir0 and ic1 > ic0:
                valid[ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] |= res.mask[ir0 - res.row:ir1 - res.row,
                                                                         ic0 - res.col:ic1 - res.col]
    return valid


def coarse_rect(r0: int, r1: int, c0: int, c1: int, scale: int, coarse_shape: tuple[int, int]
                ) -> tuple[int, int, int, int]:
    """Coarse pixels whose values bilinear interpolation needs for full-resolution block [r0:r1, c0:c1]."""
    ch, cw = coarse_shape
    return (max(0, r0 // scale - 1), min(ch, -(-r1 // scale) + 1),
            max(0, c0 // scale - 1), min(cw, -(-c1 // scale) + 1))


def _batches(tiles: Sequence[Tile], batch_size: int) -> list[list[Tile]]:
    """Consecutive windows, ``batch_size`` at a time (full batches also across rows of windows:
    what a later row of blocks needs from a batch is cropped to the overlap strip, so a batch
    that spans two rows holds little)."""
    return [list(tiles[i:i + batch_size]) for i in range(0, len(tiles), batch_size)]


def _chunks(n: int, size: int, shift: int = 0) -> tuple[int, ...]:
    """Blocks of ``size`` along an axis of ``n``, all boundaries moved ``shift`` earlier (the first block shorter)."""
    bounds = [0] + [b for b in range(size - shift, n, size) if b > 0] + [n]
    return tuple(b - a for a, b in zip(bounds, bounds[1:])) if n > 0 else ()


def block_size(chunks: int, window: int, overlap: int) -> int:
    """Full-resolution block size: ``chunks`` rounded down to whole window strides.

    Blocks then start where windows start, so a window reaches only ``overlap`` pixels into
    the next row (and column) of blocks: that strip is all that is held between rows.
    """
    stride = window - overlap
    return chunks // stride * stride if chunks >= stride else chunks


def upsample_shift(csize: int, window: int, overlap: int, scales: Sequence[int]) -> int:
    """How far before a window row full-resolution blocks end when outputs are upsampled.

    A full-resolution block of an upsampled output interpolates the coarse pixel after its
    last row, which the next row of windows also covers: with blocks ending where windows
    start, no block of a row could be made before the next row of windows was inferred, and
    every result of the row (whole windows, for both dates of a change) was held until then.
    Ending blocks at least one coarse pixel earlier lets a row of blocks complete with its
    own row of windows; the window results of the row above then shrink to the strip the
    next row needs (the overlap plus the shift). The shift is the coarse pixel doubled while
    it stays within the overlap and divides the stride, so block boundaries keep the stride's
    powers of two (streamed overview levels, intermediate tiles: :mod:`geodino.overviews`,
    :func:`geodino.cogcodec.stream_tile_size`). 0: no upsampled output, or blocks not aligned
    with windows (smaller than a stride).
    """
    stride = window - overlap
    s = max(scales, default=1)
    if s <= 1 or csize < stride or csize % stride or s >= stride:
        return 0
    while 2 * s <= overlap and stride % (2 * s) == 0 and 2 * s < stride:
        s *= 2
    return s


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
           progress: Callable[[int], None] | None = None,
           class_codes: Mapping[str, tuple[np.ndarray, int]] | None = None) -> dict[str, xr.DataArray]:
    """Lazy stitched outputs on the scene's processing grid (or its coarsened grids).

    Returns one dask-backed DataArray (channel, y, x) per output, float32, NaN where no valid
    input contributes, with CRS and transform attached. Nothing runs until blocks are computed.
    Full-resolution blocks are ``chunks`` rounded down to whole window strides (see
    :func:`block_size`), their boundaries moved :func:`upsample_shift` earlier when an output
    is upsampled; coarsened outputs (e.g. embeddings) use ``chunks // scale``.
    Raises GDAL's block cache if the source needs more than it holds (striped files:
    :func:`geodino.scene.ensure_block_cache`).

    ``class_codes``: {name: (codes, nodata)} for upsampled outputs whose class map is wanted
    too: ``{name}_codes`` is then a (1, y, x) uint8 array of the code of each pixel's largest
    channel, ``nodata`` where the output is NaN, made from the same batches in one task per
    block, without making the float block (:func:`geodino.upsample.assemble_codes`).
    """
    from geodino.upsample import assemble_codes, assemble_upsampled

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    grid: Grid = scene.grid
    tiles = list(tiles)
    token = tokenize(scene, normalise, tiles, getattr(predictor, "token", id(predictor)), dict(outputs),
                     overlap, batch_size, chunks)
    batch_name = f"geodino-batch-{token}"
    counter = _Counter(progress)
    batches = _batches(tiles, batch_size)
    window = max((t.size for t in tiles), default=chunks)
    ensure_block_cache(scene.block_cache_bytes(window))
    if tiles and hasattr(scene, "expect_windows"):
        scene.expect_windows(window, [t.row for t in tiles], [t.col for t in tiles])
    batch_layer = {(batch_name, i): (run_batch, scene, normalise, b, predictor, dict(outputs), overlap, counter)
                   for i, b in enumerate(batches)}
    batch_rows = _group_rows(batches)
    full_csize = block_size(chunks, window, overlap)
    shift = upsample_shift(full_csize, window, overlap, [spec.scale for spec in outputs.values() if spec.upsample])
    results = {}
    for name, spec in outputs.items():
        s = 1 if spec.upsample else spec.scale
        oh, ow = math.ceil(grid.height / s), math.ceil(grid.width / s)
        coarse = (math.ceil(grid.height / spec.scale), math.ceil(grid.width / spec.scale))
        csize, first = (full_csize, shift) if s == 1 else (max(1, chunks // s), 0)
        rchunks, cchunks = _chunks(oh, csize, first), _chunks(ow, csize, first)
        out_name = f"geodino-{name}-{token}"
        layer, codes_layer = {}, {}
        codes = (class_codes or {}).get(name) if spec.upsample else None
        r0 = 0
        for bi, rh in enumerate(rchunks):
            c0 = 0
            for bj, cw in enumerate(cchunks):
                if spec.upsample:
                    # in full-resolution pixels, the region whose coarse values the block interpolates
                    a, b, c, d = (v * spec.scale for v in coarse_rect(r0, r0 + rh, c0, c0 + cw, spec.scale, coarse))
                    task = (assemble_upsampled, name, spec.channels, spec.scale, coarse, r0, r0 + rh, c0, c0 + cw)
                    lo_r, hi_r, lo_c, hi_c, ts = a, b, c, d, 1
                else:
                    task = (assemble_block, name, spec.channels, r0, r0 + rh, c0, c0 + cw)
                    lo_r, hi_r, lo_c, hi_c, ts = r0, r0 + rh, c0, c0 + cw, s
                needed = tuple((batch_name, k) for k in _touching(batch_rows, lo_r, hi_r, lo_c, hi_c, ts))
                layer[(out_name, 0, bi, bj)] = task + needed
                if codes is not None:
                    codes_layer[(out_name + "-codes", 0, bi, bj)] = (assemble_codes, name, spec.channels, spec.scale,
                                                                     coarse, *codes, *task[-4:]) + needed
                c0 += cw
            r0 += rh
        out_grid = grid if s == 1 else grid.coarsen(s)
        for key, lay, bands, dtype in ((name, layer, spec.channels, np.float32),
                                       (f"{name}_codes", codes_layer, 1, np.uint8)):
            if lay:
                lname = next(iter(lay))[0]
                graph = HighLevelGraph(layers={batch_name: batch_layer, lname: lay},
                                       dependencies={batch_name: set(), lname: {batch_name}})
                arr = da.Array(graph, lname, chunks=((bands,), rchunks, cchunks), dtype=dtype)
                results[key] = to_dataarray(arr, out_grid, *((spec.names,) if key == name else (None, codes[1])))
    return results


def _group_rows(batches: Sequence[Sequence[Tile]], group: int = 16) -> list[tuple[int, int, list]]:
    """Batches in groups of ``group`` with the rows their windows span (for :func:`_touching`)."""
    out = []
    for g in range(0, len(batches), group):
        members = [(k, batches[k]) for k in range(g, min(g + group, len(batches))) if batches[k]]
        if members:
            out.append((min(t.row for _, b in members for t in b), max(t.row + t.size for _, b in members for t in b),
                        members))
    return out


def _touching(batch_rows, r0: int, r1: int, c0: int, c1: int, s: int) -> list[int]:
    """Batches with a window reaching into rows [r0, r1) and columns [c0, c1) of the grid coarsened by s.

    ``batch_rows``: (first window row, last window end row, [(k, tiles)]) per group of batches
    in window order, so only groups whose rows overlap are scanned (not every window).
    """
    found = []
    for top, bottom, members in batch_rows:
        if top // s >= r1 or bottom // s <= r0:
            continue
        for k, tiles in members:
            if any(t.row // s < r1 and (t.row + t.size) // s > r0 and t.col // s < c1 and (t.col + t.size) // s > c0
                   for t in tiles):
                found.append(k)
    return sorted(set(found))


def to_dataarray(arr, grid: Grid, names: Sequence[str] | None = None, nodata: float = np.nan) -> xr.DataArray:
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
    out = out.rio.write_nodata(nodata, encoded=False)
    return out
