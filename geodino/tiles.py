"""Windows assembled from whole decoded source tiles, each tile decoded about once per run.

Overlapping windows (512 px with a 448 px stride on 512 px tiles) touch every tile under
two rows of windows, and GDAL's own unaligned multi-band read of a pixel-interleaved tile is
slow even from its block cache: it copies band by band with a pixel stride (8192^2 uint8 RGB,
361 windows: 2.9 CPU s, of which decoding every tile once is 0.6 s). Reading whole tiles
(GDAL's fast, aligned path), keeping them in their own data type and cutting windows out of
them with numpy took 0.9 s for the same windows. GDAL's block cache cannot stand in for this
cache: it holds what the writers write too, so at geodino's 16 MB (see
:mod:`geodino.runtime`) the tiles of the row above are gone when the next row of windows
needs them; this cache holds only source tiles: of the row of tiles two rows of windows
share, the rows the next row of windows reads (once told the window grid:
:meth:`TiledReader.window_done`), and the tiles of the windows being read.

Only exact conversions take this path (uint8, int8, uint16, int16 and float32 to float32:
the window is bit-identical to GDAL's read); warped scenes, mosaics (VRT documents) and
other types read through GDAL as before.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

import numpy as np
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.windows import Window

EXACT_IN_FLOAT32 = ("uint8", "int8", "uint16", "int16", "float32")
MAX_TILE_BYTES = 16 * 2**20  # one block larger than this (e.g. a whole-image strip): read through GDAL
MAX_CACHE_BYTES = 256 * 2**20  # a scene so wide that its tiles under a window exceed this: read through GDAL
MAX_PIECES = 64  # tiles (or strips) one window may span on this path


class TileCache:
    """Decoded tiles by (tile row, tile column), at most ``capacity`` of them, thread-safe.

    When full, the tile first in raster order goes: windows are read row by row, so the
    tiles above and to the left of the ones being read are those no window needs any more,
    while the row of tiles that the next row of windows shares stays (LRU would need two rows
    of tiles for that). Two threads that miss the same tile at once both decode it (rare,
    and cheaper than making every reader wait while GDAL decodes). ``loads`` counts decodes.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.loads = 0
        self._tiles: dict = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int], load: Callable[[], tuple], keep: bool = True, first_row: int = 0):
        """``(data, valid, start)``: the tile from its row ``start`` on (see :meth:`crop`);
        decoded again when the kept part starts after ``first_row``."""
        with self._lock:
            hit = self._tiles.get(key)
        if hit is not None and hit[2] <= first_row:
            return hit
        value = load()
        with self._lock:
            self.loads += 1
            if keep:
                self._tiles[key] = value
                while len(self._tiles) > self.capacity:
                    del self._tiles[min(self._tiles)]
        return value

    def crop(self, key: tuple[int, int], first_row: int) -> None:
        """Keep only the tile's rows from ``first_row`` on (a copy, so the rest is freed);
        drop it if none are left."""
        with self._lock:
            hit = self._tiles.get(key)
            if hit is None or first_row <= hit[2]:
                return
            data, valid, start = hit
            k = first_row - start
            if k >= data.shape[1]:
                del self._tiles[key]
            else:
                self._tiles[key] = (data[:, k:].copy(), None if valid is None else valid[k:].copy(), first_row)

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()


def all_valid(ds, bands) -> bool:
    """Whether GDAL would report every pixel of ``bands`` valid: no nodata, mask or alpha.

    Then ``read_masks`` only fills 255s, which callers can skip."""
    if any(c == ColorInterp.alpha for c in ds.colorinterp):
        return False
    flags = ds.mask_flag_enums
    return all(flags[b - 1] == [MaskFlags.all_valid] for b in bands)


