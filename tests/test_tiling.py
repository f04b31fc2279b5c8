from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from geodino.errors import ConfigError, InputError
from geodino.loader import iter_batches
from geodino.scene import open_scene
from geodino.sensor import FAMILY_STATS, PROFILES, prepare
from geodino.tiling import WindowSpec, blend_weights, read_tile, window_grid
from tests.conftest import realdata
from tests.helpers import random_image, write_raster


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), size_patches=st.integers(1, 40),
       overlap_patches=st.integers(0, 39))
def test_windows_cover_every_pixel_on_the_patch_grid(h, w, size_patches, overlap_patches):
    if overlap_patches >= size_patches:
        with pytest.raises(ConfigError):
            WindowSpec(size_patches * 16, overlap_patches * 16)
        return
    spec = WindowSpec(size_patches * 16, overlap_patches * 16)
    tiles = window_grid(h, w, spec)
    rows = sorted({t.row for t in tiles})
    cols = sorted({t.col for t in tiles})
    assert len(tiles) == len(rows) * len(cols)
    for starts, n in ((rows, h), (cols, w)):
        assert all(s % 16 == 0 for s in starts) and starts[0] == 0
        # consecutive windows overlap by at least `overlap` (no gap, every pixel covered)
        assert all(b - a <= spec.stride for a, b in zip(starts, starts[1:]))
        end = starts[-1] + spec.size
        assert end >= n
        # a window reaches past the edge only to the next patch boundary (or the scene is small)
        assert end - n < 16 or starts == [0]
    assert [t.index for t in tiles] == list(range(len(tiles)))


def test_window_spec_errors():
    with pytest.raises(ConfigError, match="multiple of 16"):
        WindowSpec(500, 64)
    with pytest.raises(ConfigError, match="multiple of 16"):
        WindowSpec(512, 60)
    with pytest.raises(ConfigError, match="smaller than the window"):
        WindowSpec(512, 512)


def test_blend_weights_taper_and_nodata():
    spec = WindowSpec(96, 32)
    tiles = window_grid(200, 200, spec)
    total = np.zeros((200 + 16, 200 + 16))
    for t in tiles:
        w = blend_weights(t, 200, 200, spec.overlap)
        assert w.min() > 0  # never exactly zero where a window covers
        total[t.row:t.row + t.size, t.col:t.col + t.size] += w
    assert total[:200, :200].min() > 0.3
    first = blend_weights(tiles[0], 200, 200, spec.overlap)
    assert first[0, 0] == 1.0  # scene border keeps full weight
    assert first[-1, -1] < 0.01 and first[40, 40] == 1.0
    valid = np.ones((96, 96), bool)
    valid[:10] = False
    w = blend_weights(tiles[0], 200, 200, spec.overlap, valid)
    assert (w[:10] == 0).all() and (w[10:] > 0).all()


def test_all_valid_windows_share_the_taper_and_its_coarse_form():
    from geodino.tiling import coarse_taper, coarsen_weights

    spec = WindowSpec(96, 32)
    tiles = window_grid(300, 300, spec)
    valid = np.ones((96, 96), bool)
    for t in tiles:
        taper = blend_weights(t, 300, 300, spec.overlap)
        shared = blend_weights(t, 300, 300, spec.overlap, valid)
        assert shared is taper and not shared.flags.writeable  # no copy, and nobody may change it
        np.testing.assert_array_equal(shared, taper * valid)
        coarse = coarse_taper(t, 300, 300, spec.overlap, 16)
        np.testing.assert_array_equal(coarse, coarsen_weights(taper * valid, 16))
        assert coarse.shape == (6, 6) and not coarse.flags.writeable
    assert coarse_taper(tiles[4], 300, 300, 32, 16) is coarse_taper(tiles[4], 300, 300, 32, 16)


def test_small_scene_is_one_reflect_padded_window(tmp_path):
    img = random_image(40, 50, 3, "uint8")
    scene, norm = prepare(open_scene(write_raster(tmp_path / "s.tif", img)), "rgb8", "web")
    tiles = window_grid(40, 50, WindowSpec(64, 16))
    assert len(tiles) == 1
    x, valid = read_tile(scene, norm, tiles[0])
    assert x.shape == (3, 64, 64) and valid.shape == (64, 64)
    assert valid[:40, :50].all() and not valid[40:].any() and not valid[:, 50:].any()
    # reflection: row 40 mirrors row 38
    np.testing.assert_array_equal(x[:, 40], x[:, 38])
    np.testing.assert_array_equal(x[:, :, 50], x[:, :, 48])


