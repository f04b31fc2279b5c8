"""Source rasters: opened with clear errors, checked for georeferencing, bands chosen by index
or name, several files combined (mosaic or band stack) as a GDAL VRT document.

What :func:`geodino.scene.open_scene` does before a :class:`geodino.scene.Scene` exists.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioIOError

from geodino.errors import InputError

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def _open_checked(path: str):
    p = Path(path)
    if not p.exists() and not str(path).startswith(("/vsi", "http://", "https://", "s3://", "<VRT")):
        raise InputError(f"{path}: file not found")
    if p.is_dir():
        raise InputError(f"{path}: is a folder, not a raster file")
    try:
        return rasterio.open(path)
    except RasterioIOError as e:
        raise InputError(f"{path}: not a raster GDAL can read ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_georeferenced(ds, label: str) -> None:
    if ds.width == 0 or ds.height == 0 or ds.count == 0:
        raise InputError(f"{label}: zero-size raster ({ds.width} x {ds.height}, {ds.count} bands)")
    if ds.crs is None:
        raise InputError(f"{label}: has no CRS; assign one (e.g. `rio edit-info --crs EPSG:32633 {label}`)")
    if ds.transform == Affine.identity() and not ds.gcps[0]:
        raise InputError(f"{label}: has no geotransform (pixel size and origin); georeference it first")
    if ds.gcps[0] and ds.transform == Affine.identity():
        raise InputError(f"{label}: is georeferenced by GCPs only; warp it to a grid first (gdalwarp)")
    if ds.dtypes[0] not in SUPPORTED_DTYPES:
        raise InputError(f"{label}: data type {ds.dtypes[0]} is not supported (use one of {', '.join(SUPPORTED_DTYPES)})")
    if ds.transform.b != 0 or ds.transform.d != 0:
        raise InputError(f"{label}: has a rotated geotransform; warp it north-up first")


def build_vrt(paths: Sequence[str], *, separate: bool) -> str:
    """A GDAL VRT document that mosaics ``paths`` (or stacks them as bands if ``separate``).

    All inputs must share CRS, resolution and data type; the VRT covers their union on the
    first file's pixel grid. GDAL performs the reading and merging.
    """
    infos = []
    for path in paths:
        with _open_checked(path) as ds:
            _check_georeferenced(ds, path)
            infos.append(dict(path=str(Path(path).resolve()), crs=ds.crs, transform=ds.transform, width=ds.width,
                              height=ds.height, count=ds.count, dtype=ds.dtypes[0], nodata=ds.nodata,
                              descriptions=ds.descriptions, block=ds.block_shapes[0]))
    first = infos[0]
    for info in infos[1:]:
        if info["crs"] != first["crs"]:
            raise InputError(f"{info['path']}: CRS {info['crs']} differs from {first['path']} ({first['crs']}); "
                             "reproject the files to one CRS first")
        if not np.allclose((info["transform"].a, info["transform"].e), (first["transform"].a, first["transform"].e)):
            raise InputError(f"{info['path']}: pixel size differs from {first['path']}; resample them to one resolution")
        if info["dtype"] != first["dtype"]:
            raise InputError(f"{info['path']}: data type {info['dtype']} differs from {first['path']} ({first['dtype']})")
        if separate and info["count"] != 1:
            raise InputError(f"{info['path']}: has {info['count']} bands; stacking takes single-band files")
        if not separate and info["count"] != first["count"]:
            raise InputError(f"{info['path']}: has {info['count']} bands, {first['path']} has {first['count']}")
    rx, ry = first["transform"].a, first["transform"].e
    lefts, tops, rights, bottoms = [], [], [], []
    for info in infos:
        t = info["transform"]
        lefts.append(t.c)
        tops.append(t.f)
        rights.append(t.c + info["width"] * t.a)
        bottoms.append(t.f + info["height"] * t.e)
    left, top = min(lefts), max(tops)
    # snap the union onto the first file's pixel lattice
    left = first["transform"].c + math.floor((left - first["transform"].c) / rx + 1e-6) * rx
    top = first["transform"].f + math.floor((top - first["transform"].f) / ry + 1e-6) * ry
    width = math.ceil((max(rights) - left) / rx - 1e-6)
    height = math.ceil((min(bottoms) - top) / ry - 1e-6)
    gdal_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
                 "float32": "Float32", "float64": "Float64"}[first["dtype"]]

    def source(info, band, data_type=gdal_type):
        t = info["transform"]
        xoff = round((t.c - left) / rx)
        yoff = round((t.f - top) / ry)
        nodata = "" if info["nodata"] is None else f"<NODATA>{info['nodata']!r}</NODATA>"
        bh, bw = info["block"]
        return (f'<ComplexSource><SourceFilename relativeToVRT="0">{escape(info["path"])}</SourceFilename>'
                f"<SourceBand>{band}</SourceBand>"
                f'<SourceProperties RasterXSize="{info["width"]}" RasterYSize="{info["height"]}" '
                f'DataType="{data_type}" BlockXSize="{bw}" BlockYSize="{bh}"/>'
                f'<SrcRect xOff="0" yOff="0" xSize="{info["width"]}" ySize="{info["height"]}"/>'
                f'<DstRect xOff="{xoff}" yOff="{yoff}" xSize="{info["width"]}" ySize="{info["height"]}"/>'
                f"{nodata}</ComplexSource>")

    bands_xml = []
    if separate:
        groups = [(i + 1, [(info, 1)], info["descriptions"][0] or Path(info["path"]).stem, info["nodata"])
                  for i, info in enumerate(infos)]
    else:
        groups = [(b, [(info, b) for info in infos], first["descriptions"][b - 1], first["nodata"])
                  for b in range(1, first["count"] + 1)]
    for band, sources, description, nodata in groups:
        nd = "" if nodata is None else f"<NoDataValue>{nodata!r}</NoDataValue>"
        desc = f"<Description>{escape(description)}</Description>" if description else ""
        bands_xml.append(f'<VRTRasterBand dataType="{gdal_type}" band="{band}">{desc}{nd}'
                         + "".join(source(i, b) for i, b in sources) + "</VRTRasterBand>")
    if not separate:
        # The dataset mask: each file's own mask where it lies, 0 where no file does. Without
        # it, pixels no file covers would read as valid zeros.
        mask_sources = "".join(
            source(info, "mask,1", "Byte").replace(f"<NODATA>{info['nodata']!r}</NODATA>", "")
            for info in infos)
        bands_xml.append(f'<MaskBand><VRTRasterBand dataType="Byte">{mask_sources}</VRTRasterBand></MaskBand>')
    t = Affine(rx, 0, left, 0, ry, top)
    geo = ", ".join(repr(v) for v in t.to_gdal())
    return (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
            f"<SRS>{escape(first['crs'].to_wkt())}</SRS><GeoTransform>{geo}</GeoTransform>"
            + "".join(bands_xml) + "</VRTDataset>")


def _match_band(ds, name: str, label: str) -> int:
    descriptions = [d or "" for d in ds.descriptions]
    lowered = [d.lower() for d in descriptions]
    key = name.strip().lower()
    if key in lowered:
        return lowered.index(key) + 1
    # whole-word match in descriptions ("B04 red" matches "red"), then colour interpretation
    hits = [i + 1 for i, d in enumerate(lowered) if key in d.replace("_", " ").replace("-", " ").split()]
    if len(hits) == 1:
        return hits[0]
    interp = {"red": ColorInterp.red, "green": ColorInterp.green, "blue": ColorInterp.blue,
              "alpha": ColorInterp.alpha}.get(key)
    if interp is not None and interp in ds.colorinterp:
        return list(ds.colorinterp).index(interp) + 1
    available = ", ".join(f"{i + 1}: {d or '(no description)'}" for i, d in enumerate(descriptions))
    raise InputError(f"{label}: no band named {name!r}; bands are {available}")


def resolve_bands(ds, bands: Sequence[int | str] | None, label: str) -> tuple[int, ...]:
    """1-based band indexes from indexes or descriptions; all bands (less alpha) when None."""
    if bands is None:
        alpha = [i + 1 for i, c in enumerate(ds.colorinterp) if c == ColorInterp.alpha]
        return tuple(b for b in range(1, ds.count + 1) if b not in alpha)
    out = []
    for b in bands:
        if isinstance(b, str) and b.strip().lstrip("-").isdigit():
            b = int(b)
        if isinstance(b, (int, np.integer)):
            if not 1 <= int(b) <= ds.count:
                raise InputError(f"{label}: band {b} does not exist (the file has {ds.count} bands, numbered 1-{ds.count})")
            out.append(int(b))
        else:
            out.append(_match_band(ds, str(b), label))
    return tuple(out)


__all__ = ["SUPPORTED_DTYPES", "build_vrt", "resolve_bands"]