class TiledReader:
    """Windows of one tiled, unwarped source cut from cached whole tiles (see the module notes).

    ``valid_of(ds, window)``: the validity of a window as the caller defines it (used per
    tile, and only when the file has a nodata value, a mask or an alpha band).
    """

    def __init__(self, ds, bands: tuple[int, ...], valid_of: Callable) -> None:
        self.bands = bands
        self.block = ds.block_shapes[bands[0] - 1]
        self.height, self.width = ds.height, ds.width
        self.dtype = np.dtype(ds.dtypes[bands[0] - 1])
        self.all_valid = all_valid(ds, bands)
        self.valid_of = valid_of
        bh, bw = self.block
        self.tile_bytes = bh * bw * (len(bands) * self.dtype.itemsize + (0 if self.all_valid else 1))
        self.cache = TileCache(0)
        self.windows: tuple | None = None  # (size, row starts, column starts) of windows read row by row
        self._done: dict = {}  # (tile row, tile column, window row top) -> windows of that row done with it
        self._done_lock = threading.Lock()

    @classmethod
    def for_dataset(cls, ds, bands: tuple[int, ...], valid_of: Callable) -> TiledReader | None:
        """A reader when ``ds`` qualifies (exact types, one block shape, blocks of sane size)."""
        if any(ds.dtypes[b - 1] not in EXACT_IN_FLOAT32 for b in bands):
            return None
        if len({ds.dtypes[b - 1] for b in bands}) != 1 or len({ds.block_shapes[b - 1] for b in bands}) != 1:
            return None
        reader = cls(ds, bands, valid_of)
        return reader if reader.tile_bytes <= MAX_TILE_BYTES else None

    def fits(self, h: int, w: int) -> bool:
        """Make room for windows of ``h`` x ``w``: a window's height of tile rows across the
        scene (what the next row of windows shares with this one, at most) plus the tiles
        of two windows (readers on two threads: measured, each tile is still decoded once
        in a run); False when that would exceed
        :data:`MAX_CACHE_BYTES` or a window spans more than :data:`MAX_PIECES` blocks."""
        bh, bw = self.block
        pieces = (math.ceil(h / bh) + 1) * (math.ceil(w / bw) + 1)
        if pieces > MAX_PIECES:
            return False  # thin strips or small tiles: a Python step per piece would cost more
        per_row = math.ceil(self.width / bw)
        needed = per_row * math.ceil(h / bh) + 2 * pieces
        if needed * self.tile_bytes > MAX_CACHE_BYTES:
            return False
        self.cache.capacity = max(self.cache.capacity, needed)
        return True

    def _load(self, ds, tr: int, tc: int):
        bh, bw = self.block
        win = Window(tc * bw, tr * bh, min(bw, self.width - tc * bw), min(bh, self.height - tr * bh))
        data = ds.read(self.bands, window=win)
        valid = None if self.all_valid else self.valid_of(ds, window=win)
        sample = self.sample
        if sample is not None:
            sample.take(tr * bh, tc * bw, data, valid)
        return data, valid, 0

    sample: Sample | None = None

    def sample_every(self, rows: np.ndarray, cols: np.ndarray) -> Sample:
        """Also keep the pixels at ``rows`` x ``cols`` of every tile decoded from now on (a
        decimated read of the scene that costs no decoding of its own; see :class:`Sample`)."""
        self.sample = Sample(rows, cols, len(self.bands), self.dtype, self.block, self.height, self.width)
        return self.sample


    def read(self, ds, window: Window, out: np.ndarray, keep: bool = True) -> np.ndarray:
        """Fill ``out`` (bands, h, w) float32 with ``window`` (inside the source); return its validity.

        ``keep=False``: tiles read for this window only are not kept (a one-pass sweep)."""
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        bh, bw = self.block
        valid = np.ones((h, w), bool) if self.all_valid else np.empty((h, w), bool)
        for tr in range(r0 // bh, (r0 + h - 1) // bh + 1):
            ty = tr * bh
            y0, y1 = max(r0, ty), min(r0 + h, ty + bh)
            for tc in range(c0 // bw, (c0 + w - 1) // bw + 1):
                tx = tc * bw
                x0, x1 = max(c0, tx), min(c0 + w, tx + bw)
                data, ok, start = self.cache.get((tr, tc), lambda tr=tr, tc=tc: self._load(ds, tr, tc), keep=keep,
                                                 first_row=y0 - ty)
                src = (slice(y0 - ty - start, y1 - ty - start), slice(x0 - tx, x1 - tx))
                dst = (slice(y0 - r0, y1 - r0), slice(x0 - c0, x1 - c0))
                out[(slice(None),) + dst] = data[(slice(None),) + src]  # cast to float32: exact
                if ok is not None:
                    valid[dst] = ok[src]
        return valid

    def release(self) -> None:
        """Drop every decoded tile and what was counted of the windows read."""
        self.cache.clear()
        self.cache.capacity = 0  # room is made again for the next windows' size, not the largest ever read
        with self._done_lock:
            self._done.clear()

    def window_done(self, r0: int, c0: int, h: int, w: int) -> None:
        """After a window of the planned grid (:attr:`windows`) at (``r0``, ``c0``) is read:
        once every window of its row that reads a tile has read it, keep of that tile only
        the rows from where the next row of windows starts (all later windows read no
        higher). The tile row that two rows of windows share is then held from the second
        row's top only, not whole (with 512 windows 448 apart on 512 tiles, on average 56%
        of it; a row of tiles across the scene for each scene being read). Counting the
        row's readers, rather than assuming the next window reads next, keeps windows read
        side by side on threads (batches overlap) from decoding a tile again; a window of
        an earlier row read after the next row has finished with a tile would."""
        if self.windows is None or (h, w) != (self.windows[0],) * 2:
            return
        size, tops, lefts = self.windows
        i = bisect.bisect_right(tops, r0)
        below = tops[i] if i < len(tops) else math.inf  # where the next row of windows starts
        bh, bw = self.block
        for tr in range(max(r0, 0) // bh, (min(r0 + h, self.height) - 1) // bh + 1):
            if below <= tr * bh:
                continue  # all of it is read by the next row of windows
            for tc in range(max(c0, 0) // bw, (min(c0 + w, self.width) - 1) // bw + 1):
                # windows of this row that read this tile column
                readers = bisect.bisect_left(lefts, (tc + 1) * bw) - bisect.bisect_right(lefts, tc * bw - size)
                with self._done_lock:
                    key = (tr, tc, r0)
                    done = self._done.get(key, 0) + 1
                    if done < readers:
                        self._done[key] = done
                        continue
                    self._done.pop(key, None)
                self.cache.crop((tr, tc), below - tr * bh)


class Sample:
    """The pixels of a grid of sampled rows and columns, gathered tile by tile as tiles are decoded.

    A run decodes every tile of its scene once for its windows; the quicklook and scene
    statistics need every f-th pixel of the scene, which otherwise costs a second decoding
    of every tile (0.65 CPU-s for an 8192² RGB scene, on the run's tail). ``complete`` once
    every tile has been seen; ``data`` (bands, rows, cols) in the source type and ``valid``
    then hold exactly what :meth:`geodino.scene.Scene.read_overview` would read.
    """

    def __init__(self, rows, cols, bands: int, dtype, block, height: int, width: int) -> None:
        self.rows, self.cols = np.asarray(rows), np.asarray(cols)
        self.data = np.zeros((bands, len(self.rows), len(self.cols)), dtype)
        self.valid = np.ones((len(self.rows), len(self.cols)), bool)
        bh, bw = block
        self.block = block
        self._pending = {(r, c) for r in range(math.ceil(height / bh)) for c in range(math.ceil(width / bw))}
        self._lock = threading.Lock()

    @property
    def complete(self) -> bool:
        return not self._pending

    def take(self, top: int, left: int, data: np.ndarray, valid: np.ndarray | None) -> None:
        bh, bw = self.block
        r = np.searchsorted(self.rows, [top, top + data.shape[1]])
        c = np.searchsorted(self.cols, [left, left + data.shape[2]])
        if r[1] > r[0] and c[1] > c[0]:
            sel = np.ix_(self.rows[r[0]:r[1]] - top, self.cols[c[0]:c[1]] - left)
            self.data[:, r[0]:r[1], c[0]:c[1]] = data[(slice(None),) + sel]
            if valid is not None:
                self.valid[r[0]:r[1], c[0]:c[1]] = valid[sel]
        with self._lock:
            self._pending.discard((top // bh, left // bw))

__all__ = ["EXACT_IN_FLOAT32", "Sample", "TileCache", "TiledReader", "all_valid"]
