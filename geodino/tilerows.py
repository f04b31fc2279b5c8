"""Blocks gathered into whole tiles before GDAL (or a tile store) sees them.

Output blocks start where window rows start (448 px apart with the default windows), COG
tiles every 512 px, so most tiles take pixels from two rows of blocks. Written straight to a
512-tiled GeoTIFF, a half-filled tile waits in GDAL's block cache; once the cache is full it
is compressed, written, and later read back and decoded to be completed: double work, and
a file that holds dead copies of tiles. :class:`TileRows` keeps the pixels of the tiles that
are not yet complete and hands each tile over once, whole, as soon as its last pixels
arrive, so every tile is compressed exactly once (on the writing thread: GDAL's own
compression threads would compete with a model's threads while windows are still being
inferred). With blocks arriving row by row (:func:`geodino.stream.stream_blocks`), what is
held is about one row of tiles across the scene: the tiles of a row still waiting for the
rest of the current row of blocks, and those of the next row it has begun. Holding whole
rows of tiles until their last block (as before) held up to two such rows (e.g. 32 MB of a
float32 output 8192 px wide, and half that again for its overview levels). Tiles of a row
complete left to right (when blocks are no taller than a tile), so files still hold
them in row-major order; :func:`geodino.cog.assemble_cog` follows each tile's offset either way.
"""

from __future__ import annotations

import numpy as np
from rasterio.windows import Window


class TileRows:
    """Write (band, rows, cols) blocks to an open tiled rasterio dataset, each tile once, whole."""

    def __init__(self, dst, tile: int | None = None, on_row=None, store=None) -> None:
        """``on_row(pixels, top)``: called with each whole row of tiles once written (e.g. to keep
        a flat copy for the polygoniser, :class:`geodino.rawpixels.RawPixels`); the finished
        tiles of a row are then kept until the row is complete. ``store``: a
        :class:`geodino.tilecodec.TileStore` that encodes the tiles instead of GDAL (``dst``
        then only holds the image's structure)."""
        self.dst = dst
        self.on_row, self.store = on_row, store
        self.tile = int(tile or dst.block_shapes[0][0])
        self.shape = (dst.count, dst.height, dst.width)
        self.dtype = np.dtype(dst.dtypes[0])
        self.across = -(-dst.width // self.tile)
        self._pending: dict[tuple[int, int], list] = {}  # (tile row, tile col) -> [pixels, number filled]
        self._done: dict[int, dict[int, np.ndarray]] = {}  # tile row -> its finished tiles (for on_row)

    @staticmethod
    def buffer_bytes(count: int, width: int, dtype, tile: int) -> int:
        """Pixels held at most while blocks arrive row by row: two rows of tiles (about one
        when blocks are no taller than a tile and no output needs whole rows)."""
        return 2 * tile * width * count * np.dtype(dtype).itemsize

    @property
    def pending_bytes(self) -> int:
        """Bytes of the pixels held now (tiles not yet complete, finished tiles kept for on_row)."""
        return sum(e[0].nbytes for e in self._pending.values()) + sum(
            a.nbytes for row in self._done.values() for a in row.values())

    def write(self, block: np.ndarray, rows: slice, cols: slice) -> None:
        count, height, width = self.shape
        t = self.tile
        if rows.stop <= rows.start or cols.stop <= cols.start:
            return
        for tr in range(rows.start // t, (rows.stop - 1) // t + 1):
            top, bottom = tr * t, min((tr + 1) * t, height)
            r0, r1 = max(rows.start, top), min(rows.stop, bottom)
            for tc in range(cols.start // t, (cols.stop - 1) // t + 1):
                left, right = tc * t, min((tc + 1) * t, width)
                c0, c1 = max(cols.start, left), min(cols.stop, right)
                entry = self._pending.get((tr, tc))
                if entry is None:
                    entry = self._pending[(tr, tc)] = [np.empty((count, bottom - top, right - left), self.dtype), 0]
                entry[0][:, r0 - top:r1 - top, c0 - left:c1 - left] = \
                    block[:, r0 - rows.start:r1 - rows.start, c0 - cols.start:c1 - cols.start]
                entry[1] += (r1 - r0) * (c1 - c0)
                if entry[1] == (bottom - top) * (right - left):
                    del self._pending[(tr, tc)]
                    self._finish(entry[0], tr, tc)

    def _finish(self, pixels: np.ndarray, tr: int, tc: int) -> None:
        top, left = tr * self.tile, tc * self.tile
        if self.store is not None:
            self.store.write_tile(pixels, top, left)
        else:
            self.dst.write(pixels, window=Window(left, top, pixels.shape[2], pixels.shape[1]))
        if self.on_row is not None:
            row = self._done.setdefault(tr, {})
            row[tc] = pixels
            if len(row) == self.across:
                del self._done[tr]
                self.on_row(np.concatenate([row[c] for c in range(self.across)], axis=2), top)

    def close(self) -> None:
        """Check that every tile was completed (a block that never came is a bug)."""
        if self._pending:
            rows = sorted({tr for tr, _ in self._pending})
            raise RuntimeError(f"{self.dst.name}: rows of tiles {rows} were never completed")
