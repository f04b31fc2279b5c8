from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from geodino.errors import InputError
from geodino.scene import open_scene, require_valid_pixels
from tests.conftest import realdata
from tests.helpers import random_image, write_raster


def _whole(scene):
    return scene.read(Window(0, 0, scene.grid.width, scene.grid.height))


def test_single_file_grid_and_lazy_dataarray(small_scene):
    scene = open_scene(small_scene.scene)
    with rasterio.open(small_scene.scene) as src:
        assert scene.grid.transform == src.transform and scene.grid.crs == src.crs
        assert scene.grid.shape == (src.height, src.width)
        expected = src.read().astype(np.float32)
    assert scene.bands == (1, 2, 3, 4) and scene.band_names == ("blue", "green", "red", "nir")
    data, valid = _whole(scene)
    np.testing.assert_array_equal(data, expected)
    assert valid.all()
    da = scene.to_xarray(chunks=256)
    assert da.chunks is not None and da.shape == (4, 576, 640)
    assert da.rio.crs == scene.grid.crs
    np.testing.assert_array_equal(da[:, 10:20, 30:40].values, expected[:, 10:20, 30:40])


def test_window_reaching_past_the_edge_is_invalid_there(small_scene):
    scene = open_scene(small_scene.scene)
    data, valid = scene.read(Window(600, 560, 64, 32))
    assert valid[:16, :40].all() and not valid[16:].any() and not valid[:, 40:].any()
    assert (data[:, 16:] == 0).all()


def test_mosaic_of_two_halves_equals_the_whole(tmp_path):
    img = random_image(64, 96, 3, "uint16")
    t = from_origin(500000.0, 4000000.0, 10.0, 10.0)
    write_raster(tmp_path / "whole.tif", img, transform=t)
    write_raster(tmp_path / "left.tif", img[:, :, :48], transform=t)
    write_raster(tmp_path / "right.tif", img[:, :40, 48:], transform=t * rasterio.Affine.translation(48, 0))
    scene = open_scene([tmp_path / "left.tif", tmp_path / "right.tif"])
    assert scene.source.startswith("<VRTDataset")
    assert scene.grid.transform == t and scene.grid.shape == (64, 96)
    data, valid = _whole(scene)
    np.testing.assert_array_equal(data[:, :, :48], img[:, :, :48])
    np.testing.assert_array_equal(data[:, :40, 48:], img[:, :40, 48:])
    # the corner no file covers is not valid data
    assert valid[:, :48].all() and valid[:40, 48:].all() and not valid[40:, 48:].any()


def test_single_band_files_stack_as_bands(tmp_path):
    img = random_image(40, 50, 3, "uint16")
    paths = [write_raster(tmp_path / f"B0{i + 2}.tif", img[i], descriptions=[f"B0{i + 2}"]) for i in range(3)]
    scene = open_scene(paths, stack=True)
    assert scene.band_names == ("B02", "B03", "B04")
    np.testing.assert_array_equal(_whole(scene)[0], img)
    picked = open_scene(paths, stack=True, bands=["B04", "B03", "B02"])
    np.testing.assert_array_equal(_whole(picked)[0], img[::-1])


def test_mosaic_rejects_mixed_crs(tmp_path):
    a = write_raster(tmp_path / "a.tif", random_image(16, 16), crs="EPSG:32633")
    b = write_raster(tmp_path / "b.tif", random_image(16, 16), crs="EPSG:32634")
    with pytest.raises(InputError, match="CRS"):
        open_scene([a, b])


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_dtypes(tmp_path, dtype):
    img = random_image(32, 32, 3, dtype)
    scene = open_scene(write_raster(tmp_path / "x.tif", img))
    data, valid = _whole(scene)
    assert scene.dtype == dtype and data.dtype == np.float32
    np.testing.assert_allclose(data, img.astype(np.float32))
    assert valid.all()


