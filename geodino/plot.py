"""Static maps of a scene and its results with matplotlib: RGB, canopy height, land cover.

Each function takes what a user has at hand: a Dataset from :func:`geodino.run_scene`, an
output folder of ``geodino run`` (or one of its GeoTIFFs), or for :func:`scene` a scene file
or an in-memory (band, y, x) DataArray. Rasters are decimated to at most ``max_size`` pixels
a side (GeoTIFFs through their overviews), drawn on map axes in the data's CRS (km, or m for
small extents, degrees for geographic CRSs), and every function accepts ``ax=``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from geodino.classes import WORLDCOVER, ClassTable, LandCoverClass
from geodino.errors import InputError

MAX_SIZE = 1200
HEIGHT_CMAP = "viridis"  # the ramp of geodino.styles.height_qml


@dataclass(frozen=True)
class MapImage:
    """A decimated raster ready to draw: (h, w) or (h, w, 4) values and where they lie."""

    data: np.ndarray
    extent: tuple[float, float, float, float]  # west, east, south, north (CRS units)
    crs: object  # rasterio CRS or None


# --------------------------------------------------------------------------------------
# reading


def _read_tif(path: Path, max_size: int, *, categorical: bool):
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        scale = max(1.0, max(src.width, src.height) / max_size)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        resampling = Resampling.nearest if categorical else Resampling.average
        data = src.read(1, out_shape=shape, resampling=resampling, masked=True)
        west, south, east, north = src.bounds
        try:
            cmap = src.colormap(1) if categorical else None
        except ValueError:
            cmap = None
        return data, (west, east, south, north), src.crs, cmap, src.tags(1)


def _decimate(arr, max_size: int):
    """A strided read of a (y, x) DataArray (lazy ones compute only what is kept)."""
    import rioxarray  # noqa: F401  (registers .rio)

    step = max(1, int(np.ceil(max(arr.sizes["y"], arr.sizes["x"]) / max_size)))
    west, south, east, north = arr.rio.bounds()
    return np.asarray(arr.isel(y=slice(None, None, step), x=slice(None, None, step)).values), \
        (west, east, south, north), arr.rio.crs


def _file_map(source) -> bool:
    """{output name: GeoTIFF}, e.g. a run's files before they are in place (not a Dataset,
    which is a Mapping too)."""
    return isinstance(source, Mapping) and not hasattr(source, "data_vars")


def _output_file(source, name: str) -> Path | None:
    if _file_map(source):
        return Path(source[name]) if name in source else None
    if not isinstance(source, (str, Path)):
        return None
    p = Path(source)
    if p.is_dir():
        return p / f"{name}.tif" if (p / f"{name}.tif").exists() else None
    return p if p.suffix.lower() in (".tif", ".tiff") and p.exists() else None


def _variable(source, name: str):
    """The DataArray ``name`` of a Dataset (or the DataArray itself), else None."""
    import xarray as xr

    if isinstance(source, xr.Dataset):
        return source.get(name)
    if isinstance(source, xr.DataArray) and source.ndim == 2:
        return source
    return None


def _missing(source, what: str) -> InputError:
    return InputError(f"{what} not found in {source if not hasattr(source, 'dims') else type(source).__name__}: "
                      f"pass a run_scene Dataset, an output folder of `geodino run` or its {what} GeoTIFF")


def height_image(source, max_size: int = MAX_SIZE) -> MapImage:
    """Canopy heights (m), NaN where there is none."""
    var = _variable(source, "canopy_height")
    if var is not None:
        data, extent, crs = _decimate(var, max_size)
        return MapImage(data.astype(np.float32), extent, crs)
    path = _output_file(source, "canopy_height") if not hasattr(source, "dims") else None
    if path is None:
        raise _missing(source, "canopy height")
    data, extent, crs, _, _ = _read_tif(path, max_size, categorical=False)
    return MapImage(data.astype(np.float32).filled(np.nan), extent, crs)


def class_table_of(source) -> ClassTable:
    """The class table of a land-cover Dataset variable or GeoTIFF (codes, names, colours)."""
    var = _variable(source, "landcover")
    if var is not None:
        codes, names = var.attrs.get("class_codes"), var.attrs.get("class_names")
        colors = var.attrs.get("class_colors")
        if codes is None or names is None:
            raise InputError("the land-cover DataArray has no class_codes/class_names attributes")
        if colors is None:  # an older Dataset: the WorldCover colours where codes match
            known = {c.code: c.color for c in WORLDCOVER.classes}
            colors = [known.get(int(c), (128, 128, 128)) for c in codes]
        else:
            colors = np.asarray(colors).reshape(-1, 3)
        return ClassTable(tuple(LandCoverClass(int(c), str(n), tuple(int(v) for v in rgb))
                                for c, n, rgb in zip(codes, names, colors)),
                          nodata=int(var.attrs.get("_FillValue", 0)))
    path = _output_file(source, "landcover")
    if path is None:
        raise _missing(source, "land cover")
    _, _, _, cmap, tags = _read_tif(path, 1, categorical=True)
    codes = [int(c) for c in tags.get("class_codes", "").split(",") if c]
    names = tags.get("class_names", "").split(",")
    if not codes or cmap is None:
        raise InputError(f"{path}: no class table (class_codes tag and colour map); not a geodino land-cover map")
    import rasterio

    with rasterio.open(path) as src:
        nodata = int(src.nodata) if src.nodata is not None else 0
    return ClassTable(tuple(LandCoverClass(c, n, tuple(cmap[c][:3])) for c, n in zip(codes, names)), nodata=nodata)


def class_codes(source, classes: ClassTable | None = None, max_size: int = MAX_SIZE) -> tuple[MapImage, ClassTable]:
    """Land-cover codes (uint8, the table's nodata where there is none) and the class table."""
    classes = classes or class_table_of(source)
    var = _variable(source, "landcover")
    if var is not None:
        codes, extent, crs = _decimate(var, max_size)
    else:
        path = _output_file(source, "landcover")
        if path is None:
            raise _missing(source, "land cover")
        data, extent, crs, _, _ = _read_tif(path, max_size, categorical=True)
        codes = data.filled(classes.nodata)
    return MapImage(np.asarray(codes, np.uint8), extent, crs), classes


def class_colors(codes: np.ndarray, classes: ClassTable) -> np.ndarray:
    """RGBA (h, w, 4) uint8 of class codes in the table's colours; other codes transparent."""
    lut = np.zeros((256, 4), np.uint8)
    for c in classes.classes:
        lut[c.code] = (*c.color, 255)
    return lut[np.asarray(codes, np.uint8)]


def class_image(source, classes: ClassTable | None = None, max_size: int = MAX_SIZE) -> tuple[MapImage, ClassTable]:
    """Land-cover classes as an RGBA image in the table's colours (unknown codes and nodata transparent)."""
    codes, classes = class_codes(source, classes, max_size)
    return replace(codes, data=class_colors(codes.data, classes)), classes


def _scene_reference(source):
    """(scene paths, 1-based bands, (lo, hi)) recorded by a run, or None."""
    import xarray as xr

    if _file_map(source):
        return None
    if isinstance(source, xr.Dataset):
        meta = source.attrs
        if "scene_paths" not in meta:
            return None
        paths, bands, norm = json.loads(meta["scene_paths"]), list(meta["scene_bands"]), json.loads(meta["normalisation"])
    else:
        report = Path(source) / "report.json"
        if not Path(source).is_dir() or not report.exists():
            return None
        data = json.loads(report.read_text())
        paths, bands, norm = data["scene"], data.get("scene_bands"), data["normalisation"]
    return paths, bands, (norm["lo"], norm["hi"])


def rgb_image(source, *, bands=None, profile: str | None = None, stretch=None,
              max_size: int = MAX_SIZE) -> MapImage:
    """The scene as RGBA in [0, 1] with the run's (or the profile's) fixed stretch; nodata transparent.

    ``source``: a run_scene Dataset or output folder (the scene it was made from, with the
    stretch it was normalised with), a scene file (``profile``, default auto), or a
    (band, y, x) DataArray (2-98 percentile stretch unless ``profile`` fixes one), or a
    :class:`geodino.scene.Scene` with its 3 bands selected. ``stretch``: (lo, hi) per band.
    """
    import xarray as xr

    from geodino.scene import OVERVIEW_SIZE, Scene, open_scene, with_bands
    from geodino.sensor import get_profile, prepare

    if isinstance(source, Scene):
        if stretch is None:
            source, norm = prepare(source, profile or "auto", "sat", bands)
            stretch = (norm.lo, norm.hi)
        # the decimated read a run has already made (Scene.read_overview keeps it), thinned to
        # at most max_size: drawing does not decode the scene again
        data, valid = source.read_overview(max(max_size, OVERVIEW_SIZE))
        step = max(1, math.ceil(max(valid.shape) / max_size))
        data, valid = data[:, ::step, ::step], valid[::step, ::step]
        west, south, east, north = source.grid.bounds
        return _stretched(data, valid, *stretch, (west, east, south, north), source.grid.crs)

    if isinstance(source, xr.DataArray):
        arr = source if bands is None else source.isel(band=[int(b) - 1 for b in bands])
        arr = arr.isel(band=slice(0, 3))
        data, extent, crs = _decimate(arr, max_size)
        data = data.astype(np.float32)
        nodata = arr.rio.nodata
        valid = np.isfinite(data).all(0) & (True if nodata is None else (data != nodata).any(0))
        if stretch is not None:
            lo, hi = stretch
        elif profile is not None and get_profile(profile).lo is not None:
            p = get_profile(profile)
            lo, hi = [p.lo] * 3, [p.hi] * 3
        else:
            sample = data[:, valid]
            lo = np.percentile(sample, 2, axis=1) if sample.size else [0.0] * 3
            hi = np.percentile(sample, 98, axis=1) if sample.size else [1.0] * 3
        return _stretched(data, valid, lo, hi, extent, crs)
    ref = _scene_reference(source)
    if ref is not None:
        paths, run_bands, (lo, hi) = ref
        scene = open_scene(paths)
        scene = with_bands(scene, bands or run_bands) if (bands or run_bands) else scene
    else:
        if not isinstance(source, (str, Path)) or not Path(source).is_file():
            raise InputError(f"{source}: no scene to draw; pass a run_scene Dataset, an output folder with "
                             "report.json, a scene file or a (band, y, x) DataArray")
        scene, norm = prepare(open_scene(source), profile or "auto", "sat", bands)
        lo, hi = norm.lo, norm.hi
    data, valid = scene.read_overview(max_size)
    west, south, east, north = scene.grid.bounds
    return _stretched(data, valid, lo, hi, (west, east, south, north), scene.grid.crs)


def _stretched(data, valid, lo, hi, extent, crs) -> MapImage:
    lo = np.asarray(lo, np.float32)[:, None, None]
    hi = np.asarray(hi, np.float32)[:, None, None]
    # in place on one float32 copy, straight into the (h, w, 4) image: a third of the memory
    # of the temporaries the one-line expression made (the quicklook runs at a run's peak)
    rgb = np.nan_to_num(np.asarray(data, np.float32), copy=True)
    rgb -= lo
    rgb /= np.maximum(hi - lo, 1e-6)
    np.clip(rgb, 0, 1, out=rgb)
    rgba = np.empty(rgb.shape[1:] + (4,), np.float32)
    rgba[..., :3] = rgb.transpose(1, 2, 0)
    rgba[..., 3] = valid
    return MapImage(rgba, extent, crs)


# --------------------------------------------------------------------------------------
# drawing


def _axes(ax, figsize=(6, 5.5)):
    if ax is None:
        import matplotlib.pyplot as plt  # only here: figures without pyplot never import it

        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def map_units(extent, crs) -> tuple[float, str]:
    """Divisor and unit name for map axes: km for extents of 2 km or more, else m; degrees when geographic."""
    if crs is not None and getattr(crs, "is_geographic", False):
        return 1.0, "°"
    west, east, south, north = extent
    return (1000.0, "km") if max(east - west, north - south) >= 2000 else (1.0, "m")


def draw(ax, image: MapImage, **imshow_kwargs):
    """imshow ``image`` on map axes (easting/northing in km or m, a few readable ticks)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    scale, unit = map_units(image.extent, image.crs)
    extent = [v / scale for v in image.extent]
    im = ax.imshow(image.data, extent=extent, origin="upper", interpolation="nearest", **imshow_kwargs)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(4))
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        axis.set_major_formatter(fmt)
    crs_name = ""
    if image.crs is not None:
        crs_name = image.crs.to_string() if image.crs.to_epsg() is None else f"EPSG:{image.crs.to_epsg()}"
    if unit == "°":
        ax.set_xlabel(f"longitude (°, {crs_name})")
        ax.set_ylabel("latitude (°)")
    else:
        ax.set_xlabel(f"easting ({unit}, {crs_name})")
        ax.set_ylabel(f"northing ({unit})")
    ax.set_aspect("equal")
    return im


def scene(source, *, ax=None, bands=None, profile: str | None = None, stretch=None, title: str = "scene",
          max_size: int = MAX_SIZE):
    """Draw the scene in RGB with the run's (or sensor profile's) stretch; returns the axes.

    ``source``: as :func:`rgb_image` takes it."""
    ax = _axes(ax)
    draw(ax, rgb_image(source, bands=bands, profile=profile, stretch=stretch, max_size=max_size))
    ax.set_title(title)
    return ax


def canopy(source, *, ax=None, vmax: float | None = None, cmap: str = HEIGHT_CMAP, colorbar: bool = True,
           title: str = "canopy height", max_size: int = MAX_SIZE):
    """Draw canopy height in metres (nodata transparent) with a metres colourbar; returns the axes."""
    image = height_image(source, max_size)
    finite = image.data[np.isfinite(image.data)]
    if vmax is None:
        vmax = max(1.0, float(np.ceil(np.percentile(finite, 99)))) if finite.size else 1.0
    return _continuous(image, ax, cmap, 0.0, vmax, "canopy height (m)" if colorbar else None, title)


def values(data, *, ax=None, cmap: str = "magma", vmin: float | None = None, vmax: float | None = None,
           label: str | None = None, title: str | None = None, max_size: int = MAX_SIZE):
    """Draw any continuous (y, x) DataArray with CRS (similarity, a probability ...) on map axes
    with a colourbar labelled ``label`` (default: its long_name and units); NaN transparent."""
    var = _variable(data, "")
    if var is None:
        raise InputError("values() draws a (y, x) DataArray with a CRS")
    image = MapImage(*_decimate(var, max_size))
    image = replace(image, data=image.data.astype(np.float32))
    units = var.attrs.get("units")
    label = label or " ".join(filter(None, [var.attrs.get("long_name", var.name or ""),
                                            f"({units})" if units and units != "1" else ""]))
    return _continuous(image, ax, cmap, vmin, vmax, label, title if title is not None else str(var.name or ""))


def _continuous(image: MapImage, ax, cmap: str, vmin, vmax, label: str | None, title: str):
    import matplotlib

    colours = matplotlib.colormaps[cmap].copy()
    colours.set_bad((0, 0, 0, 0))
    ax = _axes(ax)
    im = draw(ax, replace(image, data=np.ma.masked_invalid(image.data)), cmap=colours, vmin=vmin, vmax=vmax)
    if label is not None:
        ax.figure.colorbar(im, ax=ax, label=label, shrink=0.85)
    ax.set_title(title)
    return ax


def landcover(source, *, ax=None, classes: ClassTable | None = None, legend: bool = True,
              title: str = "land cover", max_size: int = MAX_SIZE):
    """Draw land cover in the class table's colours, class names in a legend outside the map."""
    from matplotlib.patches import Patch

    image, classes = class_image(source, classes, max_size)
    ax = _axes(ax)
    draw(ax, image)
    if legend:
        handles = [Patch(facecolor=np.array(c.color) / 255, edgecolor="0.3", linewidth=0.5, label=c.name)
                   for c in classes.classes]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  frameon=False, fontsize=8, title="class")
    ax.set_title(title)
    return ax


