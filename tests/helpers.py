"""Small raster builders shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin


def write_raster(path: Path, data: np.ndarray, *, crs="EPSG:32633", transform=None, nodata=None,
                 descriptions=None, **extra) -> Path:
    """Write (bands, h, w) ``data`` as a tiled GeoTIFF."""
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    transform = transform if transform is not None else from_origin(500000.0, 4000000.0, 10.0, 10.0)
    profile = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype, crs=crs, transform=transform,
                   nodata=nodata)
    if h >= 16 and w >= 16:
        profile.update(tiled=True, blockxsize=16 * max(1, min(w, 256) // 16), blockysize=16 * max(1, min(h, 256) // 16))
    profile.update(extra)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
    return path


def random_image(h: int, w: int, bands: int = 3, dtype="uint8", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random((bands, h, w)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, 1), min(info.max, 10000), (bands, h, w)).astype(dtype)
