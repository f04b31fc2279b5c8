"""An interactive web map of a run's results (folium / Leaflet), in Jupyter or as one HTML file.

``geodino.explore`` is :func:`explore` (the module has another name so that the package
attribute stays the function).

Layers: the scene, canopy height, land cover, the land-cover polygons, and any other geodino
raster or GeoPackage in the folder (clusters, similarity, change, crowns ...), with a layer
switcher, legends and click-to-read values. Rasters go in as PNG overlays decimated to
``max_size`` pixels a side and warped to Web Mercator, so the file size is bounded whatever the
scene's size; values for clicks come from a coarser grid (``value_size``).

Offline: the map needs no basemap (an OpenStreetMap layer is added with ``basemap=True`` and
loads only when the browser is online), and Leaflet itself is embedded in the page when a local
copy is found (``leaflet_dir``, else Debian's ``libjs-leaflet`` in /usr/share/javascript/leaflet);
without one the page loads Leaflet from folium's CDN.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from geodino import plot
from geodino.errors import InputError

LEAFLET_DIRS = (Path("/usr/share/javascript/leaflet"),)
WEB_MERCATOR = "EPSG:3857"
KNOWN_RASTERS = ("canopy_height.tif", "landcover.tif")
SKIPPED_RASTERS = ("embeddings.tif", "embeddings_pca.tif", "landcover_probability.tif")
MAX_POLYGONS = 5000


@dataclass(frozen=True)
class Layer:
    """One raster layer ready for the page: RGBA image and click values on a Web Mercator grid."""

    name: str
    rgba: np.ndarray  # (h, w, 4) uint8
    bounds: tuple[float, float, float, float]  # west, south, east, north in EPSG:3857 metres
    values: dict | None  # click-to-read grid, see _value_grid
    legend: str  # HTML
    show: bool = True


# --------------------------------------------------------------------------------------
# warping decimated rasters to Web Mercator


def _to_mercator(image: plot.MapImage, *, categorical: bool, size: int | None = None) -> plot.MapImage:
    from rasterio.transform import from_bounds
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    if image.crs is None:
        raise InputError("the raster has no CRS; it cannot be placed on a web map")
    data = np.asarray(image.data)
    bands = data.transpose(2, 0, 1) if data.ndim == 3 else data[None]
    h, w = bands.shape[1:]
    west, east, south, north = image.extent
    src_transform = from_bounds(west, south, east, north, w, h)
    kwargs = {}
    if size is not None:
        scale = max(h, w) / size
        kwargs = {"dst_width": max(1, round(w / scale)), "dst_height": max(1, round(h / scale))}
    transform, width, height = calculate_default_transform(image.crs, WEB_MERCATOR, w, h, west, south, east, north,
                                                           **kwargs)
    float_data = np.issubdtype(bands.dtype, np.floating)
    nodata = np.nan if float_data else 0
    out = np.full((bands.shape[0], height, width), nodata, bands.dtype)
    reproject(bands, out, src_transform=src_transform, src_crs=image.crs, src_nodata=nodata,
              dst_transform=transform, dst_crs=WEB_MERCATOR, dst_nodata=nodata,
              resampling=Resampling.nearest if categorical else Resampling.bilinear)
    x0, y1 = transform * (0, 0)
    x1, y0 = transform * (width, height)
    return plot.MapImage(out.transpose(1, 2, 0) if data.ndim == 3 else out[0], (x0, x1, y0, y1), None)


def _bounds(image: plot.MapImage) -> tuple[float, float, float, float]:
    west, east, south, north = image.extent
    return west, south, east, north


def _value_grid(image: plot.MapImage, *, labels: dict | None = None, scale: float = 1.0, units: str = "") -> dict:
    """A JSON-ready grid for click-to-read: integer values (or null), row-major, with bounds."""
    data = np.asarray(image.data)
    if labels is not None:
        values = [int(v) if int(v) in labels else None for v in data.ravel()]
    else:
        q = np.round(data / scale)
        values = [None if not np.isfinite(v) else int(v) for v in q.ravel()]
    return {"bounds": list(_bounds(image)), "w": int(data.shape[1]), "h": int(data.shape[0]), "values": values,
            "labels": {str(k): v for k, v in labels.items()} if labels else None, "scale": scale, "units": units}


# --------------------------------------------------------------------------------------
# layers from a run's outputs


def _ramp_css(cmap: str) -> str:
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.linspace(0, 1, 6))
    return ", ".join("rgb({},{},{})".format(*(int(v * 255) for v in c[:3])) for c in colours)


def _ramp_legend(title: str, vmax: float, units: str, cmap: str) -> str:
    units = "" if units in ("1", "") else units  # dimensionless
    return (f"<div><b>{title}</b></div><div style='width:160px;height:10px;"
            f"background:linear-gradient(to right, {_ramp_css(cmap)})'></div>"
            f"<div style='display:flex;justify-content:space-between;width:160px'>"
            f"<span>0 {units}</span><span>{vmax:g} {units}</span></div>")


def _class_legend(title: str, classes) -> str:
    rows = "".join(f"<div><span style='display:inline-block;width:12px;height:12px;margin-right:4px;"
                   f"vertical-align:middle;background:rgb{tuple(c.color)}'></span>{c.name}</div>"
                   for c in classes.classes)
    return f"<div><b>{title}</b></div>{rows}"


def ramp_layer(name: str, source, *, max_size: int, value_size: int, units: str = "m",
               cmap: str = plot.HEIGHT_CMAP, vmax: float | None = None, show: bool = True) -> Layer:
    """A continuous raster (canopy height, similarity ...) coloured on a ramp from 0 to ``vmax``."""
    import matplotlib

    image = plot.height_image(source, max_size)
    finite = image.data[np.isfinite(image.data)]
    vmax = vmax or (max(1.0, float(np.ceil(np.percentile(finite, 99)))) if finite.size else 1.0)
    merc = _to_mercator(image, categorical=False)
    colours = matplotlib.colormaps[cmap](np.clip(np.nan_to_num(merc.data) / vmax, 0, 1), bytes=True)
    colours[..., 3] = np.where(np.isfinite(merc.data), 255, 0)
    grid = _value_grid(_to_mercator(image, categorical=False, size=value_size), scale=0.1 if units == "m" else 0.01,
                       units=units)
    return Layer(name, colours, _bounds(merc), grid, _ramp_legend(name, vmax, units, cmap), show)


def class_layer(name: str, source, *, max_size: int, value_size: int, show: bool = True) -> Layer:
    """A class raster (land cover, clusters) in its table's colours, class names on click."""
    codes, classes = plot.class_codes(source, max_size=max_size)
    merc = _to_mercator(codes, categorical=True)
    grid = _value_grid(_to_mercator(codes, categorical=True, size=value_size),
                       labels={c.code: c.name for c in classes.classes})
    return Layer(name, plot.class_colors(merc.data, classes), _bounds(merc), grid, _class_legend(name, classes), show)


