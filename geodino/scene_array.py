"""In-memory scenes: a rioxarray DataArray written once to a tiled GeoTIFF that a Scene reads.

Scenes are read window by window through GDAL and must pickle for dask.distributed, so an
array becomes a file in a temporary folder that is removed when the process exits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geodino.errors import InputError
from geodino.sources import SUPPORTED_DTYPES

_ARRAY_DIR: list[Path] = []


def is_dataarray(obj) -> bool:
    """Whether ``obj`` is an xarray DataArray (without importing xarray)."""
    return type(obj).__name__ == "DataArray" and hasattr(obj, "dims")


def _array_dir() -> Path:
    """geodino's folder for arrays written as files, removed when the process exits."""
    if not _ARRAY_DIR:
        import atexit
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="geodino-arrays-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _ARRAY_DIR.append(folder)
    return _ARRAY_DIR[0]


def _array_descriptions(arr) -> list[str | None]:
    if "band_name" in arr.coords:
        return [str(v) for v in np.atleast_1d(arr["band_name"].values)]
    if arr["band"].dtype.kind in "OUS":
        return [str(v) for v in arr["band"].values]
    names = arr.attrs.get("long_name")
    if isinstance(names, (tuple, list)) and len(names) == arr.sizes["band"]:
        return [str(v) for v in names]
    return [None] * arr.sizes["band"]


def array_source(arr, strip_rows: int = 512) -> str:
    """A tiled GeoTIFF holding a rioxarray DataArray, written once, strip by strip (lazy arrays
    are computed a strip at a time), and reused for the same array.

    Scenes are read window by window through GDAL (and must pickle, for dask.distributed), so
    an in-memory scene becomes a file in a temporary folder that is removed at exit. CRS,
    transform, nodata (``rio.nodata`` or the encoded one) and band names (``band_name``
    coordinate, string band labels or ``long_name``) travel with it.
    """
    import dask.base
    import rioxarray  # noqa: F401  (registers .rio)

    from geodino.export import atomic_path

    if arr.ndim == 2:
        arr = arr.expand_dims(band=[1])
    dims = tuple(arr.dims)
    if arr.ndim != 3 or dims[1:] != ("y", "x"):
        raise InputError(f"an in-memory scene must be a DataArray with dimensions (band, y, x) or (y, x); got {dims}")
    arr = arr.rename({dims[0]: "band"}) if dims[0] != "band" else arr
    if arr.rio.crs is None:
        raise InputError("the DataArray has no CRS; set one with da.rio.write_crs(...)")
    if arr.sizes["y"] == 0 or arr.sizes["x"] == 0:
        raise InputError(f"the DataArray is empty ({arr.sizes['x']} x {arr.sizes['y']})")
    dtype = str(arr.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"the DataArray's data type {dtype} is not supported (use one of {', '.join(SUPPORTED_DTYPES)})")
    # the stored GeoTransform is exact but rioxarray keeps it through strided selections; the
    # one recomputed from coordinates is always right but carries float noise: exact when they agree
    transform, stored = arr.rio.transform(recalc=True), arr.rio.transform()
    if np.allclose(tuple(transform)[:6], tuple(stored)[:6], rtol=0, atol=1e-6 * abs(stored.a or 1)):
        transform = stored
    if transform.b != 0 or transform.d != 0 or transform.a == 0 or transform.e == 0:
        raise InputError("the DataArray's coordinates do not form a north-up grid")
    nodata = arr.rio.nodata if arr.rio.nodata is not None else arr.rio.encoded_nodata
    descriptions = _array_descriptions(arr)
    token = dask.base.tokenize(arr.data, transform, arr.rio.crs.to_wkt(), nodata, descriptions)
    stem = str(arr.name or arr.attrs.get("scene") or "array").replace("/", "_")[:40]
    path = _array_dir() / f"{stem}-{token[:16]}.tif"
    if path.exists():
        return str(path)
    count, height, width = arr.shape
    block = 256 if min(height, width) >= 256 else 16 * max(1, min(height, width) // 16)
    if nodata is not None and np.isnan(nodata) and dtype[0] != "f":
        nodata = None  # a NaN fill of integer data marks nothing
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=arr.rio.crs,
                   transform=transform, nodata=nodata, tiled=min(height, width) >= 16, compress="ZSTD",
                   BIGTIFF="IF_SAFER")
    if profile["tiled"]:
        profile.update(blockxsize=block, blockysize=block)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            for i, d in enumerate(descriptions, start=1):
                if d:
                    dst.set_band_description(i, d)
            for row in range(0, height, strip_rows):
                rows = min(strip_rows, height - row)
                dst.write(np.asarray(arr[:, row:row + rows, :].values), window=Window(0, row, width, rows))
    return str(path)
