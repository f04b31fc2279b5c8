"""Class rasters to polygons: one polygon per 4-connected region of a class, with its area.

:func:`polygonize` writes a land-cover GeoPackage (class code, class name, area in m²). The
regions are traced by GDAL's polygoniser, reached in one of two ways:

- **GDAL's C ``GDALPolygonize``, through ctypes** (the fast path). rasterio exposes the
  polygoniser only as ``rasterio.features.shapes``, which needs the class array in memory and
  turns every polygon into a GeoJSON dict of Python tuples (about 1 µs per vertex: for a
  scene's millions of vertices, more than GDAL's tracing itself). The C function reads the raster row by row
  itself (memory grows with the width and the number of polygons, not with the area), so it
  runs once over the whole raster: no strips, no merging of pieces cut at strip borders. Its
  polygons go into an in-memory OGR layer and come back as WKB, which ``shapely.from_wkb``
  turns into geometries in one vectorised call. GDAL's own Python bindings (``osgeo``) would
  do the same, but they are not pip-installable without a matching system GDAL, so the C
  functions are called through ctypes, on the libgdal that rasterio itself has loaded
  (resolved through rasterio's extension module, never a second copy of GDAL: rasterio's
  registered drivers and ``rasterio.Env`` settings apply). ctypes releases the GIL during each
  call, so other threads (e.g. the COG conversions next to which the pipeline runs this) go on.
- **``rasterio.features.shapes`` in strips of rows** (the reference path), when that library
  cannot be reached (e.g. Windows, where a module's handle does not resolve symbols of the
  libraries it links) or the raster is not of an integer type the C polygoniser takes
  exactly. Pieces that a strip border cuts are merged with their neighbours of the same
  class, so both paths give the same polygons.

:func:`trace_array` does the same for a label array in memory (tree crowns, change regions):
what ``rasterio.features.shapes`` gives, as shapely polygons, without the GeoJSON in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
from rasterio.windows import Window

from geodino.classes import ClassTable
from geodino.export import atomic_path, check_writable
from geodino.units import pixel_area_m2

# pixel types GDALPolygonize reads into 32-bit integers without changing a value
EXACT_DTYPES = ("uint8", "int8", "uint16", "int16", "int32")


def polygonize(raster: str | os.PathLike, out: str | os.PathLike, classes: ClassTable, *,
               min_area: float = 0.0, overwrite: bool = False, strip_rows: int = 2048,
               pixels: str | os.PathLike | None = None) -> Path:
    """Vectorise a class raster into a GeoPackage of polygons with class code, name and area (m²).

    One polygon per 4-connected region of one class; pixels equal to the raster's nodata (or,
    if it declares none, ``classes.nodata``) belong to none. Areas are in m² in the raster's
    CRS, or in an estimated UTM zone if it is geographic; polygons smaller than ``min_area``
    are left out. Rows are sorted by class code, then area (largest first), then position (top,
    then left). ``strip_rows`` bounds memory on the reference path only (see the module).
    ``pixels``: a flat copy of ``raster``'s pixels (:class:`geodino.rawpixels.RawPixels`),
    read instead of ``raster``'s own (same polygons, read faster); georeferencing, nodata and
    CRS still come from ``raster``, whose pixels are then never read.
    """
    import shapely

    out = Path(out)
    check_writable([out], overwrite)
    with rasterio.open(raster) as src:
        nodata = src.nodata if src.nodata is not None else classes.nodata
        crs, transform = src.crs, src.transform
        traced = _trace_with_gdal(src, nodata, pixels)
        if traced is None:
            with _pixels_of(src, pixels) as data:
                traced = (*_trace_with_shapes(data, nodata, strip_rows, transform), None)
        codes, geoms, wkb = traced
    if crs is not None and crs.is_projected:
        # a region is whole pixels: its area is a pixel count times the pixel's area, exactly.
        # GEOS sums products of coordinates far from the origin, which leaves ~1e-12 of noise
        # that depends on where a ring starts: regions of equal size would sort by chance.
        # In m² whatever the CRS's unit (feet on State Plane grids)
        pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
        areas = np.rint(shapely.area(geoms) / pixel_area) * pixel_area_m2(crs, transform)
    else:
        import geopandas as gpd

        series = gpd.GeoSeries(geoms, crs=crs)
        areas = series.to_crs(series.estimate_utm_crs()).area.to_numpy()
    keep = areas >= min_area if min_area > 0 else np.ones(len(codes), bool)
    order = np.flatnonzero(keep)[_sort_order(codes[keep], areas[keep], geoms[keep])]
    names = {c.code: c.name for c in classes.classes}
    with atomic_path(out) as tmp:
        _write_layer(tmp, crs, codes[order], [names.get(int(c), f"class {c}") for c in codes[order]], areas[order],
                     wkb[order] if wkb is not None else shapely.to_wkb(geoms[order]))
    return out


def _write_layer(path: Path, crs, codes: np.ndarray, names: list[str], areas: np.ndarray, wkb: np.ndarray) -> None:
    """The GeoPackage layer "landcover", written by pyogrio from the polygons' WKB as traced.

    What ``GeoDataFrame.to_file`` writes (same engine, fields and CRS definition), without
    turning GDAL's WKB into geometries and back (a third of the polygon step's time at 8192²).
    """
    import pyogrio.raw
    from pyproj import CRS

    pyogrio.raw.write(path, geometry=np.asarray(wkb, dtype=object),
                      field_data=[np.asarray(codes, np.int64), np.asarray(names, dtype=object),
                                  np.asarray(areas, np.float64)],
                      fields=["class_code", "class_name", "area_m2"], layer="landcover", driver="GPKG",
                      geometry_type="Polygon", crs=None if crs is None else CRS.from_user_input(crs).to_wkt("WKT1_GDAL"))


@contextlib.contextmanager
def _pixels_of(src, pixels):
    """The dataset to read ``src``'s pixels from: ``src`` itself, or its flat copy."""
    if pixels is None:
        yield src
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # the copy has no georeference
        with rasterio.open(pixels) as copy:
            if (copy.width, copy.height) != (src.width, src.height):
                raise ValueError(f"{pixels}: not a copy of {src.name} ({src.width} x {src.height})")
            yield copy