def test_float_nan_is_invalid(tmp_path):
    img = random_image(32, 32, 3, "float32")
    img[1, 5, 7] = np.nan
    scene = open_scene(write_raster(tmp_path / "x.tif", img))
    data, valid = _whole(scene)
    assert not valid[5, 7] and valid.sum() == 32 * 32 - 1 and np.isfinite(data).all()


def test_nodata_alpha_and_internal_mask(tmp_path):
    img = random_image(32, 32, 3, "uint8")
    img[:, :, :4] = 0
    img[0, 10, 10] = 0  # one band at the nodata value is still valid data
    scene = open_scene(write_raster(tmp_path / "nd.tif", img, nodata=0))
    _, valid = _whole(scene)
    assert not valid[:, :4].any() and valid[:, 4:].all()

    alpha = np.full((1, 32, 32), 255, np.uint8)
    alpha[0, 20:] = 0
    path = write_raster(tmp_path / "alpha.tif", np.concatenate([img, alpha]), photometric="RGB", alpha="YES")
    scene = open_scene(path)
    assert scene.bands == (1, 2, 3)  # the alpha band is a mask, not data
    _, valid = _whole(scene)
    assert not valid[20:].any() and valid[:20].all()

    path = tmp_path / "mask.tif"
    write_raster(path, random_image(32, 32, 3, "uint8"))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "r+") as dst:
            m = np.full((32, 32), 255, np.uint8)
            m[:, 30:] = 0
            dst.write_mask(m)
    _, valid = _whole(open_scene(path))
    assert not valid[:, 30:].any() and valid[:, :30].all()


def test_band_selection_by_index_and_name(small_scene):
    scene = open_scene(small_scene.scene, bands=["red", "green", 1])
    assert scene.bands == (3, 2, 1)
    with pytest.raises(InputError, match="no band named 'swir'.*1: blue"):
        open_scene(small_scene.scene, bands=["swir"])
    with pytest.raises(InputError, match="band 9 does not exist.*4 bands"):
        open_scene(small_scene.scene, bands=[9])


def test_resample_to_target_gsd(small_scene):
    scene = open_scene(small_scene.scene, target_gsd=1.2)
    assert scene.warped and scene.grid.res == (1.2, 1.2)
    assert scene.grid.crs == scene.source_grid.crs
    assert abs(scene.grid.width - 320) <= 1 and abs(scene.grid.height - 288) <= 1
    # the grid is snapped outwards onto multiples of 1.2 m: its first row is half outside
    data, valid = scene.read(Window(0, 0, 64, 64))
    assert not valid[0].all() and valid[1:].all()
    # bilinear: values stay inside the source range
    assert 0 < data[:, 1:].min() and data.max() <= 10000


def test_geographic_scene_is_warped_to_utm(tmp_path):
    img = random_image(100, 120, 3, "uint8")
    t = from_origin(36.0, -3.0, 0.0001, 0.0001)  # near Kilimanjaro, ~11 m pixels
    scene = open_scene(write_raster(tmp_path / "geo.tif", img, crs="EPSG:4326", transform=t))
    assert scene.grid.crs.to_epsg() == 32737  # UTM 37S
    assert scene.warped
    data, valid = scene.read(Window(0, 0, scene.grid.width, scene.grid.height))
    assert valid.mean() > 0.8


def test_realdata_rgb_byte_rotated_footprint():
    path = realdata("RGB.byte.tif")
    scene = open_scene(path)
    _, valid = _whole(scene)
    with rasterio.open(path) as src:
        expected = src.dataset_mask() > 0
    np.testing.assert_array_equal(valid, expected)
    assert 0.66 < valid.mean() < 0.68
    # every border row mixes data and nodata
    assert not valid[0].all() and not valid[:, 0].all()


def test_realdata_osbs_nodata_255():
    scene = open_scene(realdata("OSBS_029.tif"))
    data, valid = _whole(scene)
    all_255 = (data == 255).all(axis=0)
    np.testing.assert_array_equal(valid, ~all_255)
    assert valid.mean() > 0.99