def scene_layer(source, *, max_size: int) -> Layer | None:
    try:
        image = plot.rgb_image(source, max_size=max_size)
    except InputError:
        return None
    merc = _to_mercator(replace(image, data=image.data.astype(np.float32)), categorical=False)
    rgba = (np.nan_to_num(merc.data) * 255).round().astype(np.uint8)
    return Layer("scene", rgba, _bounds(merc), None, "", True)


def _raster_kind(path: Path) -> str | None:
    import rasterio

    with rasterio.open(path) as src:
        if src.count != 1:
            return None
        if "class_codes" in src.tags(1):
            return "classes"
        return "ramp" if src.dtypes[0].startswith("float") else None


def layers_of(source, *, max_size: int = 1024, value_size: int = 256) -> list[Layer]:
    """The raster layers of a run_scene Dataset or an output folder."""
    import xarray as xr

    layers = []
    scene = scene_layer(source, max_size=max_size)
    if scene is not None:
        layers.append(scene)
    has_landcover = plot._has(source, "landcover")
    if plot._has(source, "canopy_height"):
        # shown at first only when no land cover covers it (the switcher turns it on)
        layers.append(ramp_layer("canopy height", source, max_size=max_size, value_size=value_size,
                                 show=not has_landcover))
    if has_landcover:
        layers.append(class_layer("land cover", source, max_size=max_size, value_size=value_size))
    if isinstance(source, xr.Dataset):
        return layers
    for path in sorted(Path(source).glob("*.tif")):
        if path.name in KNOWN_RASTERS + SKIPPED_RASTERS or path.name.startswith("."):
            continue
        kind = _raster_kind(path)
        name = path.stem.replace("_", " ")
        if kind == "classes":
            layers.append(class_layer(name, path, max_size=max_size, value_size=value_size, show=False))
        elif kind == "ramp":
            import rasterio

            with rasterio.open(path) as src:
                units = (src.units[0] or "") if src.units else ""
            layers.append(ramp_layer(name, path, max_size=max_size, value_size=value_size, units=units,
                                     cmap="magma" if units != "m" else plot.HEIGHT_CMAP, show=False))
    return layers