def side_by_side(source, *, scene_source=None, stretch=None, max_size: int = MAX_SIZE, panel_size: float = 4.5,
                 pyplot: bool = True):
    """The scene, canopy height and land cover that ``source`` has, side by side on shared map axes.

    ``source``: a run_scene Dataset, an output folder, or {output name: GeoTIFF} (e.g.
    ``{"canopy_height": ..., "landcover": ...}``).
    ``scene_source``: where to read the scene when ``source`` does not record it (a scene file,
    DataArray or Scene; ``stretch`` its (lo, hi)). Returns the figure. ``pyplot=False``: a
    figure that pyplot does not manage (never shown, no close needed; for saving from any
    thread, as the quicklook does).
    """
    panels = []
    rgb_from = scene_source if scene_source is not None else source
    if scene_source is not None or _scene_reference(source) is not None:
        panels.append(lambda ax: scene(rgb_from, ax=ax, stretch=stretch, max_size=max_size))
    if _has(source, "canopy_height"):
        panels.append(lambda ax: canopy(source, ax=ax, max_size=max_size))
    if _has(source, "landcover"):
        panels.append(lambda ax: landcover(source, ax=ax, max_size=max_size))
    if not panels:
        raise InputError(f"nothing to draw in {source if isinstance(source, (str, Path)) else type(source).__name__}")
    if pyplot:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(panel_size * len(panels) + 1.5, panel_size), layout="constrained")
    else:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(panel_size * len(panels) + 1.5, panel_size), layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)
    for draw_panel, ax in zip(panels, axes[0]):
        draw_panel(ax)
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    return fig


def _has(source, name: str) -> bool:
    import xarray as xr

    if isinstance(source, xr.Dataset):
        return name in source
    if _file_map(source):
        return name in source
    return isinstance(source, (str, Path)) and Path(source).is_dir() and (Path(source) / f"{name}.tif").exists()

__all__ = [
    "MapImage",
    "canopy",
    "class_codes",
    "class_colors",
    "class_image",
    "class_table_of",
    "draw",
    "height_image",
    "landcover",
    "map_units",
    "rgb_image",
    "scene",
    "side_by_side",
    "values",
]
