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


def _pool2_before(block, classes, nodata):
    """pool2 as it was before its numpy work was cut down (commit 49dc3e5), the reference: the
    levels must stay the same bytes, NaN bits and signs of zero included. Verbatim but for the
    odd edges, padded here with np.pad (the same pixels)."""
    _, h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), constant_values=np.nan if not classes else nodata)
    a, b, cc, d = (block[:, i::2, j::2] for i in (0, 1) for j in (0, 1))
    if not classes:
        if not np.isnan(block).any():
            out = a + b
            out += cc
            out += d
            out *= 0.25
            return out.astype(block.dtype, copy=False)
        quarter = [a, b, cc, d]
        valid = [~np.isnan(x) for x in quarter]
        total = sum(np.where(v, x, 0).astype(np.float64) for x, v in zip(quarter, valid))
        count = sum(v.astype(np.uint8) for v in valid)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(block.dtype)
    quarter = [a, b, cc, d]
    ok = [(x != nodata).view(np.uint8) for x in quarter] if nodata is not None else None
    votes = [np.ones(a.shape, np.uint8) if ok is None else ok[i].copy() for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            same = (quarter[i] == quarter[j]).view(np.uint8)
            if ok is not None:
                same = same & ok[i] & ok[j]
            votes[i] += same
            votes[j] += same
    out, top = a.copy(), votes[0]
    for x, v in zip(quarter[1:], votes[1:]):
        better = v > top
        np.copyto(out, x, where=better)
        top = np.maximum(top, v)
    if nodata is not None:
        out[top == 0] = nodata
    return out


def _assert_same_bytes(block, classes, nodata):
    before = block.copy()
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf, sums past float32's range
        new, old = pool2(block, classes, nodata), _pool2_before(block, classes, nodata)
    np.testing.assert_array_equal(block, before)  # the input is left as it was
    assert new.dtype == old.dtype and new.shape == old.shape
    assert new.tobytes() == old.tobytes(), np.argwhere(new.view(np.uint8) != old.view(np.uint8))[:5]


def _quads(values):
    """Every 2x2 quad over ``values`` (all patterns of equality and nodata), side by side."""
    combos = np.array(np.meshgrid(*[values] * 4, indexing="ij")).reshape(4, -1)
    block = np.empty((1, 2, 2 * combos.shape[1]), combos.dtype)
    block[0, 0, 0::2], block[0, 0, 1::2], block[0, 1, 0::2], block[0, 1, 1::2] = combos
    return block


@pytest.mark.parametrize("nodata", [0, 255, None])
def test_pool2_classes_are_the_same_bytes_as_before_on_every_pattern(nodata):
    codes = np.array([10, 20, 30, 40], np.uint8)
    for values in ([nodata, *codes] if nodata is not None else codes, codes):  # with nodata in it, then without
        _assert_same_bytes(_quads(np.array(values, np.uint8)), True, nodata)
    rng = np.random.default_rng(1)
    fill = 0 if nodata is None else nodata
    for shape in [(1, 448, 448), (2, 7, 9), (1, 1, 1), (1, 2, 2), (1, 3, 512), (3, 30, 31)]:
        few = np.array([10, 20, fill], np.uint8)[rng.integers(0, 3, shape)]  # many ties and nodata
        if nodata is None and (shape[1] % 2 or shape[2] % 2):
            continue  # odd edges are padded with nodata: there is none to pad with
        _assert_same_bytes(few, True, nodata)
        _assert_same_bytes(np.full(shape, fill, np.uint8), True, nodata)  # all nodata / all one code


def test_pool2_means_are_the_same_bytes_as_before():
    rng = np.random.default_rng(2)
    tiny, big = np.float32(2.0**-24), np.float32(3e38)
    specials = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1.0, tiny, -tiny, big, -big, 1e-45, 7.3], np.float32)
    for dtype in (np.float32, np.float64):
        for shape in [(1, 448, 448), (1, 512, 512), (2, 7, 9), (1, 1, 1), (1, 2, 2), (1, 3, 2), (3, 31, 30)]:
            x = rng.normal(10, 5, shape).astype(dtype)
            _assert_same_bytes(x, False, np.nan)  # no NaN (float32 sums), but odd edges pad NaN
            holes = x.copy()
            holes[:, : shape[1] // 3, : shape[2] // 2] = np.nan  # quads with no valid value
            holes[rng.random(shape) < 0.1] = np.nan
            _assert_same_bytes(holes, False, np.nan)
            _assert_same_bytes(specials[rng.integers(0, len(specials), shape)].astype(dtype), False, np.nan)
            _assert_same_bytes(np.full(shape, np.nan, dtype), False, np.nan)
            _assert_same_bytes(np.full(shape, -0.0, dtype), False, np.nan)  # -0.0 stays -0.0 without NaN
        # every pattern of NaN, signed zeros, infinities and values whose sums round apart
        _assert_same_bytes(_quads(np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1.0, tiny], dtype)), False, np.nan)
        no_nan = _quads(np.array([-0.0, 0.0, np.inf, -np.inf, 1.0, tiny, big], dtype))  # inf - inf: NaN, no NaN in
        _assert_same_bytes(no_nan, False, np.nan)


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
