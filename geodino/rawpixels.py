"""A flat copy of a class raster's pixels, written as it streams, for GDAL's polygoniser.

``GDALPolygonize`` reads its band one row at a time, twice (a labelling pass, then the
tracing pass). From a tiled, compressed COG, each of those row reads visits every tile of
the row through GDAL's block cache (on the 8192² benchmark map, polygonize alone: 1.9-2.7
CPU-s from the COG against 1.5-2.6 from a flat file, alternating runs on a busy machine;
the same polygons to the bit; BENCHMARKS.md). The rows of tiles :class:`geodino.tilerows.TileRows`
hands to GDAL are whole, full-width rows, so a copy of them in a flat file costs one
sequential write of the pixels while the run streams. The file is GDAL's ENVI raw format
(band-sequential, with a text header GDAL reads), so no GDAL writer is involved; it lives in
the page cache, not in the process (memory stays flat in scene area), and is removed with
the run's other temporary files. It holds no georeferencing: the polygoniser takes that
from the COG itself (its ``DATASET_FOR_GEOREF`` option), so vertices are computed exactly as
when it reads the COG.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

# numpy type -> ENVI "data type" code (the integer types the polygoniser reads exactly)
ENVI_TYPES = {"uint8": 1, "int16": 2, "int32": 3, "uint16": 12}


class RawPixels:
    """A one-band raster file of ``height`` x ``width`` pixels, filled by whole rows in any order."""

    def __init__(self, path: str | os.PathLike, height: int, width: int, dtype) -> None:
        self.dtype = np.dtype(np.dtype(dtype).name)  # native byte order
        if self.dtype.name not in ENVI_TYPES:
            raise ValueError(f"RawPixels takes {', '.join(ENVI_TYPES)} pixels, not {self.dtype.name}")
        self.path, self.height, self.width = Path(path), int(height), int(width)
        self.header = self.path.with_name(self.path.name + ".hdr")
        self._rows = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.header.write_text(
            f"ENVI\nsamples = {self.width}\nlines = {self.height}\nbands = 1\nheader offset = 0\n"
            f"file type = ENVI Standard\ndata type = {ENVI_TYPES[self.dtype.name]}\ninterleave = bsq\n"
            f"byte order = {0 if np.little_endian else 1}\n")

    @classmethod
    def supports(cls, dtype, count: int) -> bool:
        return count == 1 and np.dtype(dtype).name in ENVI_TYPES

    def write_rows(self, pixels: np.ndarray, top: int) -> None:
        """Write whole rows (``(rows, width)`` or ``(1, rows, width)``) starting at row ``top``."""
        rows = np.ascontiguousarray(pixels.reshape(-1, self.width), self.dtype)
        if top < 0 or top + len(rows) > self.height:
            raise ValueError(f"rows {top}..{top + len(rows)} outside a raster of {self.height} rows")
        view, offset = memoryview(rows).cast("B"), top * self.width * self.dtype.itemsize
        while view:  # pwrite may write less than asked
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done
        self._rows += len(rows)

    @property
    def complete(self) -> bool:
        """Whether as many rows were written as the raster has (each row is written once)."""
        return self._rows == self.height

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        for leftover in (self.path, self.header, self.path.with_name(self.path.name + ".aux.xml")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


__all__ = ["ENVI_TYPES", "RawPixels"]
