"""Windows cut from cached whole tiles: the same values and validity as GDAL's own reads, each
tile decoded once across overlapping rows of windows, and the cases that read through GDAL."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geodino.scene import open_scene
from geodino.tiling import WindowSpec, window_grid
from tests.helpers import random_image, write_raster

H, W = 250, 300  # partial tiles on the right and bottom edges


def _gdal_only(path, **kw):
    """The same scene read through GDAL window by window (the tile path switched off)."""
    scene = open_scene(path, **kw)
    scene.__dict__["_tiles"] = None
    return scene


def _windows():
    wins = [t.window for t in window_grid(H, W, WindowSpec(96, 32))]
    # past the edges, and a window inside one tile
    return wins + [Window(-16, 200, 96, 96), Window(250, -8, 96, 64), Window(70, 70, 20, 10)]


def _case(tmp_path, kind):
    path = tmp_path / f"{kind}.tif"
    tiles = {"tiled": True, "blockxsize": 64, "blockysize": 32}
    if kind == "uint8":
        return write_raster(path, random_image(H, W, 3, "uint8"), **tiles), {}
    if kind == "uint16-nodata-band-interleaved":
        data = random_image(H, W, 3, "uint16", seed=1)
        data[:, 40:90, 100:180] = 0
        data[1, 10:20, 10:20] = 0  # one band only: still valid (any band valid)
        return write_raster(path, data, nodata=0, interleave="band", **tiles), {}
    if kind == "int16-band-subset":
        return write_raster(path, random_image(H, W, 4, "int16", seed=2), **tiles), {"bands": [3, 1]}
    if kind == "float32-nan-nodata":
        data = random_image(H, W, 3, "float32", seed=3)
        data[:, 100:140, 20:60] = -9999.0
        data[0, 200:210, 250:290] = np.nan
        return write_raster(path, data, nodata=-9999.0, **tiles), {}
    if kind == "uint8-internal-mask":
        write_raster(path, random_image(H, W, 3, "uint8", seed=4), **tiles)
        mask = np.full((H, W), 255, np.uint8)
        mask[:120, :70] = 0
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
            dst.write_mask(mask)
        return path, {}
    if kind == "uint8-alpha":
        data = random_image(H, W, 4, "uint8", seed=5)
        data[3] = 255
        data[3, 150:, 200:] = 0
        write_raster(path, data, photometric="RGB", alpha="YES", **tiles)
        return path, {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["uint8", "uint16-nodata-band-interleaved", "int16-band-subset",
                                  "float32-nan-nodata", "uint8-internal-mask", "uint8-alpha"])
def test_windows_from_tiles_equal_gdal_reads(tmp_path, kind):
    path, kw = _case(tmp_path, kind)
    scene, reference = open_scene(path, **kw), _gdal_only(path, **kw)
    invalid = 0
    for win in _windows():
        data, valid = scene.read(win)
        ref, ref_valid = reference.read(win)
        np.testing.assert_array_equal(data, ref, err_msg=str(win))
        np.testing.assert_array_equal(valid, ref_valid, err_msg=str(win))
        invalid += int((~valid).sum())
    reader = scene._tiled_reader(scene._dataset())
    assert reader is not None and reader.cache.loads > 0  # the tile path was taken
    assert invalid > 0  # the edges (and the file's own masks) are there to compare
    assert reader.all_valid == (kind in ("uint8", "int16-band-subset"))


def test_each_tile_is_decoded_once_across_rows_of_windows(tmp_path):
    path = write_raster(tmp_path / "s.tif", random_image(512, 384, 3, "uint8"), tiled=True, blockxsize=64,
                        blockysize=64)
    scene = open_scene(path)
    for tile in window_grid(512, 384, WindowSpec(96, 32)):  # rows of windows overlap by 32 px
        scene.read(tile.window)
    reader = scene._tiled_reader(scene._dataset())
    assert reader.cache.loads == (512 // 64) * (384 // 64)
    assert reader.cache._tiles  # kept for more windows ...
    scene.release_tiles()
    assert not reader.cache._tiles  # ... until the run has read them all
    np.testing.assert_array_equal(scene.read(Window(10, 20, 96, 96))[0], _gdal_only(path).read(Window(10, 20, 96, 96))[0])
    # a sweep (the decimated statistics read) keeps nothing it read for itself
    other = open_scene(path)
    other.read_overview(128)
    assert not other._tiled_reader(other._dataset()).cache._tiles


def test_tiles_keep_only_the_rows_later_windows_read(tmp_path):
    """Between rows of windows the cache held whole the row of tiles two rows of windows
    share (a row of tiles across the scene per date); now only its rows from the next row
    of windows' top, and each tile is still decoded once."""
    path = write_raster(tmp_path / "s.tif", random_image(512, 384, 3, "uint8"), tiled=True, blockxsize=64,
                        blockysize=64)
    scene, reference = open_scene(path), _gdal_only(path)
    windows = window_grid(512, 384, WindowSpec(96, 32))
    scene.expect_windows(96, [t.row for t in windows], [t.col for t in windows])
    reader = scene._tiled_reader(scene._dataset())
    tops = sorted({t.row for t in windows})
    for i, tile in enumerate(windows):
        data, valid = scene.read(tile.window)
        ref, ref_valid = reference.read(tile.window)
        np.testing.assert_array_equal(data, ref)
        np.testing.assert_array_equal(valid, ref_valid)
        if i + 1 < len(windows) and windows[i + 1].row != tile.row:  # a row of windows is done
            below = tops[tops.index(tile.row) + 1]
            held = {(tr * 64 + start) for (tr, _), (_, _, start) in reader.cache._tiles.items()}
            assert held and min(held) >= below, (tile.row, sorted(held))
    assert reader.cache.loads == (512 // 64) * (384 // 64)
    # windows of a row read in another order (batches side by side on threads): still once
    other = open_scene(path)
    other.expect_windows(96, [t.row for t in windows], [t.col for t in windows])
    for top in tops:
        for tile in sorted((t for t in windows if t.row == top), key=lambda t: -t.col):
            other.read(tile.window)
    assert other._tiled_reader(other._dataset()).cache.loads == (512 // 64) * (384 // 64)


def test_other_sources_read_through_gdal(tmp_path):
    f64 = write_raster(tmp_path / "f64.tif", random_image(64, 64, 3, "float64"))
    assert open_scene(f64)._tiled_reader(open_scene(f64)._dataset()) is None  # not exact in float32
    tiled = write_raster(tmp_path / "t.tif", random_image(64, 64, 3, "uint8"))
    warped = open_scene(tiled, target_gsd=5.0)
    assert warped._tiled_reader(warped._dataset()) is None
    mosaic = open_scene([tiled, write_raster(tmp_path / "u.tif", random_image(64, 64, 3, "uint8"),
                                             transform=rasterio.transform.from_origin(500640.0, 4000000.0, 10, 10))])
    assert mosaic._tiled_reader(mosaic._dataset()) is None
    strips = write_raster(tmp_path / "strips.tif", random_image(600, 80, 3, "uint8"), tiled=False, blockysize=2)
    scene = open_scene(strips)
    reader = scene._tiled_reader(scene._dataset())
    assert not reader.fits(96, 96)  # 49 strips a window: GDAL's read is cheaper
    ref = _gdal_only(strips)
    np.testing.assert_array_equal(scene.read(Window(0, 7, 80, 96))[0], ref.read(Window(0, 7, 80, 96))[0])


@pytest.mark.parametrize("kind", ["uint8", "uint16-nodata-band-interleaved", "int16-band-subset",
                                  "float32-nan-nodata", "uint8-internal-mask", "uint8-alpha"])
def test_the_decimated_read_is_gathered_as_windows_decode_the_tiles(tmp_path, monkeypatch, kind):
    """After a run's windows, the quicklook's decimated read decodes nothing again and equals
    the decimated read of a scene that made it from scratch."""
    import geodino.scene

    monkeypatch.setattr(geodino.scene, "OVERVIEW_SIZE", 64)  # 250 x 300 px: every 5th pixel
    path, kw = _case(tmp_path, kind)
    scene = open_scene(path, **kw)
    for win in _windows():
        scene.read(win)
    reader = scene._tiled_reader(scene._dataset())
    loads = reader.cache.loads
    assert reader.sample is not None and reader.sample.complete
    scene.release_tiles()
    data, valid = scene.read_overview(64)
    assert reader.cache.loads == loads  # no tile decoded again
    ref, ref_valid = open_scene(path, **kw)._read_overview(64)
    assert data.shape == ref.shape == (ref.shape[0], 50, 60)
    np.testing.assert_array_equal(data, ref)
    np.testing.assert_array_equal(valid, ref_valid)
    assert scene.read_overview(64)[0] is not data  # a new array each time, as before
    # a size the windows did not gather is read as before
    np.testing.assert_array_equal(scene.read_overview(32)[0], open_scene(path, **kw)._read_overview(32)[0])


def test_released_tiles_give_back_the_room_a_large_read_made(tmp_path):
    """A large read (e.g. a co-registration crop) makes room for its tiles; after the tiles are
    released, the next windows make room for their own size only, not the largest ever read."""
    path = write_raster(tmp_path / "s.tif", random_image(512, 640, 3, "uint8"), tiled=True, blockxsize=64,
                        blockysize=64)
    scene = open_scene(path)
    scene.read(Window(0, 0, 400, 400))
    reader = scene._tiled_reader(scene._dataset())
    large = reader.cache.capacity
    scene.release_tiles()
    scene.read(Window(0, 0, 96, 96))
    assert 0 < reader.cache.capacity < large


def test_unpickled_copies_of_a_scene_share_its_decoded_tiles(tmp_path):
    """dask.distributed unpickles each task on its own: the window batches of one worker
    still read through one Scene, each tile decoded once, as in a threaded run."""
    import pickle

    path = write_raster(tmp_path / "s.tif", random_image(512, 384, 3, "uint8"), tiled=True, blockxsize=64,
                        blockysize=64)
    blob = pickle.dumps(open_scene(path))
    copies = [pickle.loads(blob) for _ in range(3)]
    assert copies[0] is copies[1] is copies[2]
    grid = list(window_grid(512, 384, WindowSpec(96, 32)))
    for k, tile in enumerate(grid):  # windows read by whichever task got them
        copies[k % 3].read(tile.window)
    reader = copies[0]._tiled_reader(copies[0]._dataset())
    assert reader.cache.loads == (512 // 64) * (384 // 64)
    other = open_scene(write_raster(tmp_path / "t.tif", random_image(64, 64, 3, "uint8")))
    assert pickle.loads(pickle.dumps(other)) is not copies[0]
