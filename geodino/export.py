"""Writing outputs: atomic file placement, GeoTIFF/COG export, class polygons."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
from rasterio.windows import Window

from geodino.classes import ClassTable
from geodino.errors import OutputExistsError


def partial_path(final: Path) -> Path:
    """Where an output is built before it is renamed into place (same folder, same suffix)."""
    return final.with_name(f".{final.stem}.partial-{uuid.uuid4().hex[:8]}{final.suffix}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    An exception (or an interrupt) removes the temporary file, so nothing half-written ever
    appears at the final path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".aux.xml"), tmp.with_name(tmp.name + ".ovr")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def check_writable(paths, overwrite: bool) -> None:
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace")


def polygonize(raster: str | os.PathLike, out: str | os.PathLike, classes: ClassTable, *,
               min_area: float = 0.0, overwrite: bool = False, strip_rows: int = 2048) -> Path:
    """Vectorise a class raster into a GeoPackage of polygons with class code, name and area (m²).

    The raster is read in strips of rows; pieces cut by a strip border are merged with their
    neighbours of the same class, so each connected region becomes one polygon.
    """
    import geopandas as gpd
    import shapely
    from rasterio.features import shapes

    out = Path(out)
    check_writable([out], overwrite)
    codes, geoms, on_border = [], [], []
    with rasterio.open(raster) as src:
        nodata = src.nodata if src.nodata is not None else classes.nodata
        crs = src.crs
        for row in range(0, src.height, strip_rows):
            h = min(strip_rows, src.height - row)
            win = Window(0, row, src.width, h)
            data = src.read(1, window=win)
            valid = data != nodata
            for geom, value in shapes(data, mask=valid, connectivity=4,
                                      transform=src.window_transform(win)):
                g = shapely.geometry.shape(geom)
                codes.append(int(value))
                geoms.append(g)
                # rows just inside a strip border, on either side, may continue next door
                top = row > 0 and _touches_row(g, src.transform, row)
                bottom = row + h < src.height and _touches_row(g, src.transform, row + h)
                on_border.append(top or bottom)
    gdf = gpd.GeoDataFrame({"class_code": codes, "border": on_border}, geometry=geoms, crs=crs)
    inner = gdf[~gdf["border"]]
    cut = gdf[gdf["border"]]
    if len(cut):
        merged = cut.dissolve(by="class_code").explode(index_parts=False).reset_index()
        gdf = gpd.GeoDataFrame(
            np_concat(inner[["class_code", "geometry"]], merged[["class_code", "geometry"]]), crs=crs
        )
    else:
        gdf = inner[["class_code", "geometry"]]
    gdf = gdf.reset_index(drop=True)
    names = {c.code: c.name for c in classes.classes}
    gdf["class_name"] = [names.get(int(c), f"class {c}") for c in gdf["class_code"]]
    area_crs = gdf.crs if gdf.crs is not None and gdf.crs.is_projected else gdf.estimate_utm_crs()
    gdf["area_m2"] = gdf.to_crs(area_crs).area if area_crs != gdf.crs else gdf.area
    if min_area > 0:
        gdf = gdf[gdf["area_m2"] >= min_area]
    gdf = gdf[["class_code", "class_name", "area_m2", "geometry"]].sort_values(
        ["class_code", "area_m2"], ascending=[True, False]).reset_index(drop=True)
    with atomic_path(out) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="landcover")
    return out


def _touches_row(geom, transform, row: int) -> bool:
    """Whether a polygon's boundary reaches the horizontal pixel edge at ``row``."""
    y = transform.f + transform.e * row
    minx, miny, maxx, maxy = geom.bounds
    return min(miny, maxy) - 1e-9 <= y <= max(miny, maxy) + 1e-9


def np_concat(a, b):
    import pandas as pd

    return pd.concat([a, b], ignore_index=True)
