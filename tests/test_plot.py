"""geodino.plot and the quicklook: the right colours at the right places, read back from the figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from geodino import plot
from geodino.classes import WORLDCOVER
from geodino.errors import InputError
from tests import vizdata as vd


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return vd.write_outputs(tmp_path_factory.mktemp("outputs"))


def _pixel(ax, x: float, y: float) -> np.ndarray:
    """The RGB the figure shows at map coordinates (x, y) in CRS metres."""
    fig = ax.figure
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())
    scale, _ = plot.map_units(EXTENT, vd.CRS32633)
    dx, dy = ax.transData.transform((x / scale, y / scale))
    return image[image.shape[0] - round(dy), round(dx), :3]



EXTENT = (vd.ORIGIN[0], vd.ORIGIN[0] + vd.W * vd.RES, vd.ORIGIN[1] - vd.H * vd.RES, vd.ORIGIN[1])
LEFT = (vd.ORIGIN[0] + 200, vd.ORIGIN[1] - 320)  # column 20, row 32
RIGHT = (vd.ORIGIN[0] + 700, vd.ORIGIN[1] - 320)  # column 70, row 32
CORNER = (vd.ORIGIN[0] + 900, vd.ORIGIN[1] - 60)  # column 90, row 6: nodata
BOTTOM = (vd.ORIGIN[0] + 200, vd.ORIGIN[1] - 610)  # column 20, row 61: no height


@pytest.mark.parametrize("kind", ["folder", "dataset", "tif"])
def test_landcover_draws_class_colours_with_names_outside_the_map(outputs, kind):
    source = {"folder": outputs, "dataset": vd.dataset(), "tif": outputs / "landcover.tif"}[kind]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    plot.landcover(source, ax=ax)
    assert tuple(_pixel(ax, *LEFT)) == (0, 100, 0)  # Tree cover
    assert tuple(_pixel(ax, *RIGHT)) == (250, 0, 0)  # Built-up
    assert tuple(_pixel(ax, *CORNER)) == (255, 255, 255)  # nodata: transparent on the white figure
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == WORLDCOVER.names
    colours = [tuple(np.round(np.array(h.get_facecolor()[:3]) * 255).astype(int)) for h in legend.legend_handles]
    assert colours == [c.color for c in WORLDCOVER.classes]
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # outside the map
    plt.close(fig)


def test_canopy_metres_colourbar_valid_zero_drawn_nodata_transparent(outputs):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    plot.canopy(outputs, ax=ax, vmax=20)
    viridis = matplotlib.colormaps["viridis"]
    assert np.abs(_pixel(ax, *LEFT).astype(int) - np.array(viridis(1.0)[:3]) * 255).max() <= 1  # 20 m
    assert np.abs(_pixel(ax, *RIGHT).astype(int) - np.array(viridis(0.0)[:3]) * 255).max() <= 1  # a valid 0 m
    assert tuple(_pixel(ax, *BOTTOM)) == (255, 255, 255)  # NaN: transparent
    colorbar_axes = [a for a in fig.axes if a is not ax]
    assert colorbar_axes and colorbar_axes[0].get_ylabel() == "canopy height (m)"
    plt.close(fig)


def test_scene_uses_the_runs_stretch_and_map_axes(outputs):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    plot.scene(outputs, ax=ax)
    # 2500 of 0..3000 -> 0.833 * 255 = 212
    assert tuple(_pixel(ax, *LEFT)) == (212, 0, 0)
    assert tuple(_pixel(ax, *RIGHT)) == (0, 0, 212)
    assert ax.get_xlabel() == "easting (m, EPSG:32633)" and ax.get_ylabel() == "northing (m)"
    assert len(ax.get_xticks()) <= 6
    plt.close(fig)


def test_map_axes_switch_to_km_for_large_extents():
    from rasterio.crs import CRS

    assert plot.map_units((0, 960, 0, 640), CRS.from_epsg(32633)) == (1.0, "m")
    assert plot.map_units((0, 5000, 0, 640), CRS.from_epsg(32633)) == (1000.0, "km")
    assert plot.map_units((0, 1, 0, 1), CRS.from_epsg(4326))[1] == "°"


def test_side_by_side_shares_map_axes_and_keeps_legend_off_the_maps(outputs):
    fig = plot.side_by_side(outputs)
    maps = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in maps] == ["scene", "canopy height", "land cover"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = maps[-1].get_legend().get_window_extent(renderer)
    for ax in maps:
        assert not legend.overlaps(ax.get_window_extent(renderer))
    assert maps[0].get_xlim() == maps[2].get_xlim()
    plt.close(fig)


def test_quicklook_is_written_whole(outputs, tmp_path):
    from PIL import Image

    from geodino.quicklook import quicklook

    png = quicklook(outputs, tmp_path / "q.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[1] > 2.5 * image.shape[0]  # three panels side by side
    # the class colours are there (legend and map)
    assert ((image == (0, 100, 0)).all(-1)).sum() > 100 and ((image == (250, 0, 0)).all(-1)).sum() > 100


def test_nothing_to_draw_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="land cover not found"):
        plot.landcover(tmp_path)
    with pytest.raises(InputError, match="nothing to draw"):
        plot.side_by_side(tmp_path)


def test_geodino_run_writes_quicklook_and_styles(tmp_path, tiny_models, small_scene):
    import json
    import sqlite3

    from PIL import Image

    from geodino.cli import main

    args = ["run", str(small_scene.scene), "--backbone", tiny_models["backbone"], "--canopy-head",
            tiny_models["canopy"], "--landcover-head", tiny_models["landcover"], "--window", "128",
            "--overlap", "32"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = tmp_path / "a"
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["quicklook"] == "quicklook.png" and report["scene_bands"] == [3, 2, 1]
    assert report["outputs"]["landcover_style"] == "landcover.qml"
    image = np.asarray(Image.open(out / "quicklook.png").convert("RGB"))
    assert image.shape[1] > 2.5 * image.shape[0]
    with sqlite3.connect(out / "landcover.gpkg") as con:
        assert con.execute("SELECT count(*) FROM layer_styles WHERE useAsDefault").fetchone() == (1,)
    assert main([*args, "--out", str(tmp_path / "b"), "--no-quicklook"]) == 0
    assert not (tmp_path / "b" / "quicklook.png").exists() and (tmp_path / "b" / "landcover.qml").exists()


def test_run_quicklook_draws_the_scene_without_decoding_it_again(tmp_path, tiny_models, small_scene, monkeypatch):
    from geodino.cli import main
    from geodino.scene import Scene

    reads = []  # every decimated whole-scene read goes through Scene._read_overview
    real = Scene._read_overview
    monkeypatch.setattr(Scene, "_read_overview", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    args = ["run", str(small_scene.scene), "--backbone", tiny_models["backbone"], "--landcover-head",
            tiny_models["landcover"], "--window", "128", "--overlap", "32", "--no-polygons"]
    assert main([*args, "--out", str(tmp_path / "without"), "--no-quicklook"]) == 0
    without = len(reads)
    reads.clear()
    assert main([*args, "--out", str(tmp_path / "with"), "--quicklook"]) == 0
    assert (tmp_path / "with" / "quicklook.png").exists()
    # the panel comes from the read the run made for its checks, or makes the only one (a
    # scene that cannot hold nodata is not read for the validity check)
    assert without <= 1 and len(reads) == 1
