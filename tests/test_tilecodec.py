"""COG tiles encoded by geodino (geodino.tilecodec) and laid out by geodino.cog, read by GDAL."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401 - the .rio accessor of the outputs
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

import geodino.tilecodec as tilecodec
from geodino.cog import LayoutError, assemble_cog
from geodino.export import write_rasters
from geodino.tilecodec import TileStore, encode_tile
from tests.test_cog import _output


def _sparse(path, height, width, dtype, predictor, nodata):
    """A GeoTIFF holding only the structure of a tiled DEFLATE image (no tile written)."""
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype=dtype,
                       crs="EPSG:32633", transform=from_origin(5e5, 5e6, 0.6, 0.6), nodata=nodata, tiled=True,
                       blockxsize=512, blockysize=512, compress="DEFLATE", predictor=predictor, SPARSE_OK=True):
        pass
    return path


def _map(dtype, shape, rng):
    if dtype.startswith("float"):
        data = (np.sin(np.arange(shape[0])[:, None] / 40) * 9 + rng.normal(12, 2, shape)).astype(dtype)
        data[:70, :90] = np.nan
        data[500, :] = -0.0
        data[501, 3] = np.inf
        return data
    info = np.iinfo(dtype)
    data = rng.integers(0, 9, shape).astype(dtype)
    data[:, 600:620] = info.max  # long runs and the type's extremes
    data[10] = info.min
    return data


@pytest.mark.parametrize("dtype, predictor", [("float32", 3), ("float64", 3), ("uint8", 1), ("uint8", 2),
                                              ("uint16", 2), ("int16", 2), ("int32", 1)])
def test_tiles_encoded_here_read_back_by_gdal_bit_for_bit(tmp_path, dtype, predictor):
    rng = np.random.default_rng(5)
    height, width = 1100, 1300  # edge tiles on both axes
    data = _map(dtype, (height, width), rng)
    nodata = float("nan") if dtype.startswith("float") else 0
    structure = _sparse(tmp_path / "s.tif", height, width, dtype, predictor, nodata)
    store = TileStore(tmp_path / "s.tiles", height, width, 512, dtype, predictor=predictor, level=1, fill=nodata)
    for top in reversed(range(0, height, 512)):  # rows in any order
        store.write_row(data[None, top:top + 512], top)
    store.close()
    cog = assemble_cog(structure, [], tmp_path / "cog.tif", tiles=[store])
    assert cog_validate(cog)[0]
    with rasterio.open(cog) as src:
        assert src.profile["compress"] == "deflate"
        assert src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR", "1") == str(predictor)
        np.testing.assert_array_equal(src.read(1), data)


def test_without_isal_the_standard_zlib_gives_the_same_pixels(tmp_path, monkeypatch):
    data = _map("float32", (512, 700), np.random.default_rng(1))
    monkeypatch.setattr(tilecodec, "_deflate", zlib)
    monkeypatch.setattr(tilecodec, "_level", lambda level: level)
    tile = np.ascontiguousarray(data[:, :512])
    assert zlib.decompress(encode_tile(tile, 1, 6)) == tile.tobytes()
    structure = _sparse(tmp_path / "s.tif", 512, 700, "float32", 3, float("nan"))
    store = TileStore(tmp_path / "s.tiles", 512, 700, 512, "float32", predictor=3, level=1, fill=float("nan"))
    store.write_row(data[None], 0)
    store.close()
    with rasterio.open(assemble_cog(structure, [], tmp_path / "cog.tif", tiles=[store])) as src:
        np.testing.assert_array_equal(src.read(1), data)


def test_rows_of_tiles_must_be_whole_and_tags_must_match(tmp_path):
    store = TileStore(tmp_path / "a.tiles", 1024, 600, 512, "uint8", predictor=1, level=1)
    with pytest.raises(ValueError, match="multiple of 512"):
        store.write_row(np.zeros((1, 512, 600), np.uint8), 100)
    with pytest.raises(ValueError, match="width 600"):
        store.write_row(np.zeros((1, 512, 599), np.uint8), 0)
    with pytest.raises(ValueError, match="predictor 4"):
        encode_tile(np.zeros((4, 4), np.uint8), 4, 1)
    store.write_row(np.zeros((1, 512, 600), np.uint8), 0)
    store.close()
    # tags that say predictor 2 cannot describe tiles encoded without a predictor
    structure = _sparse(tmp_path / "s.tif", 1024, 600, "uint8", 2, 0)
    with pytest.raises(LayoutError, match="do not describe"):
        assemble_cog(structure, [], tmp_path / "cog.tif", tiles=[store])
    store.remove()
    assert not (tmp_path / "a.tiles").exists()


def test_a_run_encodes_single_band_tiles_here_and_leaves_no_tile_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    heights = rng.gamma(2, 5, (1, 1100, 1300)).astype("float32")
    heights[0, :300, :200] = np.nan
    bands = rng.normal(0, 1, (3, 1100, 1300)).astype("float32")
    encoded = []
    real = tilecodec.encode_tile

    def spy(tile, predictor, level):
        encoded.append(tile.shape)
        return real(tile, predictor, level)

    monkeypatch.setattr(tilecodec, "encode_tile", spy)
    paths = write_rasters([_output(tmp_path, "h.tif", heights, "float32", nodata=float("nan")),
                           _output(tmp_path, "e.tif", bands, "float32", nodata=float("nan"))])
    # the single band here (3 x 3 tiles at full resolution, 2 x 2 + 1 at its two levels); the
    # three bands by GDAL, which interleaves them by pixel
    assert len(encoded) == 9 + 4 + 1 and set(encoded) == {(512, 512)}
    for path, data in zip(paths, (heights, bands)):
        assert cog_validate(path)[0]
        with rasterio.open(path) as src:
            np.testing.assert_array_equal(src.read(), data)
            assert src.overviews(1) == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.tif", "h.tif"]


def test_a_layout_failure_with_tiles_encoded_here_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """Their GeoTIFF holds no tiles: handing it to GDAL's COG driver would write an empty map."""
    import geodino.cog

    def broken(*args, **kwargs):
        raise LayoutError("a bug")

    monkeypatch.setattr(geodino.cog, "assemble_cog", broken)
    data = np.ones((1, 600, 600), np.float32)
    with pytest.raises(LayoutError, match="a bug"):
        write_rasters([_output(tmp_path, "h.tif", data, "float32", nodata=float("nan"))])
    assert list(tmp_path.iterdir()) == []