def test_realdata_landsat_stack_by_description():
    path = realdata("LE70220492002106EDC00_stack.gtif")
    scene = open_scene(path, bands=["band 3 reflectance", "band 2 reflectance", "band 1 reflectance"])
    assert scene.bands == (3, 2, 1) and scene.dtype == "int16"
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(_whole(scene)[0], src.read([3, 2, 1]).astype(np.float32))


# -- bad input -------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.tif: file not found"):
        open_scene(tmp_path / "nope.tif")


def test_not_a_raster(tmp_path):
    p = tmp_path / "notes.tif"
    p.write_text("hello")
    with pytest.raises(InputError, match="notes.tif: not a raster"):
        open_scene(p)


def test_no_crs_and_no_geotransform(tmp_path):
    img = random_image(16, 16)
    p = tmp_path / "nocrs.tif"
    write_raster(p, img, crs=None)
    with pytest.raises(InputError, match="nocrs.tif: has no CRS"):
        open_scene(p)
    p = tmp_path / "nogt.tif"
    with rasterio.open(p, "w", driver="GTiff", width=16, height=16, count=3, dtype="uint8", crs="EPSG:32633") as d:
        d.write(img)
    with pytest.raises(InputError, match="nogt.tif: has no geotransform"):
        open_scene(p)


def test_all_nodata_scene(tmp_path):
    p = write_raster(tmp_path / "empty.tif", np.zeros((3, 32, 32), np.uint8), nodata=0)
    with pytest.raises(InputError, match="empty.tif: every pixel is nodata"):
        require_valid_pixels(open_scene(p))


