"""QGIS styles: .qml files that parse and list exactly the classes; the GeoPackage's default style row."""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET

import geopandas as gpd
import pytest
import shapely

from geodino.classes import WORLDCOVER, ClassTable, LandCoverClass
from geodino.styles import (
    feature_layers,
    height_qml,
    landcover_qml,
    polygons_qml,
    style_outputs,
    write_gpkg_style,
    write_qml,
)
from tests import vizdata as vd


def test_landcover_qml_lists_exactly_the_classes_with_names_and_colours(tmp_path):
    path = write_qml(tmp_path / "landcover.qml", landcover_qml(WORLDCOVER))
    root = ET.parse(path).getroot()
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [(int(e.get("value")), e.get("label"), e.get("color")) for e in entries] == [
        (c.code, c.name, "#{:02x}{:02x}{:02x}".format(*c.color)) for c in WORLDCOVER.classes]


def test_names_with_markup_characters_survive(tmp_path):
    table = ClassTable((LandCoverClass(1, 'Roads & "paths" <paved>', (1, 2, 3)),))
    root = ET.fromstring(landcover_qml(table).split("\n", 1)[1])
    assert root.find(".//paletteEntry").get("label") == 'Roads & "paths" <paved>'


def test_height_qml_is_a_metres_ramp():
    root = ET.fromstring(height_qml(35.0).split("\n", 1)[1])
    shader = root.find("pipe/rasterrenderer/rastershader/colorrampshader")
    items = shader.findall("item")
    assert [float(i.get("value")) for i in items] == pytest.approx([0, 8.75, 17.5, 26.25, 35])
    assert items[0].get("label") == "0 m" and items[-1].get("label") == "35 m"
    assert root.find("pipe/rasterrenderer").get("type") == "singlebandpseudocolor"


def test_geopackage_carries_its_default_style(tmp_path):
    gpkg = tmp_path / "landcover.gpkg"
    gdf = gpd.GeoDataFrame({"class_code": [10, 50], "class_name": ["Tree cover", "Built-up"]},
                           geometry=[shapely.box(0, 0, 10, 10), shapely.box(10, 0, 20, 10)], crs="EPSG:32633")
    gdf.to_file(gpkg, layer="landcover", driver="GPKG")
    write_gpkg_style(gpkg, "landcover", polygons_qml(WORLDCOVER))
    write_gpkg_style(gpkg, "landcover", polygons_qml(WORLDCOVER))  # a rerun: still one default
    with sqlite3.connect(gpkg) as con:
        rows = con.execute("SELECT f_table_name, f_geometry_column, useAsDefault, styleQML FROM layer_styles "
                           "ORDER BY id").fetchall()
        registered = con.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone()
    assert [r[2] for r in rows] == [0, 1] and rows[-1][:2] == ("landcover", "geom")
    assert registered == ("attributes",)
    categories = ET.fromstring(rows[-1][3].split("\n", 1)[1]).findall("renderer-v2/categories/category")
    assert [c.get("label") for c in categories] == WORLDCOVER.names
    # the features are untouched and readers still find the layer
    assert feature_layers(gpkg) == ["landcover"]
    assert len(gpd.read_file(gpkg, layer="landcover")) == 2


def test_style_outputs_writes_sidecars_for_the_rasters(tmp_path):
    out = vd.write_outputs(tmp_path, with_scene=False)
    written = style_outputs(out, WORLDCOVER, {"landcover": "landcover.tif", "canopy_height": "canopy_height.tif"})
    assert written == {"landcover_style": "landcover.qml", "canopy_height_style": "canopy_height.qml"}
    ramp = ET.parse(out / "canopy_height.qml").getroot().findall(".//colorrampshader/item")
    assert float(ramp[-1].get("value")) == 20.0  # 99th percentile of 0/20 m, rounded up to 5 m


def test_missing_layer_is_an_error_and_leaves_the_file_alone(tmp_path):
    gpkg = tmp_path / "x.gpkg"
    gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.Point(0, 0)], crs="EPSG:4326").to_file(gpkg, layer="pts")
    before = gpkg.read_bytes()
    with pytest.raises(ValueError, match="no feature layer"):
        write_gpkg_style(gpkg, "landcover", polygons_qml(WORLDCOVER))
    assert gpkg.read_bytes() == before
