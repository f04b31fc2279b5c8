"""COG assembly by moving compressed tiles (geodino.cog) and whole rows of tiles (geodino.tilerows)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.shutil import copy as rio_copy
from rasterio.transform import from_origin
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from geodino import cogcodec
from geodino.cog import LayoutError, assemble_cog
from geodino.export import RasterOutput, write_rasters
from geodino.tilerows import TileRows

CMAP = {0: (0, 100, 0, 255), 1: (250, 0, 0, 255), 2: (0, 0, 200, 255)}


def _profile(n, dtype="float32", count=1, **kw):
    base = dict(driver="GTiff", width=n, height=n, count=count, dtype=dtype, crs="EPSG:32633",
                transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                compress="DEFLATE", predictor=3 if dtype.startswith("float") else 1,
                nodata=float("nan") if dtype.startswith("float") else 255)
    return base | kw


def _pyramid_files(tmp_path, data, profile, name, levels, colormap=None):
    """Full resolution and ``levels`` 2x-decimated overview files, written by GDAL."""
    paths = []
    for k in range(levels + 1):
        arr = data[:, :: 2**k, :: 2**k]
        path = tmp_path / f"{name}{k}.tif"
        with rasterio.open(path, "w", **(profile | dict(height=arr.shape[1], width=arr.shape[2]))) as dst:
            dst.write(arr)
            if k == 0:
                dst.set_band_description(1, "canopy height")
                dst.update_tags(provenance="test")
                dst.update_tags(1, units="m")
            if colormap:
                dst.write_colormap(1, colormap)
        paths.append(path)
    return paths[0], paths[1:]


@pytest.mark.parametrize("big", [False, True])
def test_assembled_cog_has_the_same_pixels_tags_and_overviews(tmp_path, monkeypatch, big):
    import geodino.cog

    if big:
        monkeypatch.setattr(geodino.cog, "_CLASSIC_LIMIT", 0)  # force BigTIFF
    rng = np.random.default_rng(0)
    data = rng.normal(10, 3, (1, 1300, 1300)).astype("float32")
    data[0, :200, :300] = np.nan
    full, levels = _pyramid_files(tmp_path, data, _profile(1300), "f", 2)
    cog = assemble_cog(full, levels, tmp_path / "cog.tif")
    assert cog_validate(cog) == (True, [], [])
    assert open(cog, "rb").read(4) == (b"II+\x00" if big else b"II*\x00")
    with rasterio.open(cog) as got, rasterio.open(full) as ref:
        assert got.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert (got.crs, got.transform, got.block_shapes) == (ref.crs, ref.transform, [(512, 512)])
        assert got.descriptions == ("canopy height",) and got.tags()["provenance"] == "test"
        assert got.tags(1)["units"] == "m" and np.isnan(got.nodata)
        np.testing.assert_array_equal(got.read(), data)
        assert got.overviews(1) == [2, 4]
        for k, level in enumerate(levels, start=1):
            shape = (-(-got.height // 2**k), -(-got.width // 2**k))
            with rasterio.open(level) as lv:
                assert lv.shape == shape
                np.testing.assert_array_equal(got.read(1, out_shape=shape), lv.read(1))


def test_classes_multiband_and_sparse_tiles(tmp_path):
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, (1, 1100, 1100)).astype("uint8")
    full, levels = _pyramid_files(tmp_path, classes, _profile(1100, "uint8"), "c", 2, colormap=CMAP)
    cog = assemble_cog(full, levels, tmp_path / "classes.tif")
    with rasterio.open(cog) as got:
        assert got.colormap(1)[1] == CMAP[1] and got.nodata == 255
        np.testing.assert_array_equal(got.read(), classes)
    # three bands interleaved by pixel, and tiles GDAL never wrote (sparse): offset 0, read as nodata
    bands = rng.normal(size=(3, 1100, 1100)).astype("float32")
    prof = _profile(1100, count=3, SPARSE_OK=True, interleave="pixel")
    full, levels = _pyramid_files(tmp_path, bands, prof, "m", 1)
    sparse = tmp_path / "sparse.tif"
    with rasterio.open(sparse, "w", **prof) as dst:
        # written from row 512: the first row of tiles stays empty
        dst.write(bands[:, 512:, :], window=Window(0, 512, 1100, 588))
    expected = bands.copy()
    expected[:, :512] = np.nan
    with rasterio.open(levels[0], "r+") as lv:
        half = lv.read()
        half[:, :256] = np.nan
        lv.write(half)
    cog = assemble_cog(sparse, levels, tmp_path / "sparse_cog.tif")
    assert cog_validate(cog)[0]
    with rasterio.open(cog) as got:
        assert got.count == 3
        np.testing.assert_array_equal(got.read(), expected)


def test_sources_that_do_not_fit_together_are_refused(tmp_path):
    data = np.ones((1, 1100, 1100), "float32")
    full, levels = _pyramid_files(tmp_path, data, _profile(1100), "a", 1)
    other = tmp_path / "zstd.tif"
    with rasterio.open(other, "w", **_profile(550, compress="ZSTD")) as dst:
        dst.write(data[:, ::2, ::2])
    with pytest.raises(LayoutError, match="codec"):
        assemble_cog(full, [other], tmp_path / "x.tif")
    striped = tmp_path / "striped.tif"
    with rasterio.open(striped, "w", **_profile(1100, tiled=False)) as dst:
        dst.write(data)
    with pytest.raises(LayoutError, match="not tiled"):
        assemble_cog(striped, [], tmp_path / "y.tif")


def test_tile_rows_complete_tiles_from_blocks_in_any_order(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(2, 1000, 900)).astype("float32")
    blocks = [(slice(r, min(r + 448, 1000)), slice(c, min(c + 448, 900)))
              for r in range(0, 1000, 448) for c in range(0, 900, 448)]
    order = rng.permutation(len(blocks))
    path = tmp_path / "rows.tif"
    with rasterio.open(path, "w", **_profile(900, count=2, height=1000)) as dst:
        rows = TileRows(dst)
        for i in order:
            r, c = blocks[i]
            rows.write(data[:, r, c], r, c)
        rows.close()
    with rasterio.open(path) as got:
        np.testing.assert_array_equal(got.read(), data)
    with rasterio.open(tmp_path / "short.tif", "w", **_profile(900, height=1000)) as dst:
        rows = TileRows(dst)
        rows.write(data[:1, :448, :448], slice(0, 448), slice(0, 448))
        with pytest.raises(RuntimeError, match="never completed"):
            rows.close()
    assert TileRows.buffer_bytes(1, 16384, "float32", 512) == 2 * 512 * 16384 * 4


def test_tile_rows_hold_about_one_row_of_tiles_while_blocks_arrive_row_by_row(tmp_path):
    """Each tile is handed over once whole, not each row of tiles: blocks 448 rows tall make
    a row of them touch two rows of 512 tiles, and whole rows held both (twice what this
    allows: 8 tiles across the 4096 px below, of 1 MB each)."""
    import tracemalloc

    data = np.random.default_rng(3).normal(size=(1, 1500, 4096)).astype("float32")
    tile_bytes = 512 * 512 * 4
    with rasterio.open(tmp_path / "rows.tif", "w", **_profile(4096, height=1500)) as dst:
        rows = TileRows(dst)
        tracemalloc.start()
        try:
            for r in range(0, 1500, 448):
                for c in range(0, 4096, 448):
                    rs, cs = slice(r, min(r + 448, 1500)), slice(c, min(c + 448, 4096))
                    rows.write(data[:, rs, cs], rs, cs)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        rows.close()
    assert peak <= (8 + 2) * tile_bytes + 2**18, peak / tile_bytes  # a row of 8 tiles and the two under a block
    with rasterio.open(tmp_path / "rows.tif") as got:
        np.testing.assert_array_equal(got.read(), data)


def _output(tmp_path, name, data, dtype, **kw):
    arr = xr.DataArray(data, dims=("band", "y", "x")).chunk({"band": -1, "y": 448, "x": 448})
    arr = arr.rio.write_crs("EPSG:32633").rio.write_transform(from_origin(500000, 4000000, 0.5, 0.5))
    return RasterOutput(tmp_path / name, arr, dtype=dtype, **kw)


def test_write_rasters_moves_tiles_and_matches_gdals_cog_driver(tmp_path, monkeypatch):
    """The direct path (tiles encoded once, then moved) gives the pixels, overviews and tags of
    the staged path (an intermediate file that GDAL's COG driver re-encodes)."""
    import rioxarray  # noqa: F401

    rng = np.random.default_rng(3)
    heights = rng.gamma(2, 5, (1, 1200, 1100)).astype("float32")
    heights[0, 100:300, 50:700] = np.nan
    classes = rng.integers(1, 4, (1, 1200, 1100)).astype("uint8")
    classes[0, 600:700] = 0  # nodata
    from geodino.classes import ClassTable, LandCoverClass

    table = ClassTable((LandCoverClass(1, "Tree cover", CMAP[0][:3]), LandCoverClass(2, "Built-up", CMAP[1][:3]),
                        LandCoverClass(3, "Water", CMAP[2][:3])))
    moved = []
    real = cogcodec.writes_direct

    def spy(shape, dtype, compress):
        moved.append(real(shape, dtype, compress))
        return moved[-1]

    monkeypatch.setattr(cogcodec, "writes_direct", spy)

    def outputs(folder):
        return [_output(folder, "canopy_height.tif", heights, "float32", nodata=float("nan"), units="m",
                        descriptions=["canopy height"], tags={"geodino": "test"}),
                _output(folder, "landcover.tif", classes, "uint8", nodata=0, classes=table,
                        overview_resampling="mode")]

    direct = write_rasters(outputs(tmp_path / "direct"))
    assert moved == [True, True]
    monkeypatch.setattr(cogcodec, "DIRECT_BUFFER_LIMIT", 0)
    staged = write_rasters(outputs(tmp_path / "staged"))
    assert moved[2:] == [False, False]
    for a, b in zip(direct, staged):
        assert cog_validate(a) == (True, [], [])
        with rasterio.open(a) as got, rasterio.open(b) as ref:
            assert got.tags(ns="IMAGE_STRUCTURE") == ref.tags(ns="IMAGE_STRUCTURE")
            assert (got.tags(), got.tags(1), got.descriptions) == (ref.tags(), ref.tags(1), ref.descriptions)
            assert got.overviews(1) == ref.overviews(1) == [2, 4]
            np.testing.assert_array_equal(got.read(), ref.read())
            for f in got.overviews(1):
                shape = (-(-got.height // f), -(-got.width // f))
                np.testing.assert_array_equal(got.read(1, out_shape=shape), ref.read(1, out_shape=shape))
            if got.dtypes[0] == "uint8":
                assert got.colormap(1)[1] == ref.colormap(1)[1]
    assert not list((tmp_path / "direct").glob(".*"))  # no intermediate left behind
