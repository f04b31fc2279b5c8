"""DEFLATE tiles of a GeoTIFF encoded here, with Intel's ISA-L, instead of by GDAL's zlib.

Encoding tiles was the largest cost of a run's output side: GDAL (libtiff's predictor and
libdeflate, in rasterio's wheels) took 1.5-1.6 CPU-s per 8192² float32 canopy map at DEFLATE
level 1 and 0.35 s per class map at level 6, plus a third again for the overview levels.
ISA-L's DEFLATE (the ``isal`` package) writes the same format (a zlib stream, what TIFF's
compression 8 holds, readable by every DEFLATE reader): 0.64-0.88 s and 0.04-0.05 s for the
same maps with the predictor done here, float maps 3% larger, class maps 3.5 MB instead of
1.9 per 8192² (BENCHMARKS.md, "Pipeline ceiling, third pass"). GDAL cannot be given another encoder, so tiles are encoded here, with
TIFF's predictors done in numpy, and kept in a :class:`TileStore` (one file of tiles and
their index) from which :func:`geodino.cog.assemble_cog` lays them out. GDAL still writes
each image's structure (tags, georeferencing, colour table, metadata) to a sparse GeoTIFF
that holds no tiles. Without ``isal`` the standard library's zlib is used: the same
format, slower than GDAL's libdeflate.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

try:
    from isal import isal_zlib as _deflate

    def _level(level: int) -> int:
        """ISA-L's level (0-3) for a zlib level (0-9): 1-3 -> 1, 4 and up -> 2.

        Measured on the 8192² benchmark maps against Python's zlib (per 8192²): float heights
        with predictor 3 at 1: 101 MB (zlib 1: 100 MB) in 0.27x the CPU time, the predictor
        included; 7-class land cover at 2: 3.5 MB (zlib 6: 2.0 MB) in 0.08x. ISA-L's 3 came
        out larger than its 2 on both, so it is not used.
        """
        return 0 if level <= 0 else 1 if level <= 3 else 2
except ImportError:  # pragma: no cover - isal is a dependency; its absence only costs speed
    import zlib as _deflate

    def _level(level: int) -> int:
        return level

PREDICTORS = (1, 2, 3)


def encode_tile(tile: np.ndarray, predictor: int, level: int) -> bytes:
    """One (rows, cols) tile as TIFF DEFLATE bytes with ``predictor`` (1 none, 2 horizontal
    differencing of integers, 3 floating point: TIFF Technical Note 3)."""
    if predictor == 3:
        rows, cols = tile.shape
        # each row's bytes regrouped by significance, most significant first, then differenced
        planes = np.ascontiguousarray(tile, tile.dtype.newbyteorder(">")).view(np.uint8)
        planes = planes.reshape(rows, cols, tile.dtype.itemsize).transpose(0, 2, 1).reshape(rows, -1)
        data = np.empty_like(planes)
        data[:, 0] = planes[:, 0]
        np.subtract(planes[:, 1:], planes[:, :-1], out=data[:, 1:])
    elif predictor == 2:
        src = np.ascontiguousarray(tile)
        data = np.empty_like(src)
        data[:, 0] = src[:, 0]
        np.subtract(src[:, 1:], src[:, :-1], out=data[:, 1:])
    elif predictor == 1:
        data = np.ascontiguousarray(tile)
    else:
        raise ValueError(f"TIFF predictor {predictor} is not one of {PREDICTORS}")
    return _deflate.compress(memoryview(data).cast("B"), _level(level))


class TileStore:
    """The encoded tiles of one single-band tiled image, in a file of their own, with their index.

    Tiles are addressed as TIFF does (row of tiles x tiles across + column); edge tiles are
    padded to the full tile with ``fill`` (readers ignore the padding; a constant compresses
    to nothing). ``offsets``/``counts`` give each tile's bytes in :attr:`path` (count 0: not
    written, as a sparse TIFF tile).
    """

    def __init__(self, path: str | os.PathLike, height: int, width: int, tile: int, dtype, *, predictor: int,
                 level: int, fill=0) -> None:
        self.path, self.tile, self.dtype = Path(path), int(tile), np.dtype(dtype)
        self.height, self.width = int(height), int(width)
        self.predictor, self.level, self.fill = predictor, level, fill
        self.across = -(-self.width // self.tile)
        n = self.across * -(-self.height // self.tile)
        self.offsets = np.zeros(n, np.int64)
        self.counts = np.zeros(n, np.int64)
        self._file = open(self.path, "wb")
        self._end = 0

    def write_row(self, pixels: np.ndarray, top: int) -> None:
        """Encode and append a whole row of tiles: ``pixels`` (1, rows, width) from row ``top``."""
        t = self.tile
        if top % t or pixels.shape[-1] != self.width:
            raise ValueError(f"a row of tiles starts on a multiple of {t} and spans the width {self.width}")
        rows = pixels.reshape(pixels.shape[-2], self.width)
        first = top // t * self.across
        self._append([(first + c, self._encode(rows[:, c * t:(c + 1) * t])) for c in range(self.across)])

    def write_tile(self, pixels: np.ndarray, top: int, left: int) -> None:
        """Encode and append one tile: ``pixels`` (1, rows, cols), the whole tile (cut at the
        image's edge) whose first pixel is (``top``, ``left``). Tiles may come in any order."""
        t = self.tile
        rows = pixels.reshape(pixels.shape[-2:])
        if top % t or left % t or rows.shape != (min(t, self.height - top), min(t, self.width - left)):
            raise ValueError(f"a tile starts on multiples of {t} and is whole (cut only at the image's edge)")
        self._append([(top // t * self.across + left // t, self._encode(rows))])

    def _encode(self, part: np.ndarray) -> bytes:
        t = self.tile
        if part.shape != (t, t):  # an edge tile: padded to the full tile
            pad = np.full((t, t), self.fill, self.dtype)
            pad[:part.shape[0], :part.shape[1]] = part
            part = pad
        return encode_tile(part, self.predictor, self.level)

    def _append(self, tiles: list[tuple[int, bytes]]) -> None:
        for index, data in tiles:
            self.offsets[index], self.counts[index] = self._end, len(data)
            self._end += len(data)
        self._file.write(b"".join(data for _, data in tiles))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


__all__ = ["PREDICTORS", "TileStore", "encode_tile"]
