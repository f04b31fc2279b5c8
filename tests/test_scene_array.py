"""run_scene on an in-memory rioxarray DataArray, lazy or not, gives what the file gives."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import rioxarray
import xarray as xr

import geodino
from geodino.errors import InputError
from geodino.scene import open_scene


def _run(scene, tiny_models):
    return geodino.run_scene(scene, backbone=tiny_models["backbone"], landcover_head=tiny_models["landcover"],
                             canopy_head=tiny_models["canopy"], window=128, overlap=32).compute()


def test_run_scene_takes_lazy_and_in_memory_dataarrays(small_scene, tiny_models):
    from_file = _run(small_scene.scene, tiny_models)
    lazy = rioxarray.open_rasterio(small_scene.scene, chunks={"x": 200, "y": 200})
    for arr in (lazy, lazy.compute()):
        ds = _run(arr, tiny_models)
        np.testing.assert_array_equal(ds.landcover.values, from_file.landcover.values)
        np.testing.assert_allclose(ds.canopy_height.values, from_file.canopy_height.values, atol=1e-5)
        assert ds.rio.crs == from_file.rio.crs and ds.rio.transform() == from_file.rio.transform()


def test_array_scene_keeps_nodata_band_names_and_pickles(small_scene):
    arr = rioxarray.open_rasterio(small_scene.scene)
    arr = arr.assign_coords(band=["blue", "green", "red", "nir"]).rio.write_nodata(0)
    arr[:, :10, :10] = 0
    scene = open_scene(arr, bands=["red", "green", "blue"])
    assert scene.bands == (3, 2, 1) and scene.band_names == ("red", "green", "blue")
    assert scene.nodata == 0
    from rasterio.windows import Window

    _, valid = scene.read(Window(0, 0, 20, 20))
    assert not valid[:10, :10].any() and valid[10:, 10:].all()
    assert pickle.loads(pickle.dumps(scene)) == scene
    assert open_scene(arr, bands=["red", "green", "blue"]).source == scene.source  # written once


def test_subset_and_2d_arrays(small_scene):
    arr = rioxarray.open_rasterio(small_scene.scene)
    part = arr.isel(x=slice(100, 300), y=slice(50, 250))
    scene = open_scene(part)
    assert scene.grid.transform == part.rio.transform() and scene.grid.shape == (200, 200)
    assert open_scene(arr.isel(band=0)).count == 1
    strided = open_scene(arr.isel(x=slice(0, None, 2), y=slice(0, None, 2)))
    # every other pixel: 1.2 m pixels centred on the kept 0.6 m pixels' centres
    assert strided.grid.res == pytest.approx((1.2, 1.2))
    assert strided.grid.transform.c == pytest.approx(arr.rio.transform().c - 0.3)


def test_bad_arrays_are_clear_errors():
    with pytest.raises(InputError, match="no CRS"):
        open_scene(xr.DataArray(np.zeros((3, 32, 32), np.uint8), dims=("band", "y", "x"),
                                coords={"y": np.arange(32.0), "x": np.arange(32.0)}))
    with pytest.raises(InputError, match="dimensions"):
        open_scene(xr.DataArray(np.zeros((3, 4, 32, 32), np.uint8), dims=("t", "band", "y", "x")))
    arr = xr.DataArray(np.zeros((3, 32, 32), bool), dims=("band", "y", "x"),
                       coords={"y": np.arange(32.0)[::-1], "x": np.arange(32.0)}).rio.write_crs("EPSG:32633")
    with pytest.raises(InputError, match="data type bool"):
        open_scene(arr)