def _sort_order(codes: np.ndarray, areas: np.ndarray, geoms) -> np.ndarray:
    """Row order: class code, then area (largest first), then position for equal areas.

    Most regions share their area with another of their class (single pixels, above all).
    Their order is fixed by each one's top left corner, so it does not depend on the order
    they were traced in. Only those are searched for their corner: the big regions, which
    hold most vertices, rarely share an area.
    """
    top, left = np.zeros(len(codes)), np.zeros(len(codes))
    by = np.lexsort((-areas, codes))
    same = (codes[by][1:] == codes[by][:-1]) & (areas[by][1:] == areas[by][:-1])
    tied = np.zeros(len(codes), bool)
    tied[by[1:][same]] = tied[by[:-1][same]] = True
    if tied.any():
        top[tied], left[tied] = _top_left(np.asarray(geoms)[tied])
    return np.lexsort((left, -top, -areas, codes))


def _top_left(geoms) -> tuple[np.ndarray, np.ndarray]:
    """Each polygon's topmost vertex (the leftmost of them): a key no two regions share.

    The pixel below and right of that vertex (on a north-up grid) is the region's own. Holes
    never reach the top of their polygon, so all rings may be searched.
    """
    import shapely

    xy, which = shapely.get_coordinates(geoms, return_index=True)
    top = shapely.bounds(geoms)[:, 3]
    on_top = xy[:, 1] == top[which]
    left = np.full(len(geoms), np.inf)
    np.minimum.at(left, which[on_top], xy[on_top, 0])
    return top, left


# --------------------------------------------------------------------------------------
# fast path: GDAL's C polygoniser on rasterio's libgdal

GDAL_OF_RASTER, GDAL_OF_VERBOSE_ERROR = 0x02, 0x40
OFT_INTEGER, WKB_POLYGON, WKB_NDR = 0, 3, 1
GDT_UNKNOWN, GDT_BYTE, GDT_INT32, GF_WRITE = 0, 1, 5, 1

