"""The window grid: overlapping windows on the global 16-pixel patch grid, and blend weights.

Windows start on multiples of the patch size everywhere, so every window's patch tokens sit
on one global patch lattice (the embedding raster is that lattice). Along each axis windows
advance by ``size - overlap``; the last one is moved back so it ends at the first patch
boundary at or after the scene edge. Where a side is not a multiple of 16, that last window
reaches fewer than 16 pixels past the edge; those pixels are filled by reflection and never
written. Scenes smaller than one window are read as one reflect-padded window and cropped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from geodino.errors import ConfigError
from geodino.timing import stage

PATCH = 16


@dataclass(frozen=True)
class WindowSpec:
    size: int = 512
    overlap: int = 64

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PATCH:
            raise ConfigError(f"window size {self.size} must be a positive multiple of {PATCH}")
        if self.overlap < 0 or self.overlap % PATCH:
            raise ConfigError(f"overlap {self.overlap} must be a non-negative multiple of {PATCH}")
        if self.overlap >= self.size:
            raise ConfigError(f"overlap {self.overlap} must be smaller than the window size {self.size}")

    @property
    def stride(self) -> int:
        return self.size - self.overlap


@dataclass(frozen=True)
class Tile:
    """One window of the grid, in processing-grid pixels (may reach < 16 px past the edge)."""

    index: int
    row: int
    col: int
    size: int

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.size, self.size)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.size), slice(self.col, self.col + self.size)


def axis_starts(n: int, size: int, stride: int) -> list[int]:
    """Window starts along one axis: multiples of the patch size that cover [0, n)."""
    if n <= 0:
        raise ConfigError("scene has zero size")
    if n <= size:
        return [0]
    last = math.ceil(n / PATCH) * PATCH - size
    starts = list(range(0, last, stride))
    starts.append(last)
    return starts


def window_grid(height: int, width: int, spec: WindowSpec = WindowSpec()) -> list[Tile]:
    """All windows of a ``height`` x ``width`` grid, row-major."""
    rows = axis_starts(height, spec.size, spec.stride)
    cols = axis_starts(width, spec.size, spec.stride)
    return [Tile(i * len(cols) + j, r, c, spec.size) for i, r in enumerate(rows) for j, c in enumerate(cols)]


@functools.lru_cache(maxsize=64)
def _taper(size: int, overlap: int, top: bool, bottom: bool, left: bool, right: bool) -> np.ndarray:
    """A separable raised-cosine taper over ``overlap`` pixels at interior window edges.

    Edges on the scene border keep full weight (no other window covers them); the ramp
    starts above zero, so no covered pixel ever has exactly zero weight.
    """
    ramp = np.ones(size, np.float32)
    if overlap:
        i = np.arange(overlap, dtype=np.float64)
        up = (0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / overlap)).astype(np.float32)
    else:
        up = np.ones(0, np.float32)

    def axis(lo_border: bool, hi_border: bool) -> np.ndarray:
        a = ramp.copy()
        if overlap and not lo_border:
            a[:overlap] = up
        if overlap and not hi_border:
            a[size - overlap:] = np.minimum(a[size - overlap:], up[::-1])
        return a

    w = axis(top, bottom)[:, None] * axis(left, right)[None, :]
    w.setflags(write=False)
    return w


def scene_edges(tile: Tile, height: int, width: int) -> tuple[bool, bool, bool, bool]:
    """Whether the window's top, bottom, left and right edges lie on the scene border."""
    return tile.row == 0, tile.row + tile.size >= height, tile.col == 0, tile.col + tile.size >= width


def blend_weights(tile: Tile, height: int, width: int, overlap: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Blend weights of a window: the taper, zero on invalid input and outside the scene.

    Where every pixel is valid this is the shared, read-only taper itself (no copy)."""
    w = _taper(tile.size, overlap, *scene_edges(tile, height, width))
    if valid is not None and not valid.all():
        w = w * valid
    return w


def coarsen_weights(w: np.ndarray, s: int) -> np.ndarray:
    """Weights averaged over ``s`` x ``s`` cells (the patch grid of a coarse output)."""
    if s == 1:
        return w
    h, wd = w.shape
    return w.reshape(h // s, s, wd // s, s).mean(axis=(1, 3))


def coarse_taper(tile: Tile, height: int, width: int, overlap: int, s: int) -> np.ndarray:
    """:func:`coarsen_weights` of the taper (a window without invalid pixels), read-only, computed
    once per window position class rather than once per window."""
    return _coarse_taper(tile.size, overlap, scene_edges(tile, height, width), s)


@functools.lru_cache(maxsize=64)
def _coarse_taper(size: int, overlap: int, edges: tuple[bool, bool, bool, bool], s: int) -> np.ndarray:
    w = coarsen_weights(_taper(size, overlap, *edges), s)
    w.setflags(write=False)
    return w


def read_tile(scene, normalise, tile: Tile, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Backbone input (3, S, S) float32 and validity (S, S) of one window.

    Parts of the window outside the scene are filled by reflecting the inside (so the model
    sees plausible context) and marked invalid; nodata inside the scene is filled from the
    nearest valid pixel of its row (or column), so a nodata edge does not look like a
    feature of the land, and marked invalid. ``out``: a (3, S, S) float32 C-contiguous array
    to fill (a batch slot); a window inside the scene is then read and normalised in place.
    """
    h, w = scene.grid.height, scene.grid.width
    inner_h = min(tile.size, h - tile.row)
    inner_w = min(tile.size, w - tile.col)
    pad_h, pad_w = tile.size - inner_h, tile.size - inner_w
    direct = out if not (pad_h or pad_w) else None
    with stage("read"):
        raw, valid = scene.read(Window(tile.col, tile.row, inner_w, inner_h), out=direct)
    with stage("normalise"):
        x = fill_invalid(normalise(raw, inplace=True), valid)
        if pad_h or pad_w:
            mode = "reflect" if inner_h > 1 and inner_w > 1 else "edge"
            x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)
            valid = np.pad(valid, ((0, pad_h), (0, pad_w)), mode="constant", constant_values=False)
    if out is None:
        return np.ascontiguousarray(x, dtype=np.float32), valid
    if x is not out:
        out[...] = x
    return out, valid


def _fill_along_rows(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copy each invalid pixel from the nearest valid pixel in its row; rows with none stay."""
    h, w = valid.shape
    cols = np.arange(w)
    left = np.where(valid, cols, -1)
    np.maximum.accumulate(left, axis=1, out=left)
    right = np.where(valid, cols, w)
    right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    use_left = (left >= 0) & ((right >= w) | (cols - left <= right - cols))
    src = np.where(use_left, left, right)
    has = valid.any(axis=1)
    src = np.where(has[:, None], np.clip(src, 0, w - 1), cols)
    rows = np.arange(h)[:, None]
    filled = x[:, rows, src]
    return filled, np.broadcast_to(has[:, None], valid.shape)


def fill_invalid(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill invalid pixels of (C, h, w) ``x`` from the nearest valid pixel along rows, then columns.

    Pixels of a window with no valid pixel at all get 0 (the standardised dataset mean).
    """
    if valid.all():
        return x
    if not valid.any():
        return np.zeros_like(x)
    filled, done = _fill_along_rows(x, valid)
    if not done.all():
        cols_filled, _ = _fill_along_rows(filled.transpose(0, 2, 1), done.T)
        filled = cols_filled.transpose(0, 2, 1)
    return np.ascontiguousarray(filled, dtype=np.float32)