def test_normalisation_is_global(tmp_path):
    """A window's input depends only on its pixels, not on the rest of the scene."""
    img = random_image(256, 256, 3, "uint16")
    other = img.copy()
    other[:, :, 128:] = 9999  # change everything outside the first window
    a, b = (write_raster(tmp_path / f"{n}.tif", d) for n, d in (("a", img), ("b", other)))
    tile = window_grid(256, 256, WindowSpec(128, 0))[0]
    for profile in ("reflectance", "sentinel2-l2a", "landsat-c2-l2"):
        xa = read_tile(*prepare(open_scene(a), profile, "sat"), tile)[0]
        xb = read_tile(*prepare(open_scene(b), profile, "sat"), tile)[0]
        np.testing.assert_array_equal(xa, xb)
    # auto: percentiles are computed once per scene, so two windows with the same pixels get the
    # same input, whatever the other windows hold (no per-window stretch)
    twin = img.copy()
    twin[:, 128:, 128:] = img[:, :128, :128]
    twin[:, :128, 128:] = 1  # a very dark neighbour
    scene, norm = prepare(open_scene(write_raster(tmp_path / "t.tif", twin)), "auto", "sat")
    tiles = window_grid(256, 256, WindowSpec(128, 0))
    np.testing.assert_array_equal(read_tile(scene, norm, tiles[0])[0], read_tile(scene, norm, tiles[3])[0])


def test_profile_values(tmp_path):
    img = np.full((3, 16, 16), 255, np.uint8)
    img[:, :, :8] = 0
    scene, norm = prepare(open_scene(write_raster(tmp_path / "x.tif", img)), "rgb8", "web")
    x = norm(scene.read(Window(0, 0, 16, 16))[0])
    mean, std = FAMILY_STATS["web"]
    np.testing.assert_allclose(x[:, 0, 0], [(0 - m) / s for m, s in zip(mean, std)], rtol=1e-6)
    np.testing.assert_allclose(x[:, 0, 15], [(1 - m) / s for m, s in zip(mean, std)], rtol=1e-6)
    # Sentinel-2 L2A: DN 1000 is reflectance 0 (BOA offset), DN 4000 is 0.3 -> 1
    s2 = PROFILES["sentinel2-l2a"]
    assert (s2.lo, s2.hi) == (1000.0, 4000.0)
    # Landsat C2 L2: DN = (reflectance + 0.2) / 2.75e-5
    ls = PROFILES["landsat-c2-l2"]
    assert ls.lo * 2.75e-5 - 0.2 == pytest.approx(0.0) and ls.hi * 2.75e-5 - 0.2 == pytest.approx(0.3)


def test_profile_band_defaults(small_scene, tmp_path):
    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    assert scene.band_names == ("red", "green", "blue")
    assert norm.mean == FAMILY_STATS["sat"][0]
    stack = [write_raster(tmp_path / f"{b}.tif", random_image(32, 32, 1, "uint16"), descriptions=[b])
             for b in ("B02", "B03", "B04", "B08")]
    scene, _ = prepare(open_scene(stack, stack=True), "sentinel2-l2a", "sat")
    assert scene.band_names == ("B04", "B03", "B02")


def test_profile_mismatch_errors(small_scene, tmp_path):
    with pytest.raises(InputError, match="profile rgb8 expects uint8.*uint16"):
        prepare(open_scene(small_scene.scene), "rgb8", "sat")
    rgb = write_raster(tmp_path / "rgb.tif", random_image(32, 32, 3, "uint8"))
    with pytest.raises(InputError, match="naip needs at least 4 bands"):
        prepare(open_scene(rgb), "naip", "sat")
    with pytest.raises(InputError, match="unknown sensor profile 'modis'"):
        prepare(open_scene(rgb), "modis", "sat")
    with pytest.raises(InputError, match="3 bands, 2 selected"):
        prepare(open_scene(small_scene.scene), "reflectance", "sat", bands=[1, 2])


def test_realdata_landsat_stack_reflectance_profile():
    path = realdata("LE70220492002106EDC00_stack.gtif")
    scene, norm = prepare(open_scene(path), "reflectance", "sat",
                          bands=["band 3 reflectance", "band 2 reflectance", "band 1 reflectance"])
    assert scene.bands == (3, 2, 1)
    x, valid = read_tile(scene, norm, window_grid(250, 250, WindowSpec(256, 0))[0])
    assert valid[:250, :250].all() and np.isfinite(x).all()


def test_loader_batches_skip_empty_windows(collar_scene):
    scene, norm = prepare(open_scene(collar_scene.scene), "reflectance", "sat")
    tiles = window_grid(scene.grid.height, scene.grid.width, WindowSpec(48, 16))
    batches = list(iter_batches(scene, norm, tiles, batch_size=5, workers=2, prefetch=2))
    seen = [t for b in batches for t in b.tiles]
    # the collar's corners hold windows with no valid pixel at all
    assert 0 < len(seen) < len(tiles)
    assert [t.index for t in seen] == sorted(t.index for t in seen)
    assert all(len(b) == 5 for b in batches[:-1])
    for b in batches:
        assert b.inputs.shape == (len(b), 3, 48, 48) and b.inputs.dtype == np.float32
        assert b.valid.any(axis=(1, 2)).all()
    skipped = [t for t in tiles if t not in seen]
    for t in skipped:
        assert not read_tile(scene, norm, t)[1].any()
