"""A small output folder with known content, written by geodino's own writers (for plot/map tests).

64 x 96 pixels of 10 m in UTM 33N: land cover is Tree cover (10) on the left half and Built-up
(50) on the right half, nodata in the top-right 16 x 16 corner; canopy height is 20 m on the
left, a valid 0 m on the right and NaN in the bottom 8 rows; the scene is red on the left and
blue on the right (reflectance x 10000).
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from geodino.classes import WORLDCOVER
from geodino.export import RasterOutput, write_rasters
from geodino.scene import Grid
from tests.helpers import write_raster

H, W, RES = 64, 96, 10.0
ORIGIN = (500000.0, 4000000.0)
CRS32633 = CRS.from_epsg(32633)
TRANSFORM = Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1])
GRID = Grid(CRS32633, TRANSFORM, W, H)


def landcover_codes() -> np.ndarray:
    codes = np.full((H, W), 10, np.uint8)
    codes[:, W // 2:] = 50
    codes[:16, -16:] = 0
    return codes


def heights() -> np.ndarray:
    h = np.full((H, W), 20.0, np.float32)
    h[:, W // 2:] = 0.0
    h[-8:, :] = np.nan
    return h


def scene_pixels() -> np.ndarray:
    rgb = np.zeros((3, H, W), np.uint16)
    rgb[2, :, : W // 2] = 2500  # band 3 = red (reflectance profile: bands 3, 2, 1)
    rgb[0, :, W // 2:] = 2500  # band 1 = blue
    return rgb


def _coords() -> dict:
    return {"y": ORIGIN[1] - RES * (np.arange(H) + 0.5), "x": ORIGIN[0] + RES * (np.arange(W) + 0.5)}


def dataset() -> xr.Dataset:
    """What run_scene returns for this layout (computed), without a scene reference."""
    lc = xr.DataArray(landcover_codes(), dims=("y", "x"), coords=_coords(),
                      attrs={"class_codes": WORLDCOVER.codes, "class_names": WORLDCOVER.names, "_FillValue": 0,
                             "class_colors": [v for c in WORLDCOVER.classes for v in c.color]})
    chm = xr.DataArray(heights(), dims=("y", "x"), coords=_coords(), attrs={"units": "m"})
    return xr.Dataset({"landcover": lc, "canopy_height": chm}).rio.write_crs(CRS32633)


def write_outputs(folder: Path, *, with_scene: bool = True) -> Path:
    """landcover.tif, canopy_height.tif (COGs by geodino's writer) and report.json naming scene.tif."""
    folder.mkdir(parents=True, exist_ok=True)

    def lazy(a):
        return xr.DataArray(da.from_array(a[None], chunks=(1, 32, 32)), dims=("band", "y", "x"))

    write_rasters([
        RasterOutput(folder / "landcover.tif", lazy(landcover_codes()), dtype="uint8", nodata=0,
                     descriptions=["land cover"], classes=WORLDCOVER, overview_resampling="mode", grid=GRID),
        RasterOutput(folder / "canopy_height.tif", lazy(heights()), dtype="float32", nodata=float("nan"),
                     descriptions=["canopy height"], units="m", grid=GRID),
    ])
    if with_scene:
        scene = write_raster(folder / "scene.tif", scene_pixels(), crs="EPSG:32633", transform=TRANSFORM)
        norm = {"profile": "reflectance", "family": "sat", "lo": [0.0] * 3, "hi": [3000.0] * 3}
        (folder / "report.json").write_text(json.dumps({"scene": [str(scene)], "scene_bands": [3, 2, 1],
                                                        "normalisation": norm, "complete": True}))
    return folder
