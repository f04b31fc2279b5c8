"""QGIS styles for geodino's outputs: ``.qml`` sidecar files and a GeoPackage's ``layer_styles``.

QGIS opens ``landcover.tif`` with the style in ``landcover.qml`` beside it (same base name),
and a GeoPackage layer with the default row of its ``layer_styles`` table. A GeoTIFF colour
table always has 256 entries (TIFF stores no alpha, so unused ones read as opaque black), and
without a style QGIS lists all 256 in its legend; the paletted style lists exactly the classes
of the table, with their names.

Written by hand because no maintained Python library writes QGIS styles without QGIS
itself (pyqgis); the XML is the subset QGIS 3 reads for these renderers.
"""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from geodino.classes import ClassTable
from geodino.export import atomic_path

# viridis at 0, 0.25, 0.5, 0.75, 1: the ramp geodino.plot.canopy draws with
HEIGHT_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
QGIS_VERSION = "3.28.0"


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb[:3])


def _qgis_root() -> ET.Element:
    return ET.Element("qgis", version=QGIS_VERSION, styleCategories="AllStyleCategories")


def _document(root: ET.Element) -> str:
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def _raster_pipe(root: ET.Element, renderer_type: str) -> ET.Element:
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", type=renderer_type, band="1", opacity="1",
                             alphaBand="-1", nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(root, "blendMode").text = "0"
    return renderer


def landcover_qml(classes: ClassTable) -> str:
    """A paletted raster style: one entry per class of the table (code, colour, name), no more."""
    root = _qgis_root()
    renderer = _raster_pipe(root, "paletted")
    palette = ET.SubElement(renderer, "colorPalette")
    for c in classes.classes:
        ET.SubElement(palette, "paletteEntry", value=str(c.code), color=_hex(c.color), alpha="255", label=c.name)
    return _document(root)


def height_qml(vmax: float, *, vmin: float = 0.0, units: str = "m") -> str:
    """A pseudocolour style for heights: the viridis ramp from ``vmin`` to ``vmax`` (in ``units``)."""
    root = _qgis_root()
    renderer = _raster_pipe(root, "singlebandpseudocolor")
    renderer.set("classificationMin", repr(float(vmin)))
    renderer.set("classificationMax", repr(float(vmax)))
    shader = ET.SubElement(ET.SubElement(renderer, "rastershader"), "colorrampshader",
                           colorRampType="INTERPOLATED", classificationMode="1", clip="0",
                           minimumValue=repr(float(vmin)), maximumValue=repr(float(vmax)),
                           labelPrecision="1")
    for value, rgb in zip(np.linspace(vmin, vmax, len(HEIGHT_RAMP)), HEIGHT_RAMP):
        ET.SubElement(shader, "item", value=repr(float(value)), color=_hex(rgb), alpha="255",
                      label=f"{value:g} {units}")
    return _document(root)


def polygons_qml(classes: ClassTable, column: str = "class_code") -> str:
    """A categorised fill style for class polygons: the class colours, labelled by name."""
    root = _qgis_root()
    renderer = ET.SubElement(root, "renderer-v2", type="categorizedSymbol", attr=column, forceraster="0",
                             symbollevels="0", enableorderby="0")
    categories = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    for i, c in enumerate(classes.classes):
        ET.SubElement(categories, "category", value=str(c.code), symbol=str(i), label=c.name, render="true")
        symbol = ET.SubElement(symbols, "symbol", type="fill", name=str(i), alpha="1", clip_to_extent="1",
                               force_rhr="0")
        layer = ET.SubElement(symbol, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
        options = ET.SubElement(layer, "Option", type="Map")
        for name, value in (("color", "{},{},{},255".format(*c.color)), ("outline_color", "35,35,35,255"),
                            ("outline_style", "solid"), ("outline_width", "0.1"), ("outline_width_unit", "MM"),
                            ("style", "solid")):
            ET.SubElement(options, "Option", name=name, value=value, type="QString")
    return _document(root)


def write_qml(path: str | Path, qml: str) -> Path:
    """Write a style file atomically (QGIS finds ``name.qml`` beside ``name.tif``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(qml, encoding="utf-8")
    return path


def height_range(raster: str | Path, *, percentile: float = 99.0, step: float = 5.0) -> float:
    """A round upper end for a height ramp: the ``percentile`` of valid heights (read from the
    overviews), rounded up to a multiple of ``step`` metres (at least ``step``)."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(raster) as src:
        scale = max(1.0, max(src.width, src.height) / 1024)
        shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        data = src.read(1, out_shape=shape, resampling=Resampling.nearest, masked=True).astype("float64")
    values = data.filled(np.nan)
    values = values[np.isfinite(values)]
    top = float(np.percentile(values, percentile)) if values.size else step
    return max(step, float(np.ceil(top / step) * step))


# QGIS's own schema of the table it reads default styles from (QgsOgrProviderUtils)
_LAYER_STYLES = """CREATE TABLE IF NOT EXISTS layer_styles (
  id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256),
  f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT,
  styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
  update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"""


def write_gpkg_style(gpkg: str | Path, layer: str, qml: str, *, name: str | None = None,
                     description: str = "geodino default style") -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage's ``layer_styles`` table.

    The table is registered in ``gpkg_contents`` as attributes (as QGIS does), so the file stays
    a valid GeoPackage. One transaction: the file has the row or is unchanged.
    """
    gpkg = Path(gpkg)
    with sqlite3.connect(gpkg) as con:
        geom_col = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?",
                               (layer,)).fetchone()
        if geom_col is None:
            raise ValueError(f"{gpkg}: no feature layer {layer!r}")
        con.execute(_LAYER_STYLES)
        con.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier) "
                    "VALUES ('layer_styles', 'attributes', 'layer_styles')")
        con.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (layer,))
        con.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                    "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                    "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', '')",
                    (layer, geom_col[0], name or layer, qml, description))
    con.close()


def feature_layers(path: str | Path) -> list[str]:
    """The layers of a vector file that have geometries (not ``layer_styles`` or other tables)."""
    import pyogrio

    return [str(name) for name, geometry in pyogrio.list_layers(path) if geometry is not None]


def style_outputs(out_dir: str | Path, classes: ClassTable | None, outputs: dict) -> dict:
    """Write the styles of a run's outputs (names as in ``report.json``'s outputs); returns the
    new outputs (``landcover_style`` -> ``landcover.qml`` ...)."""
    out = Path(out_dir)
    written = {}
    if "landcover" in outputs and classes is not None:
        written["landcover_style"] = write_qml(out / "landcover.qml", landcover_qml(classes)).name
    if "canopy_height" in outputs:
        vmax = height_range(out / outputs["canopy_height"])
        written["canopy_height_style"] = write_qml(out / "canopy_height.qml", height_qml(vmax)).name
    if "landcover_polygons" in outputs and classes is not None:
        write_gpkg_style(out / outputs["landcover_polygons"], "landcover", polygons_qml(classes))
    return written


__all__ = [
    "HEIGHT_RAMP",
    "feature_layers",
    "height_qml",
    "height_range",
    "landcover_qml",
    "polygons_qml",
    "style_outputs",
    "write_gpkg_style",
    "write_qml",
]