def test_a_scene_that_cannot_hold_nodata_is_not_read_to_check_it(tmp_path, monkeypatch):
    """Integer pixels with no nodata, mask or alpha are all valid: the check reads nothing
    (its decimated read decodes the whole scene before any window starts). A scene that can
    hold nodata is still read, and one that is all nodata is still refused."""
    from geodino.scene import Scene

    reads = []
    real = Scene._read
    monkeypatch.setattr(Scene, "_read", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    plain = write_raster(tmp_path / "plain.tif", random_image(64, 64))
    assert require_valid_pixels(open_scene(plain)) == 1.0 and not reads
    some = np.ones((3, 64, 64), np.uint8)
    some[:, :32] = 0
    half = write_raster(tmp_path / "half.tif", some, nodata=0)
    assert require_valid_pixels(open_scene(half)) == pytest.approx(0.5) and reads
    warped = open_scene(plain, target_gsd=2 * open_scene(plain).grid.transform.a)
    reads.clear()
    assert require_valid_pixels(warped) > 0 and reads  # a warped grid may reach past the file


def test_zero_size_scene(tmp_path):
    vrt = tmp_path / "zero.vrt"
    vrt.write_text('<VRTDataset rasterXSize="0" rasterYSize="0"><SRS>EPSG:32633</SRS>'
                   '<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>'
                   '<VRTRasterBand dataType="Byte" band="1"/></VRTDataset>')
    with pytest.raises(InputError, match="zero.vrt: (zero-size|not a raster)"):
        open_scene(vrt)


def _copy_as(src_path, dst_path, **layout):
    with rasterio.open(src_path) as src:
        profile = src.profile
        profile.update(layout)
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(src.read())
            dst.write_mask(src.dataset_mask())


@pytest.mark.parametrize("layout", [dict(tiled=True, blockxsize=128, blockysize=64),
                                    dict(tiled=False, blockysize=3)])
def test_overview_read_samples_every_fth_pixel_block_by_block(collar_scene, tmp_path, layout):
    path = tmp_path / "copy.tif"
    _copy_as(collar_scene.scene, path, **layout)
    scene = open_scene(path)
    data, valid = scene.read_overview(200)  # 800 x 700 -> every 4th pixel
    full, full_valid = _whole(scene)
    np.testing.assert_array_equal(data, full[:, 2::4, 2::4])
    np.testing.assert_array_equal(valid, full_valid[2::4, 2::4])
    assert 0.3 < valid.mean() < 0.95  # the collar is there


def test_read_into_a_buffer_and_bad_buffers(small_scene):
    scene = open_scene(small_scene.scene)
    window = rasterio.windows.Window(32, 16, 64, 48)
    ref, ref_valid = scene.read(window)
    buf = np.full((scene.count, 48, 64), 7.0, np.float32)
    out, valid = scene.read(window, out=buf)
    assert out is buf
    np.testing.assert_array_equal(buf, ref)
    np.testing.assert_array_equal(valid, ref_valid)
    # past the edge: the outside is zero in the buffer too
    edge = rasterio.windows.Window(scene.grid.width - 16, 0, 64, 48)
    buf = np.full((scene.count, 48, 64), 7.0, np.float32)
    scene.read(edge, out=buf)
    assert (buf[:, :, 16:] == 0).all() and (buf[:, :, :16] != 7).all()
    with pytest.raises(ValueError, match="float32"):
        scene.read(window, out=np.zeros((scene.count, 48, 64), np.float64))


def test_block_cache_covers_a_window_row_of_strips(tmp_path, small_scene):
    from rasterio.env import get_gdal_config, set_gdal_config

    from geodino.scene import _cache_max_bytes, ensure_block_cache

    tiled_path = tmp_path / "tiled.tif"
    _copy_as(small_scene.scene, tiled_path, tiled=True, blockxsize=64, blockysize=64)
    tiled = open_scene(tiled_path)
    striped_path = tmp_path / "striped.tif"
    _copy_as(small_scene.scene, striped_path, tiled=False, blockysize=8)
    striped = open_scene(striped_path)
    w, b = 640, 4 * 2  # width; 4 uint16 bands
    # tiles: the 3 x 4 tiles that two neighbouring 128-pixel windows can touch
    assert tiled.block_cache_bytes(128) == 3 * 64 * 4 * 64 * b
    # strips: every strip of a window's rows, the whole width
    assert striped.block_cache_bytes(128) == (128 // 8 + 1) * 8 * w * b
    before = get_gdal_config("GDAL_CACHEMAX")
    try:
        ensure_block_cache(_cache_max_bytes(before) + 2**20)
        assert _cache_max_bytes(get_gdal_config("GDAL_CACHEMAX")) == _cache_max_bytes(before) + 2**20
        ensure_block_cache(1)  # never lowered
        assert _cache_max_bytes(get_gdal_config("GDAL_CACHEMAX")) == _cache_max_bytes(before) + 2**20
    finally:
        set_gdal_config("GDAL_CACHEMAX", _cache_max_bytes(before))
    assert _cache_max_bytes("16") == 16 * 2**20 and _cache_max_bytes("5%") is None


def test_decimated_read_is_made_once_per_scene_and_stays_out_of_pickles(collar_scene, monkeypatch):
    import pickle

    from geodino.scene import Scene

    scene = open_scene(collar_scene.scene)
    reads = []  # every pixel read goes through Scene._read
    real = Scene._read
    monkeypatch.setattr(Scene, "_read", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    data, valid = scene.read_overview(200)
    assert reads
    n = len(reads)
    again, again_valid = scene.read_overview(200)
    assert len(reads) == n and again_valid is valid  # from the memo
    np.testing.assert_array_equal(again, data)
    assert again.dtype == np.float32 and again is not data  # values: a copy the caller may change
    assert not valid.flags.writeable  # shared: nobody may change it
    # a pickled scene (a dask task's argument) carries no pixels; its copy reads the same values
    blob = pickle.dumps(scene)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert clone == scene
    clone_data, clone_valid = clone.read_overview(200)
    assert len(reads) == 2 * n
    np.testing.assert_array_equal(clone_data, data)
    np.testing.assert_array_equal(clone_valid, valid)
