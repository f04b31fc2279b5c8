"""Areas in m² whatever the CRS's linear unit (geodino.units), through the outputs that report them."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from geodino.export import polygonize
from geodino.units import metres_per_unit, pixel_area_m2
from tests.test_vectorize import CLASSES, class_map, regions, write

US_FOOT = 1200 / 3937  # metres in a US survey foot
STATE_PLANE = "EPSG:2263"  # NAD83 / New York Long Island, US survey feet


def test_metres_per_unit_and_pixel_area():
    assert metres_per_unit(CRS.from_string("EPSG:32633")) == 1.0
    assert metres_per_unit(CRS.from_string(STATE_PLANE)) == pytest.approx(US_FOOT, rel=1e-12)
    assert metres_per_unit(CRS.from_string("EPSG:27700")) == 1.0  # British National Grid: metres
    assert metres_per_unit(CRS.from_string("EPSG:4326")) is None and metres_per_unit(None) is None
    assert pixel_area_m2(CRS.from_string("EPSG:32633"), Affine(0.6, 0, 0, 0, -0.6, 0)) == pytest.approx(0.36)
    # 2 ft pixels: 0.3716 m², not 4
    assert pixel_area_m2(CRS.from_string(STATE_PLANE), Affine(2, 0, 0, 0, -2, 0)) == pytest.approx(4 * US_FOOT ** 2)
    assert pixel_area_m2(CRS.from_string("EPSG:4326"), Affine(1e-5, 0, 0, 0, -1e-5, 0)) is None


def test_polygon_areas_on_a_feet_grid_are_square_metres(tmp_path):
    data = class_map()
    raster = write(tmp_path / "lc.tif", data, crs=STATE_PLANE, transform=Affine(2, 0, 1_000_000, 0, -2, 200_000))
    gdf = gpd.read_file(polygonize(raster, tmp_path / "lc.gpkg", CLASSES))
    pixel = 4 * US_FOOT ** 2
    pixels = np.rint(gdf["area_m2"] / pixel).astype(int)
    np.testing.assert_allclose(gdf["area_m2"], pixels * pixel, rtol=1e-12)
    assert sorted(zip(gdf["class_code"].astype(int), pixels)) == regions(data, 255)


def test_run_report_areas_on_a_feet_grid_are_square_kilometres(tmp_path):
    """The sample scene relabelled onto a State Plane grid with 2 ft pixels: the report's areas
    are pixel counts times 0.37 m², not times 4."""
    import rasterio

    from geodino.pipeline import build_run, load_pipeline, write_scene
    from tests.conftest import REPO

    with rasterio.open(REPO / "data_samples" / "scene" / "scene.tif") as src:
        profile, pixels = src.profile, src.read()
    profile.update(crs=STATE_PLANE, transform=Affine(2, 0, 1_000_000, 0, -2, 200_000))
    scene = tmp_path / "feet.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    opts = load_pipeline(REPO / "pipelines" / "demo.yaml")
    opts.window, opts.overlap, opts.quicklook, opts.polygons = 128, 32, False, False
    report = write_scene(build_run(str(scene), opts), tmp_path / "out", quiet=True)
    pixel_km2 = 4 * US_FOOT ** 2 / 1e6
    assert report["footprint_area_km2"] == pytest.approx(profile["width"] * profile["height"] * pixel_km2, abs=1e-6)
    total = sum(report["landcover_area_km2"].values())
    assert 0 < total <= report["footprint_area_km2"] + 1e-9
    assert report["valid_area_km2"] == pytest.approx(total, abs=1e-5)
