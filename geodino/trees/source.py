"""Reading a canopy-height raster for tree detection: checks, pixel size in metres, padded blocks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geodino.errors import InputError
from geodino.trees.params import PixelSize
from geodino.units import metres_per_unit

MIN_PIXEL_M, MAX_PIXEL_M = 0.02, 5.0


@dataclass(frozen=True)
class CanopyRaster:
    """A canopy-height raster (heights in metres) as tree detection sees it."""

    path: Path
    band: int
    crs: CRS
    transform: Affine
    width: int
    height: int
    nodata: float | None
    pixel: PixelSize

    def read(self, row0: int, col0: int, height: int, width: int, dataset=None) -> np.ndarray:
        """Heights in rows [row0, row0+height) x cols [col0, col0+width) as float32, NaN for
        nodata and for the part outside the raster (blocks with a halo reach past its edge)."""
        out = np.full((height, width), np.nan, np.float32)
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + height, self.height), min(col0 + width, self.width)
        if r1 <= r0 or c1 <= c0:
            return out
        src = dataset if dataset is not None else rasterio.open(self.path)
        try:
            data = src.read(self.band, window=Window(c0, r0, c1 - c0, r1 - r0), out_dtype=np.float32)
        finally:
            if dataset is None:
                src.close()
        if self.nodata is not None and not math.isnan(self.nodata):
            data[data == np.float32(self.nodata)] = np.nan
        out[r0 - row0:r1 - row0, c0 - col0:c1 - col0] = data
        return out

    def xy(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates of pixel centres."""
        t = self.transform
        return t.c + (cols + 0.5) * t.a, t.f + (rows + 0.5) * t.e


def open_canopy(path: str | os.PathLike, band: int = 1) -> CanopyRaster:
    """Check a canopy-height raster and work out its pixel size in metres."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: canopy-height raster not found")
    try:
        src = rasterio.open(p)
    except rasterio.errors.RasterioIOError as e:
        raise InputError(f"{p}: not a raster GDAL can read ({e})") from None
    with src:
        if not 1 <= band <= src.count:
            raise InputError(f"{p}: has {src.count} band(s); band {band} does not exist")
        if src.crs is None:
            raise InputError(f"{p}: has no CRS; tree parameters are in metres, so the raster needs a "
                             "projected or geographic CRS (assign one with gdal_edit.py -a_srs)")
        t = src.transform
        if t.b != 0 or t.d != 0:
            raise InputError(f"{p}: the grid is rotated or sheared; warp it to a north-up grid first "
                             "(gdalwarp)")
        if np.dtype(src.dtypes[band - 1]).kind not in "iuf":
            raise InputError(f"{p}: band {band} is {src.dtypes[band - 1]}, not heights")
        pixel = _pixel_size_m(src.crs, t, src.width, src.height)
        raster = CanopyRaster(p, band, src.crs, t, src.width, src.height, src.nodata, pixel)
    for size in (pixel.y, pixel.x):
        if not MIN_PIXEL_M <= size <= MAX_PIXEL_M:
            raise InputError(f"{p}: pixels are {size:.3g} m; individual trees need pixels between "
                             f"{MIN_PIXEL_M} and {MAX_PIXEL_M} m (resample with gdalwarp -tr)")
    return raster


def _pixel_size_m(crs: CRS, t: Affine, width: int, height: int) -> PixelSize:
    """Pixel size in metres: through the CRS's linear unit, or, for a geographic CRS, the
    geodesic size of a pixel at the raster's centre (an approximation that holds over a
    scene of tens of kilometres; warp larger geographic rasters to a projected CRS)."""
    if crs.is_geographic:
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        lon, lat = t * (width / 2, height / 2)
        _, _, dx = geod.inv(lon, lat, lon + abs(t.a), lat)
        _, _, dy = geod.inv(lon, lat, lon, lat + abs(t.e))
        return PixelSize(y=float(dy), x=float(dx))
    factor = metres_per_unit(crs)
    return PixelSize(y=abs(t.e) * factor, x=abs(t.a) * factor)