_SIGNATURES = {  # name: (restype, argtypes); handles are opaque pointers
    "GDALVersionInfo": (ctypes.c_char_p, [ctypes.c_char_p]),
    "GDALGetDriverByName": (ctypes.c_void_p, [ctypes.c_char_p]),
    "GDALGetMetadataItem": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
    "GDALOpenEx": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p]),
    "GDALClose": (None, [ctypes.c_void_p]),
    "GDALGetRasterBand": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
    "GDALGetRasterXSize": (ctypes.c_int, [ctypes.c_void_p]),
    "GDALGetRasterYSize": (ctypes.c_int, [ctypes.c_void_p]),
    "GDALCreate": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p]),
    "GDALDatasetCreateLayer": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int,
                                                 ctypes.c_void_p]),
    "OGR_Fld_Create": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]),
    "OGR_Fld_Destroy": (None, [ctypes.c_void_p]),
    "OGR_L_CreateField": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
    "GDALPolygonize": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p, ctypes.c_void_p]),
    "OGR_L_ResetReading": (None, [ctypes.c_void_p]),
    "OGR_L_GetNextFeature": (ctypes.c_void_p, [ctypes.c_void_p]),
    "OGR_F_GetFieldAsInteger": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "OGR_F_GetGeometryRef": (ctypes.c_void_p, [ctypes.c_void_p]),
    "OGR_F_Destroy": (None, [ctypes.c_void_p]),
    "OGR_G_WkbSize": (ctypes.c_int, [ctypes.c_void_p]),
    "OGR_G_ExportToWkb": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]),
    "CPLGetLastErrorMsg": (ctypes.c_char_p, []),
    "GDALSetGeoTransform": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]),
    "GDALRasterIO": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_int]),
    "GDALGetCacheMax64": (ctypes.c_int64, []),
    "GDALSetCacheMax64": (None, [ctypes.c_int64]),
}


@functools.cache
def gdal_library() -> ctypes.CDLL | None:
    """rasterio's own libgdal as a ctypes library, or None where it cannot be reached.

    The symbols are looked up through the handle of rasterio's extension module, which the
    dynamic loader resolves in that module's own dependencies: the libgdal rasterio linked
    (wheel-vendored or system), whatever other copies of GDAL the process holds (pyogrio's
    wheel brings one). The version it reports must be rasterio's.
    """
    import importlib

    for name in ("rasterio._base", "rasterio._features"):
        try:
            module = importlib.import_module(name)
            lib = ctypes.CDLL(module.__file__)  # already loaded: the same handle, nothing new loads
            for fn, (restype, argtypes) in _SIGNATURES.items():
                getattr(lib, fn).restype = restype
                getattr(lib, fn).argtypes = argtypes
        except (ImportError, OSError, AttributeError, TypeError):
            continue
        if (lib.GDALVersionInfo(b"RELEASE_NAME") or b"").decode() == rasterio.__gdal_version__:
            return lib
    return None


def _vector_memory_driver(lib) -> int | None:
    """GDAL's in-memory vector driver: "MEM" from GDAL 3.11 on, "Memory" before."""
    for name in (b"MEM", b"Memory"):
        drv = lib.GDALGetDriverByName(name)
        if drv and lib.GDALGetMetadataItem(drv, b"DCAP_VECTOR", None) == b"YES":
            return drv
    return None


