"""Blocks gathered into whole rows of tiles before GDAL sees them.

Output blocks start where window rows start (448 px apart with the default windows), COG
tiles every 512 px, so most tiles take pixels from two rows of blocks. Written straight to a
512-tiled GeoTIFF, a half-filled tile waits in GDAL's block cache; once the cache is full it
is compressed, written, and later read back and decoded to be completed: double work, and
a file that holds dead copies of tiles. :class:`TileRows` keeps the pixels of the rows of
tiles that are not yet complete (at most about two at a time when blocks arrive row by row,
as :func:`geodino.stream.stream_blocks` delivers them) and hands each row of tiles to GDAL
once, whole, so every tile is compressed exactly once (on the writing thread: GDAL's own
compression threads would compete with a model's threads while windows are still being
inferred) and the file holds each tile once, in row-major order.
"""

from __future__ import annotations

import numpy as np
from rasterio.windows import Window


class TileRows:
    """Write (band, rows, cols) blocks to an open tiled rasterio dataset, a row of tiles at a time."""

    def __init__(self, dst, tile: int | None = None, on_row=None, store=None) -> None:
        """``on_row(pixels, top)``: called with each whole row of tiles once written (e.g. to keep
        a flat copy for the polygoniser, :class:`geodino.rawpixels.RawPixels`). ``store``: a
        :class:`geodino.tilecodec.TileStore` that encodes the rows instead of GDAL (``dst``
        then only holds the image's structure)."""
        self.dst = dst
        self.on_row, self.store = on_row, store
        self.tile = int(tile or dst.block_shapes[0][0])
        self.shape = (dst.count, dst.height, dst.width)
        self.dtype = np.dtype(dst.dtypes[0])
        self._pending: dict[int, list] = {}  # tile row -> [pixels, number of pixels filled]

    @staticmethod
    def buffer_bytes(count: int, width: int, dtype, tile: int) -> int:
        """Pixels held at most while blocks arrive row by row: two rows of tiles."""
        return 2 * tile * width * count * np.dtype(dtype).itemsize

    def write(self, block: np.ndarray, rows: slice, cols: slice) -> None:
        count, height, width = self.shape
        r = rows.start
        while r < rows.stop:
            t = r // self.tile
            top, bottom = t * self.tile, min((t + 1) * self.tile, height)
            end = min(rows.stop, bottom)
            entry = self._pending.get(t)
            if entry is None:
                entry = self._pending[t] = [np.empty((count, bottom - top, width), self.dtype), 0]
            entry[0][:, r - top:end - top, cols] = block[:, r - rows.start:end - rows.start]
            entry[1] += (end - r) * (cols.stop - cols.start)
            if entry[1] == (bottom - top) * width:
                del self._pending[t]
                if self.store is not None:
                    self.store.write_row(entry[0], top)
                else:
                    self.dst.write(entry[0], window=Window(0, top, width, bottom - top))
                if self.on_row is not None:
                    self.on_row(entry[0], top)
            r = end

    def close(self) -> None:
        """Check that every row of tiles was completed (a block that never came is a bug)."""
        if self._pending:
            rows = sorted(self._pending)
            raise RuntimeError(f"{self.dst.name}: rows of tiles {rows} were never completed")