def _png_url(rgba: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _vector_layers(folder: Path, classes_by_code: dict, pixel: float):
    """(name, GeoDataFrame in EPSG:4326, style) for each GeoPackage in the folder."""
    import geopandas as gpd

    from geodino.styles import feature_layers

    out = []
    for path in sorted(folder.glob("*.gpkg")):
        layers = feature_layers(path)
        if not layers:
            continue
        gdf = gpd.read_file(path, layer=layers[0])
        if gdf.empty or gdf.crs is None:
            continue
        if len(gdf) > MAX_POLYGONS and "area_m2" in gdf:
            gdf = gdf.nlargest(MAX_POLYGONS, "area_m2")
        else:
            gdf = gdf.head(MAX_POLYGONS)
        if pixel > 0 and gdf.crs.is_projected:
            gdf = gdf.set_geometry(gdf.geometry.simplify(pixel))
        gdf = gdf.to_crs("EPSG:4326")
        name = "land-cover polygons" if path.name == "landcover.gpkg" else path.stem.replace("_", " ")
        out.append((name, gdf, classes_by_code if "class_code" in gdf else None))
    return out


# --------------------------------------------------------------------------------------
# the folium map


def _leaflet_assets(leaflet_dir: str | Path | None):
    """data: URLs of a local Leaflet's JS and CSS, or None."""
    for folder in ([Path(leaflet_dir)] if leaflet_dir else list(LEAFLET_DIRS)):
        js, css = folder / "leaflet.min.js", folder / "leaflet.css"
        if not js.exists():
            js = folder / "leaflet.js"
        if js.exists() and css.exists():
            return ("data:text/javascript;base64," + base64.b64encode(js.read_bytes()).decode(),
                    "data:text/css;base64," + base64.b64encode(css.read_bytes()).decode())
    if leaflet_dir:
        raise InputError(f"{leaflet_dir}: no leaflet.js and leaflet.css there")
    return None


def explore(source, *, max_size: int = 1024, value_size: int = 256, basemap: bool = True,
            leaflet_dir: str | Path | None = None):
    """An interactive map (a ``folium.Map``: displays in Jupyter, ``.save()`` writes HTML).

    ``source``: an output folder of ``geodino run`` or a run_scene Dataset.
    """
    import folium
    import xarray as xr

    if not isinstance(source, xr.Dataset) and not Path(source).is_dir():
        raise InputError(f"{source}: not an output folder; pass the --out folder of `geodino run` "
                         "or a run_scene Dataset")
    layers = layers_of(source, max_size=max_size, value_size=value_size)
    vectors = []
    if not isinstance(source, xr.Dataset):
        classes = None
        if plot._has(source, "landcover"):
            classes = {c.code: c for c in plot.class_table_of(source).classes}
        pixel = _pixel_size(Path(source))
        vectors = _vector_layers(Path(source), classes or {}, pixel)
    if not layers and not vectors:
        raise InputError(f"nothing to show in {source}: no geodino rasters or polygons")
    m = folium.Map(tiles=None, control_scale=True, zoom_snap=0.25)
    assets = _leaflet_assets(leaflet_dir)
    if assets is not None:
        # Leaflet only, embedded: the page works offline (jQuery/Bootstrap are for widgets not used here)
        m.default_js = [("leaflet", assets[0])]
        m.default_css = [("leaflet_css", assets[1])]
    if basemap:
        folium.TileLayer("OpenStreetMap", name="OpenStreetMap (online)", overlay=False, control=True).add_to(m)
    west, south, east, north = _latlon_bounds(layers, vectors)
    for layer in layers:
        s, w_ = _mercator_to_latlon(layer.bounds[0], layer.bounds[1])
        n, e = _mercator_to_latlon(layer.bounds[2], layer.bounds[3])
        folium.raster_layers.ImageOverlay(_png_url(layer.rgba), bounds=[[s, w_], [n, e]], name=layer.name,
                                          show=layer.show, interactive=False, zindex=1).add_to(m)
    for name, gdf, classes in vectors:
        _geojson(name, gdf, classes).add_to(m)
    folium.LayerControl(collapsed=False).add_to(m)
    m.fit_bounds([[south, west], [north, east]])
    grids = [dict(layer.values, name=layer.name) for layer in layers if layer.values is not None]
    legends = "".join(f"<div class='geodino-legend-item' data-layer='{layer.name}' style='margin-bottom:6px;"
                      f"display:{'block' if layer.show else 'none'}'>{layer.legend}</div>"
                      for layer in layers if layer.legend)
    _Script(_script(m.get_name(), grids, legends)).add_to(m)  # rendered after the map exists
    return m


def _script_element():
    from branca.element import MacroElement, Template

    class Script(MacroElement):
        _template = Template("{% macro script(this, kwargs) %}{{ this.code }}{% endmacro %}")

        def __init__(self, code: str) -> None:
            super().__init__()
            self._name = "GeodinoScript"
            self.code = code

    return Script


def _Script(code: str):
    return _script_element()(code)


def _pixel_size(folder: Path) -> float:
    import rasterio

    for name in KNOWN_RASTERS:
        if (folder / name).exists():
            with rasterio.open(folder / name) as src:
                return float(abs(src.transform.a))
    return 0.0


def _mercator_to_latlon(x: float, y: float) -> tuple[float, float]:
    from rasterio.warp import transform

    lon, lat = transform(WEB_MERCATOR, "EPSG:4326", [x], [y])
    return lat[0], lon[0]


def _latlon_bounds(layers, vectors):
    if layers:
        b = np.array([layer.bounds for layer in layers])
        s, w = _mercator_to_latlon(b[:, 0].min(), b[:, 1].min())
        n, e = _mercator_to_latlon(b[:, 2].max(), b[:, 3].max())
        return w, s, e, n
    w, s, e, n = vectors[0][1].total_bounds
    return w, s, e, n


def _geojson(name: str, gdf, classes: dict | None):
    import folium

    def style(feature):
        props = feature["properties"]
        c = classes.get(props.get("class_code")) if classes else None
        colour = "#{:02x}{:02x}{:02x}".format(*c.color) if c is not None else "#ff00ff"
        return {"color": "#333333" if c is not None else colour, "weight": 0.6,
                "fillColor": colour, "fillOpacity": 0.5 if c is not None else 0.1}

    fields = [c for c in gdf.columns if c != "geometry"][:4]
    for col in fields:  # JSON has no numpy types
        if gdf[col].dtype.kind == "f":
            gdf[col] = gdf[col].round(1)
    tooltip = folium.GeoJsonTooltip(fields=fields) if fields else None
    return folium.GeoJson(gdf, name=name, style_function=style, tooltip=tooltip, show=False)


def _script(map_name: str, grids: list, legends: str) -> str:
    """Legend control and click-to-read popup (plain Leaflet, no other library)."""
    from string import Template

    return Template("""
(function() {
  var map = $map;
  var grids = $grids;
  var legend = L.control({position: 'bottomright'});
  legend.onAdd = function() {
    var div = L.DomUtil.create('div', 'geodino-legend');
    div.style.cssText = 'background:white;padding:6px 8px;font:12px sans-serif;border-radius:4px;'
      + 'box-shadow:0 0 4px rgba(0,0,0,0.4);max-height:60vh;overflow:auto';
    div.innerHTML = $legends;
    return div;
  };
  if ($legends.length) legend.addTo(map);
  function toggle(e, shown) {  // a legend shows only while its layer does
    document.querySelectorAll('.geodino-legend-item').forEach(function(d) {
      if (d.getAttribute('data-layer') === e.name) d.style.display = shown ? 'block' : 'none';
    });
  }
  map.on('overlayadd', function(e) { toggle(e, true); });
  map.on('overlayremove', function(e) { toggle(e, false); });
  map.on('click', function(e) {
    var p = L.CRS.EPSG3857.project(e.latlng), lines = [];
    grids.forEach(function(g) {
      var col = Math.floor((p.x - g.bounds[0]) / (g.bounds[2] - g.bounds[0]) * g.w);
      var row = Math.floor((g.bounds[3] - p.y) / (g.bounds[3] - g.bounds[1]) * g.h);
      if (col < 0 || row < 0 || col >= g.w || row >= g.h) return;
      var v = g.values[row * g.w + col];
      if (v === null) return;
      var text = g.labels ? g.labels[String(v)] + ' (' + v + ')' : (v * g.scale).toFixed(g.scale < 0.1 ? 2 : 1) + ' ' + g.units;
      lines.push('<b>' + g.name + '</b>: ' + text);
    });
    lines.push('<small>' + e.latlng.lat.toFixed(6) + ', ' + e.latlng.lng.toFixed(6) + '</small>');
    L.popup().setLatLng(e.latlng).setContent(lines.join('<br>')).openOn(map);
  });
})();
""").substitute(map=map_name, grids=json.dumps(grids, separators=(",", ":")), legends=json.dumps(legends))


def save_html(source, html: str | Path, *, overwrite: bool = False, **kwargs) -> Path:
    """Write :func:`explore`'s map as one standalone HTML file (atomically)."""
    from geodino.export import atomic_path, check_writable

    html = Path(html)
    check_writable([html], overwrite)
    m = explore(source, **kwargs)
    with atomic_path(html) as tmp:
        tmp.write_text(m.get_root().render(), encoding="utf-8")
    return html


__all__ = ["Layer", "explore", "layers_of", "save_html"]