def _trace_with_gdal(src, nodata, pixels=None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(class codes, polygons, their WKB) of ``src``'s band 1 by GDAL's C polygoniser; None where it cannot run.

    ``pixels``: a flat raw copy of that band to read instead, georeferenced by ``src``."""
    lib = gdal_library()
    if lib is None or src.dtypes[0] not in EXACT_DTYPES:
        return None
    bh, bw = src.block_shapes[0]
    row_of_blocks = -(-src.width // bw) * bw * bh * np.dtype(src.dtypes[0]).itemsize
    path, georef = (os.fsencode(src.name), None) if pixels is None else (os.fsencode(pixels), src.name)
    with rasterio.Env(), _block_cache_at_least(lib, 2 * row_of_blocks if pixels is None else 0):
        ds = lib.GDALOpenEx(path, GDAL_OF_RASTER | GDAL_OF_VERBOSE_ERROR, None, None, None)
        if not ds:
            return None
        try:
            band = lib.GDALGetRasterBand(ds, 1)
            if pixels is not None and (lib.GDALGetRasterXSize(ds), lib.GDALGetRasterYSize(ds)) != (src.width,
                                                                                                  src.height):
                raise ValueError(f"{pixels}: not a copy of {src.name} ({src.width} x {src.height})")
            # no mask: nodata regions are traced like any class and dropped after. Their pixels
            # end the regions next to them all the same, and a nodata mask band would read
            # every row a second time (1.8 s instead of 2.2 s on the 8192² benchmark map)
            return _polygonize_band(lib, band, None, skip=nodata, name=src.name, georef=georef)
        finally:
            lib.GDALClose(ds)


def trace_array(data: np.ndarray, mask: np.ndarray | None = None, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """(values, polygons): one polygon per 4-connected region of equal values of ``data`` where
    ``mask`` is true, with vertices mapped through ``transform`` (an Affine; default identity).

    What ``rasterio.features.shapes(data, mask, connectivity=4, transform=transform)`` gives,
    as int64 values and an array of shapely polygons, without the GeoJSON dicts in between
    (GDAL's C polygoniser on in-memory rasters; ``shapes`` itself where it cannot be reached).
    """
    from affine import Affine

    transform = Affine.identity() if transform is None else transform
    lib = gdal_library()
    driver = lib.GDALGetDriverByName(b"MEM") if lib is not None else None
    traced = None
    if driver and data.dtype.name in EXACT_DTYPES:
        with contextlib.ExitStack() as stack:
            bands = [_memory_band(lib, driver, np.ascontiguousarray(data, np.int32), GDT_INT32, transform, stack),
                     None if mask is None else
                     _memory_band(lib, driver, np.ascontiguousarray(mask, np.uint8), GDT_BYTE, transform, stack)]
            if bands[0] and (mask is None or bands[1]):
                traced = _polygonize_band(lib, bands[0], bands[1], skip=None, name="in-memory raster")
    if traced is not None:
        return traced[:2]
    from rasterio.features import shapes

    pairs = [(int(v), _polygon(g)) for g, v in shapes(data, mask=mask, connectivity=4, transform=transform)]
    return np.asarray([v for v, _ in pairs], np.int64), np.asarray([g for _, g in pairs], dtype=object)


def _memory_band(lib, driver, array: np.ndarray, gdal_type: int, transform, stack) -> int | None:
    """A one-band in-memory GDAL raster holding a copy of ``array`` (closed by ``stack``)."""
    h, w = array.shape
    ds = lib.GDALCreate(driver, b"", w, h, 1, gdal_type, None)
    if not ds:
        return None
    stack.callback(lib.GDALClose, ds)
    lib.GDALSetGeoTransform(ds, (ctypes.c_double * 6)(*transform.to_gdal()))
    band = lib.GDALGetRasterBand(ds, 1)
    if lib.GDALRasterIO(band, GF_WRITE, 0, 0, w, h, array.ctypes.data, w, h, gdal_type, 0, 0) != 0:
        return None
    return band


def _polygonize_band(lib, band, mask, *, skip, name: str, georef: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(values, polygons, their WKB) of ``band`` (pixels where ``mask`` is not 0), regions of value ``skip``
    left out; None if GDAL has no in-memory vector driver. ``georef``: a raster whose
    geotransform maps the vertices (default: the band's own dataset's)."""
    import shapely

    drv = _vector_memory_driver(lib)
    mem = lib.GDALCreate(drv, b"", 0, 0, 0, GDT_UNKNOWN, None) if drv else None
    if not mem:
        return None
    try:
        layer = lib.GDALDatasetCreateLayer(mem, b"regions", None, WKB_POLYGON, None)
        field = lib.OGR_Fld_Create(b"value", OFT_INTEGER)
        lib.OGR_L_CreateField(layer, field, 1)
        lib.OGR_Fld_Destroy(field)
        options = None
        if georef is not None:
            options = (ctypes.c_char_p * 2)(b"DATASET_FOR_GEOREF=" + os.fsencode(georef), None)
        if lib.GDALPolygonize(band, mask, layer, 0, options, None, None) != 0:
            raise rasterio.errors.RasterioIOError(
                f"{name}: GDAL could not polygonise it: {(lib.CPLGetLastErrorMsg() or b'').decode()}")
        values, wkbs = _features(lib, layer, skip)
    finally:
        lib.GDALClose(mem)
    wkbs = np.asarray(wkbs, dtype=object)
    return np.asarray(values, np.int64), shapely.from_wkb(wkbs), wkbs


@contextlib.contextmanager
def _block_cache_at_least(lib, nbytes: int):
    """GDAL's block cache raised to ``nbytes`` for the duration of the block, if it is smaller.

    The polygoniser reads one row at a time: a whole row of blocks must stay in the cache, or
    each block is decoded again for every one of its rows. Twice a row is asked for, as other
    threads (the pipeline's COG conversions) use the cache meanwhile. GDAL's cache size is one
    for the process; the earlier size comes back after, unless someone changed it meanwhile.
    Set with ``GDALSetCacheMax64`` (bytes), not the GDAL_CACHEMAX option, whose unit depends on
    who reads it (GDAL reads "16" as MB, ``rasterio.Env(GDAL_CACHEMAX=16)`` sets 16 bytes).
    """
    before = lib.GDALGetCacheMax64()
    if nbytes <= before:
        yield
        return
    lib.GDALSetCacheMax64(nbytes)
    try:
        yield
    finally:
        if lib.GDALGetCacheMax64() == nbytes:
            lib.GDALSetCacheMax64(before)


def _features(lib, layer, skip) -> tuple[list[int], list[bytes]]:
    """(value, WKB) of each feature of ``layer`` whose value is not ``skip``."""
    codes, wkbs = [], []
    buf = ctypes.create_string_buffer(1 << 16)  # reused: allocating one per feature costs more
    lib.OGR_L_ResetReading(layer)
    while feature := lib.OGR_L_GetNextFeature(layer):
        try:
            value = lib.OGR_F_GetFieldAsInteger(feature, 0)
            if value == skip:
                continue
            geom = lib.OGR_F_GetGeometryRef(feature)
            size = lib.OGR_G_WkbSize(geom)
            if size > len(buf):
                buf = ctypes.create_string_buffer(2 * size)
            lib.OGR_G_ExportToWkb(geom, WKB_NDR, buf)
            codes.append(value)
            wkbs.append(ctypes.string_at(buf, size))
        finally:
            lib.OGR_F_Destroy(feature)
    return codes, wkbs


# --------------------------------------------------------------------------------------
# reference path: rasterio.features.shapes in strips, pieces at strip borders merged


def _trace_with_shapes(src, nodata, strip_rows: int, t) -> tuple[np.ndarray, np.ndarray]:
    """(class codes, polygons) of ``src``'s band 1, read in strips of ``strip_rows`` rows,
    georeferenced by ``t`` (the raster's transform).

    Regions are traced in whole pixel coordinates of the raster, so that the pieces of a region
    that strip borders cut meet exactly, merge into one polygon, and lose the vertices the cuts
    left on straight edges (as GDAL does, tracing the whole raster). Pixel corners are then mapped
    to the map with GDAL's own arithmetic: the same coordinates, to the bit, as the fast path.
    """
    import pandas as pd
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    codes, geoms, on_border = [], [], []
    for row in range(0, src.height, strip_rows):
        h = min(strip_rows, src.height - row)
        data = src.read(1, window=Window(0, row, src.width, h))
        for geom, value in shapes(data, mask=data != nodata, connectivity=4, transform=Affine.translation(0, row)):
            g = _polygon(geom)
            _, top, _, bottom = g.bounds
            codes.append(int(value))
            geoms.append(g)
            # a region that reaches a strip border (not the raster's) may go on next door
            on_border.append((row > 0 and top == row) or (row + h < src.height and bottom == row + h))
    if not geoms:
        return np.zeros(0, np.int64), np.empty(0, dtype=object)
    pieces = pd.DataFrame({"class_code": np.asarray(codes, np.int64), "border": on_border})
    pieces["geometry"] = np.asarray(geoms, dtype=object)
    inner, cut = pieces[~pieces["border"]], pieces[pieces["border"]]
    merged = [(code, part) for code, group in cut.groupby("class_code")
              for part in shapely.get_parts(shapely.union_all(group["geometry"].to_numpy()))]
    codes = np.concatenate([inner["class_code"].to_numpy(), np.asarray([c for c, _ in merged], np.int64)])
    pixel_geoms = np.concatenate([inner["geometry"].to_numpy(),
                                  shapely.simplify(np.asarray([g for _, g in merged], dtype=object), 0)])
    # (x0 + col * dx) + row * rx, in this order, as GDAL's polygoniser georeferences vertices
    return codes, shapely.transform(pixel_geoms, lambda p: np.column_stack(
        [t.c + p[:, 0] * t.a + p[:, 1] * t.b, t.f + p[:, 0] * t.d + p[:, 1] * t.e]))


def _polygon(geojson: dict):
    """A shapely polygon from a GeoJSON polygon mapping (rings as arrays: 2x faster than shape())."""
    import shapely

    rings = [np.asarray(ring, dtype=np.float64) for ring in geojson["coordinates"]]
    return shapely.Polygon(rings[0], rings[1:])
