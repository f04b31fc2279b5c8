"""geodino.explore: the HTML map's layers, click values, size bound, and a headless-Chromium render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import geodino
from geodino.cli import main
from geodino.errors import InputError
from geodino.webmap import LEAFLET_DIRS, save_html
from tests import vizdata as vd


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return vd.write_outputs(tmp_path_factory.mktemp("outputs"))


def _grids(html: str) -> dict:
    text = re.search(r"var grids = (\[.*?\]);\n", html).group(1)
    return {g["name"]: g for g in json.loads(text)}


def _value_at(grid: dict, x: float, y: float):
    """The grid value at UTM 33N (x, y), looked up as the page's click handler does."""
    from rasterio.warp import transform

    (mx,), (my,) = transform("EPSG:32633", "EPSG:3857", [x], [y])
    west, south, east, north = grid["bounds"]
    col = int((mx - west) / (east - west) * grid["w"])
    row = int((north - my) / (north - south) * grid["h"])
    return grid["values"][row * grid["w"] + col]


LEFT = (vd.ORIGIN[0] + 200, vd.ORIGIN[1] - 320)
RIGHT = (vd.ORIGIN[0] + 700, vd.ORIGIN[1] - 320)
BOTTOM = (vd.ORIGIN[0] + 200, vd.ORIGIN[1] - 610)


def test_map_has_the_layers_legends_and_click_values(outputs):
    m = geodino.explore(outputs, basemap=False)
    html = m.get_root().render()
    for name in ("scene", "canopy height", "land cover"):
        assert f'"{name}"' in html or f"'{name}'" in html
    assert "L.control.layers" in html and "geodino-legend" in html and "Tree cover" in html
    grids = _grids(html)
    lc, chm = grids["land cover"], grids["canopy height"]
    assert _value_at(lc, *LEFT) == 10 and _value_at(lc, *RIGHT) == 50
    assert lc["labels"]["10"] == "Tree cover"
    assert _value_at(chm, *LEFT) == 200 and chm["scale"] == 0.1  # 20.0 m
    assert _value_at(chm, *RIGHT) == 0  # a valid 0 m is a value
    assert _value_at(chm, *BOTTOM) is None  # nodata
    assert "tile.openstreetmap.org" not in html


def test_basemap_is_a_layer_only_when_asked(outputs):
    assert "tile.openstreetmap.org" in geodino.explore(outputs, basemap=True).get_root().render()


def test_polygons_and_other_rasters_become_layers(outputs, tmp_path):
    import geopandas as gpd
    import shapely

    from geodino.analysis import cluster
    from tests.test_analysis import _embeddings

    folder = tmp_path / "run"
    shutil.copytree(outputs, folder)
    gpd.GeoDataFrame({"class_code": [10], "class_name": ["Tree cover"], "area_m2": [1e4]},
                     geometry=[shapely.box(vd.ORIGIN[0], vd.ORIGIN[1] - 100, vd.ORIGIN[0] + 100, vd.ORIGIN[1])],
                     crs="EPSG:32633").to_file(folder / "landcover.gpkg", layer="landcover")
    cluster(_embeddings(), 3, out=folder)  # another CRS and grid: warped like the rest
    html = geodino.explore(folder, basemap=False).get_root().render()
    assert "land-cover polygons" in html and '"clusters"' in html and "cluster 3" in html
    assert "cluster 1" in _grids(html)["clusters"]["labels"].values()


def test_html_size_is_bounded_for_big_scenes(tmp_path):
    import dask.array as da
    import xarray as xr
    from affine import Affine

    from geodino.classes import WORLDCOVER
    from geodino.export import RasterOutput, write_rasters
    from geodino.scene import Grid

    n = 2048
    rng = np.random.default_rng(0)
    codes = da.from_array(rng.choice(WORLDCOVER.codes, size=(1, n, n)).astype(np.uint8), chunks=(1, 512, 512))
    grid = Grid(vd.CRS32633, Affine(1.0, 0, 500000.0, 0, -1.0, 4000000.0), n, n)
    write_rasters([RasterOutput(tmp_path / "landcover.tif", xr.DataArray(codes, dims=("band", "y", "x")),
                                dtype="uint8", nodata=0, classes=WORLDCOVER, overview_resampling="mode", grid=grid)])
    small = save_html(tmp_path, tmp_path / "small.html", max_size=256, value_size=64, basemap=False)
    large = save_html(tmp_path, tmp_path / "large.html", max_size=512, value_size=128, basemap=False)
    # random classes are the worst case for PNG: still a bounded, decimated page
    assert small.stat().st_size < 1_000_000 and small.stat().st_size < large.stat().st_size < 2_500_000


def test_cli_explore_and_its_errors(outputs, tmp_path, capsys):
    html = tmp_path / "map.html"
    assert main(["explore", str(outputs), "--html", str(html), "--no-basemap"]) == 0
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert main(["explore", str(outputs), "--html", str(html)]) == 2  # exists: --overwrite to replace
    assert main(["explore", str(tmp_path / "nothing"), "--html", str(tmp_path / "x.html")]) == 2
    assert "not an output folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nothing to show"):
        geodino.explore(tmp_path / "empty")


def test_dataset_from_run_scene_is_explorable():
    html = geodino.explore(vd.dataset(), basemap=False).get_root().render()
    assert _value_at(_grids(html)["land cover"], *RIGHT) == 50


# --------------------------------------------------------------------------------------
# headless Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _local_leaflet() -> bool:
    return any((d / "leaflet.js").exists() for d in LEAFLET_DIRS)


def test_map_renders_offline_in_headless_chromium_with_the_class_colours(outputs, tmp_path):
    from PIL import Image

    browser = _chromium()
    if browser is None or not _local_leaflet():
        pytest.skip("needs Debian's chromium and libjs-leaflet (.ci/run installs them where it can)")
    html = save_html(outputs, tmp_path / "map.html", basemap=False)
    assert "cdn.jsdelivr" not in html.read_text()  # Leaflet is embedded: nothing to fetch
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=800,600", "--virtual-time-budget=4000", "--hide-scrollbars", f"--screenshot={shot}",
           html.as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    cy, cx = image.shape[0] // 2, image.shape[1] // 2
    # the map fits the scene's bounds, centred: left half Tree cover, right half Built-up
    assert np.abs(image[cy, cx - 80] - (0, 100, 0)).max() <= 2
    assert np.abs(image[cy, cx + 80] - (250, 0, 0)).max() <= 2
    # the legend is drawn, and the land-cover layer sits over the scene (no red-channel scene pixels showing)
    assert (np.abs(image - (0, 100, 0)).max(-1) <= 2).sum() > 5000
