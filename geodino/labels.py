"""Training labels on a scene's processing grid: a raster on any grid or polygons, with classes.

A label raster on another grid is warped onto the scene's (WarpedVRT; averaged or by mode
when finer, interpolated or nearest otherwise); polygons are reprojected and rasterised
window by window. Class codes get a :class:`geodino.classes.ClassTable`: from the raster's
tags and colour table, from a name column beside the codes, as ESA WorldCover's when the
codes are WorldCover's, else generic names.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geodino.classes import WORLDCOVER, ClassTable, LandCoverClass
from geodino.errors import InputError
from geodino.tiling import Tile

VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".parquet")
NAME_COLUMNS = ("class_name", "name", "class", "label", "landcover", "land_cover")  # tried in order


class Labels:
    """Labels aligned to a scene's processing grid, read window by window.

    ``read`` returns float32 heights (NaN = unlabelled) or int64 class indexes (-1 = unlabelled).
    """

    def __init__(self, path: str, scene, task: str, classes: ClassTable | None = None,
                 class_column: str | None = None, name_column: str | None = None) -> None:
        self.path, self.scene, self.task = str(path), scene, task
        p = Path(path)
        if not p.exists():
            raise InputError(f"{path}: label file not found")
        self.vector = p.suffix.lower() in VECTOR_SUFFIXES
        self._ds = None
        if self.vector:
            self._open_vector(class_column, name_column, classes)
        else:
            self._open_raster(classes)

    # vector labels: reprojected, rasterised per window
    def _open_vector(self, column, name_column, classes) -> None:
        import geopandas as gpd

        try:
            gdf = gpd.read_file(self.path)
        except Exception as e:  # pyogrio raises its own error types
            raise InputError(f"{self.path}: cannot read as vector data ({str(e).splitlines()[0]})") from None
        if gdf.crs is None:
            raise InputError(f"{self.path}: has no CRS")
        if column is None:
            candidates = [c for c in ("class_code", "code", "id", "class", "height") if c in gdf.columns]
            if not candidates:
                raise InputError(f"{self.path}: say which column holds the {'class' if self.task == 'landcover' else 'height'}"
                                 f" with --class-column (columns: {', '.join(map(str, gdf.columns))})")
            column = candidates[0]
        if column not in gdf.columns:
            raise InputError(f"{self.path}: no column {column!r} (columns: {', '.join(map(str, gdf.columns))})")
        if name_column is not None and name_column not in gdf.columns:
            raise InputError(f"{self.path}: no column {name_column!r}")
        import pandas as pd

        if name_column is None and self.task == "landcover":
            # a text column beside the codes names the classes (e.g. `id` + `class`)
            texts = [c for c in NAME_COLUMNS if c in gdf.columns and c != column
                     and not pd.api.types.is_numeric_dtype(gdf[c])]
            name_column = texts[0] if texts else None
        values = gdf[column]

        if not pd.api.types.is_numeric_dtype(values):
            raise InputError(f"{self.path}: column {column!r} must hold numbers (class codes or heights); "
                             "use --name-column for class names")
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].to_crs(self.scene.grid.crs)
        self.gdf, self.column = gdf, column
        if self.task == "landcover":
            codes = sorted(int(v) for v in gdf[column].unique())
            names = {}
            if name_column:
                names = _names_by_code(gdf[column], gdf[name_column], f"{self.path}, column {name_column!r}")
            self.classes = classes or _table_for(codes, names)
        else:
            self.classes = None

    def _open_raster(self, classes) -> None:
        from geodino.sources import _open_checked

        src = _open_checked(self.path)
        if src.crs is None:
            raise InputError(f"{self.path}: label raster has no CRS")
        grid = self.scene.grid
        same = src.crs == grid.crs and src.transform == grid.transform and src.shape == grid.shape
        if same:
            self._ds = src
        else:
            finer = abs(src.transform.a) < abs(grid.transform.a) * 0.75 if src.crs == grid.crs else False
            if self.task == "canopy":
                resampling = Resampling.average if finer else Resampling.bilinear
                nodata = src.nodata if src.nodata is not None else np.nan
            else:
                resampling = Resampling.mode if finer else Resampling.nearest
                nodata = src.nodata if src.nodata is not None else 0
            self._ds = WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                                 height=grid.height, resampling=resampling, src_nodata=src.nodata, nodata=nodata)
        if self.task == "landcover":
            self.classes = classes or _table_from_raster(src)
        else:
            self.classes = None

    def read_codes(self, window: Window) -> np.ndarray:
        """Raw label values on the grid (class codes or heights), NaN/0 where unlabelled."""
        h, w = int(window.height), int(window.width)
        if self.vector:
            from rasterio.features import rasterize

            transform = self.scene.grid.window_transform(window)
            west, north = transform.c, transform.f
            east, south = west + w * transform.a, north + h * transform.e
            hits = self.gdf.iloc[list(self.gdf.sindex.query(_box(west, south, east, north)))]
            fill = np.nan if self.task == "canopy" else 0
            dtype = "float32" if self.task == "canopy" else "int32"
            if len(hits) == 0:
                return np.full((h, w), fill, dtype)
            shapes = zip(hits.geometry, hits[self.column].astype(float if self.task == "canopy" else int))
            return rasterize(shapes, out_shape=(h, w), transform=transform, fill=fill, dtype=dtype)
        data = self._ds.read(1, window=window, boundless=False, masked=True)
        if self.task == "canopy":
            return data.astype(np.float32).filled(np.nan)
        return data.astype(np.int64).filled(0)

    def read(self, tile: Tile) -> np.ndarray:
        """Labels of a window as targets; the part outside the scene is unlabelled."""
        grid = self.scene.grid
        ih, iw = min(tile.size, grid.height - tile.row), min(tile.size, grid.width - tile.col)
        raw = self.read_codes(Window(tile.col, tile.row, iw, ih))
        if self.task == "canopy":
            out = np.full((tile.size, tile.size), np.nan, np.float32)
            out[:ih, :iw] = raw
            return out
        lut = np.full(max(256, int(raw.max(initial=0)) + 1), -1, np.int64)
        lut[np.asarray(self.classes.codes)] = np.arange(len(self.classes))
        out = np.full((tile.size, tile.size), -1, np.int64)
        out[:ih, :iw] = lut[np.clip(raw, 0, len(lut) - 1)]
        return out


def _names_by_code(codes, names, label: str) -> dict[int, str]:
    """Each class code's name: the one most of its polygons carry. Real label files have slips
    (a polygon of code 5 named like code 4); those are reported, not silently taken."""
    from collections import Counter

    counts: dict[int, Counter] = {}
    for c, n in zip(codes, names):
        counts.setdefault(int(c), Counter())[str(n)] += 1
    majority = {c: cnt.most_common(1)[0] for c, cnt in counts.items()}
    out = {}
    for c, cnt in counts.items():
        top = [n for n, k in cnt.items() if k == majority[c][1]]
        # a tie: prefer a name no other code goes by
        free = [n for n in top if all(majority[o][0] != n for o in counts if o != c)]
        out[c] = min(free or top)
    mixed = {c: dict(cnt) for c, cnt in counts.items() if len(cnt) > 1}
    if mixed:
        warnings.warn(f"{label}: some class codes carry several names {mixed}; using "
                      f"{ {c: out[c] for c in mixed} }", stacklevel=3)
    return out


def _box(west, south, east, north):
    from shapely.geometry import box

    return box(min(west, east), min(south, north), max(west, east), max(south, north))


def _table_for(codes: Sequence[int], names: dict | None = None) -> ClassTable:
    codes = [c for c in codes if c != 0]
    if not codes:
        raise InputError("the labels hold no class codes other than 0 (nodata)")
    if set(codes) <= set(WORLDCOVER.codes) and not names:
        # WorldCover codes: its names and colours, for the classes present
        return ClassTable(tuple(c for c in WORLDCOVER.classes if c.code in codes))
    rng = np.random.default_rng(0)
    return ClassTable(tuple(LandCoverClass(int(c), (names or {}).get(int(c), f"class {c}"),
                                           tuple(int(v) for v in rng.integers(30, 230, 3))) for c in codes))


def _table_from_raster(src) -> ClassTable:
    tags = src.tags(1)
    if "class_codes" in tags and "class_names" in tags:
        codes = [int(c) for c in tags["class_codes"].split(",")]
        names = tags["class_names"].split(",")
        try:
            cmap = src.colormap(1)
        except ValueError:
            cmap = {}
        return ClassTable(tuple(LandCoverClass(c, n, tuple(cmap.get(c, (128, 128, 128, 255))[:3]))
                                for c, n in zip(codes, names)), nodata=int(src.nodata or 0))
    # codes present, from a decimated read
    step = max(1, int(math.sqrt(src.width * src.height / 4e6)))
    data = src.read(1, out_shape=(max(1, src.height // step), max(1, src.width // step)),
                    resampling=Resampling.nearest)
    codes = [int(c) for c in np.unique(data) if c != (src.nodata if src.nodata is not None else 0)]
    return _table_for(codes)


__all__ = ["NAME_COLUMNS", "VECTOR_SUFFIXES", "Labels"]
