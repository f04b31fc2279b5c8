"""A flat copy of a class raster's pixels, written as it streams, for GDAL's polygoniser.

``GDALPolygonize`` reads its band one row at a time, twice (a labelling pass, then the
tracing pass). From a tiled, compressed COG, each of those row reads visits every tile of
the row through GDAL's block cache: on the 8192² benchmark map that is about a third of the
tracing time (2.2-2.6 CPU-s from the COG against 1.5-1.7 from a flat file, the same
polygons to the bit; BENCHMARKS.md). The rows of tiles :class:`geodino.tilerows.TileRows`
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


# rasters at least this tall are kept in two halves (two files), traced on two threads at once
HALVES_FROM = 2048


class RawPixels:
    """A one-band raster of ``height`` x ``width`` pixels in flat files, filled by whole rows in
    any order: one file, or two (the rows above and from a cut at a multiple of 512) where
    ``halves`` and the raster has :data:`HALVES_FROM` rows or more (see
    :func:`geodino.pieces.trace_halves`). ``parts``: [(file, first row)]."""

    def __init__(self, path: str | os.PathLike, height: int, width: int, dtype, *, halves: bool = False) -> None:
        self.dtype = np.dtype(np.dtype(dtype).name)  # native byte order
        if self.dtype.name not in ENVI_TYPES:
            raise ValueError(f"RawPixels takes {', '.join(ENVI_TYPES)} pixels, not {self.dtype.name}")
        self.path, self.height, self.width = Path(path), int(height), int(width)
        cuts = [0]
        if halves and self.height >= HALVES_FROM:
            cuts.append(self.height // 2 // 512 * 512)
        paths = [self.path] + [self.path.with_name(f"{self.path.stem}.{k}{self.path.suffix}") for k in cuts[1:]]
        self.parts = list(zip(paths, cuts))
        self._ends = cuts[1:] + [self.height]
        self._rows = 0
        self._fds = []
        for (part, top), end in zip(self.parts, self._ends):
            self._fds.append(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            part.with_name(part.name + ".hdr").write_text(
                f"ENVI\nsamples = {self.width}\nlines = {end - top}\nbands = 1\nheader offset = 0\n"
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
        for fd, (_, first), end in zip(self._fds, self.parts, self._ends):
            lo, hi = max(top, first), min(top + len(rows), end)
            if hi <= lo:
                continue
            view = memoryview(rows[lo - top:hi - top]).cast("B")
            offset = (lo - first) * self.width * self.dtype.itemsize
            while view:  # pwrite may write less than asked
                done = os.pwrite(fd, view, offset)
                view, offset = view[done:], offset + done
        self._rows += len(rows)

    @property
    def complete(self) -> bool:
        """Whether as many rows were written as the raster has (each row is written once)."""
        return self._rows == self.height

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def remove(self) -> None:
        self.close()
        for part, _ in self.parts:
            for leftover in (part, part.with_name(part.name + ".hdr"), part.with_name(part.name + ".aux.xml")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


__all__ = ["ENVI_TYPES", "HALVES_FROM", "RawPixels"]
