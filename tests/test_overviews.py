"""Overview levels pooled while blocks stream (geodino.overviews) against GDAL's own."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.shutil import copy as rio_copy
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

from geodino.classes import WORLDCOVER
from geodino.export import RasterOutput, write_rasters
from geodino.overviews import levels_needed, pool2, streamable_levels
from geodino.scene import Grid
from geodino.stitch import to_dataarray


def test_levels_match_the_cog_driver():
    assert [levels_needed(n, n) for n in (300, 512, 513, 1024, 4096, 8192)] == [0, 0, 1, 1, 3, 4]
    assert streamable_levels(((1,), (448, 448, 100), (448, 80)), 4) == 4  # 448 = 7 x 64
    assert streamable_levels(((1,), (300, 300), (300,)), 4) == 2  # 300 = 4 x 75
    assert streamable_levels(((1,), (301, 5), (512,)), 4) == 0


def test_pool2_means_valid_values_and_takes_the_most_frequent_class():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    x[0, 0, 0] = np.nan
    x[0, 2:, 2:] = np.nan
    out = pool2(x, False, np.nan)
    np.testing.assert_allclose(out[0, 0, 0], (1 + 4 + 5) / 3)
    np.testing.assert_allclose(out[0, 1, 0], (8 + 9 + 12 + 13) / 4)
    assert np.isnan(out[0, 1, 1])
    odd = pool2(np.ones((1, 3, 5), np.float32), False, np.nan)  # odd edges: only the real pixels count
    assert odd.shape == (1, 2, 3) and np.all(odd == 1)
    c = np.array([[[1, 2, 3, 3], [2, 2, 3, 255], [255, 255, 7, 8], [255, 4, 9, 10]]], np.uint8)
    np.testing.assert_array_equal(pool2(c, True, 255)[0], [[2, 3], [4, 7]])  # ties: first in reading order
    assert pool2(np.full((1, 2, 2), 255, np.uint8), True, 255)[0, 0, 0] == 255


@pytest.mark.parametrize("chunks", [448, 300, 301])
def test_streamed_overviews_equal_gdal_average_and_make_valid_cogs(tmp_path, chunks):
    """The COG's overviews are the streamed ones (whatever the blocks) and agree with GDAL's."""
    import dask.array as da

    h, w = 1500, 1300
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    heights = (10 + 5 * np.sin(xx / 40.0) * np.cos(yy / 55.0) + rng.random((h, w))).astype(np.float32)
    heights[:200, :300] = np.nan  # nodata corner
    codes = np.array(WORLDCOVER.codes, np.uint8)
    classes = codes[(np.floor(xx / 97 + yy / 131) % 7).astype(int)]
    classes[:200, :300] = 0
    grid = Grid(rasterio.crs.CRS.from_epsg(32737), from_origin(500000, 9000000, 1.0, 1.0), w, h)
    outs = [RasterOutput(tmp_path / "h.tif", to_dataarray(da.from_array(heights[None], chunks=(1, chunks, chunks)),
                                                          grid), dtype="float32", nodata=float("nan"), grid=grid),
            RasterOutput(tmp_path / "c.tif", xr.DataArray(da.from_array(classes[None], chunks=(1, chunks, chunks)),
                                                          dims=("band", "y", "x")), dtype="uint8", nodata=0, grid=grid,
                         classes=WORLDCOVER, overview_resampling="mode")]
    write_rasters(outs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "h.tif"]  # no level files left
    ref = tmp_path / "ref"
    ref.mkdir()
    with rasterio.open(tmp_path / "h.tif") as src:
        assert cog_validate(str(tmp_path / "h.tif"))[0] and src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(1), heights)
        level1 = src.read(1, out_shape=(750, 650))
    # GDAL's AVERAGE overview of the same pixels
    plain = ref / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=w, height=h, count=1, dtype="float32", nodata=float("nan"),
                       crs=grid.crs, transform=grid.transform, tiled=True) as dst:
        dst.write(heights, 1)
    rio_copy(str(plain), str(ref / "gdal.tif"), driver="COG", OVERVIEW_RESAMPLING="AVERAGE")
    with rasterio.open(ref / "gdal.tif") as g:
        gdal_level1 = g.read(1, out_shape=(750, 650))
    np.testing.assert_allclose(level1, gdal_level1, rtol=1e-5, atol=1e-5, equal_nan=True)
    with rasterio.open(tmp_path / "c.tif") as src:
        assert cog_validate(str(tmp_path / "c.tif"))[0] and src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(1), classes)
        assert src.colormap(1)[10] == WORLDCOVER.colormap()[10]
        np.testing.assert_array_equal(src.read(1, out_shape=(750, 650)), pool2(classes[None], True, 0)[0])
        assert "class_names" in src.tags(1)
