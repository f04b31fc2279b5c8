"""Change as polygons and tables, read back from the written change rasters strip by strip.

- :func:`change_polygons`: canopy loss, partial canopy loss and gain (the classes of
  ``canopy_change_class.tif``), and land-cover transitions (from != to), one polygon per
  4-connected region, with area and the mean, minimum and maximum height change inside it.
- :func:`transition_matrix`: pixels per (from, to) class pair over valid pixels.
- :func:`canopy_summary`, :func:`embedding_summary`: figures for the report.

Rasters are read in strips of rows, at most about a million pixels each (memory bounded
whatever the scene's width); regions inside a strip below the minimum area are dropped as
they are found. Regions are labelled with ``skimage.measure.label`` and traced by GDAL's
polygoniser (:func:`geodino.vectorize.trace_array`) on the same 4-connectivity; pieces cut
by a strip border are merged with their neighbours of the
same kind (dissolve, then explode) and their pixel statistics summed, so a region crossing
strips becomes one polygon with exact statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geodino.change_maps import (
    CANOPY_CHANGE_CLASSES,
    GAIN,
    LOSS,
    NO_CHANGE,
    PARTIAL_LOSS,
    transition_table,
)
from geodino.classes import ClassTable

STRIP_ROWS = 512  # rows read at a time, at most ...
STRIP_PIXELS = 2048 * 512  # ... and fewer on wide scenes, so that a strip's arrays do not grow with the width
MIN_STRIP_ROWS = 64


@dataclass(frozen=True)
class Step:
    """One band of the change rasters: from date ``date_from`` to ``date_to``."""

    band: int
    date_from: str
    date_to: str

    @property
    def label(self) -> str:
        return f"{self.date_from} -> {self.date_to}"


def _strip_rows(width: int) -> int:
    if width * STRIP_ROWS <= STRIP_PIXELS:
        return STRIP_ROWS
    return max(MIN_STRIP_ROWS, STRIP_PIXELS // width)


def _strips(src) -> list[Window]:
    rows = _strip_rows(src.width)
    return [Window(0, r, src.width, min(rows, src.height - r)) for r in range(0, src.height, rows)]


def _pieces(labels: np.ndarray, values: np.ndarray | None, row0: int, first_row: bool, last_row: bool):
    """Regions of one strip: (label, geometry, pixels, pixels with a value, sum, min, max of the
    values, touches a strip border).

    Geometries are in whole pixel coordinates of the scene (column, row), so that the edges
    two strips share are exactly equal and their pieces union into one polygon (in map
    coordinates, each strip's own transform rounds the shared edge differently).
    """
    from affine import Affine
    from skimage.measure import label as connected

    from geodino.vectorize import trace_array

    ids = connected(labels, background=0, connectivity=1).astype(np.int32)
    count = int(ids.max())
    if count == 0:
        return []
    inside = ids > 0
    idx = ids[inside]  # only the pixels in regions: usually a small share of the strip
    kind = np.zeros(count + 1, np.int64)
    kind[idx] = labels[inside]
    n = np.bincount(idx, minlength=count + 1)
    if values is not None:
        v = values[inside].astype(np.float64)
        finite = np.isfinite(v)
        sums = np.bincount(idx[finite], weights=v[finite], minlength=count + 1)
        nv = np.bincount(idx[finite], minlength=count + 1)
        # ufunc.at instead of scipy.ndimage.minimum/maximum, which argsort the whole strip
        # (12 of 20 s of a 4096² run's polygons)
        lo = np.full(count + 1, np.inf)
        hi = np.full(count + 1, -np.inf)
        np.minimum.at(lo, idx[finite], v[finite])
        np.maximum.at(hi, idx[finite], v[finite])
    out = []
    height = labels.shape[0]
    for i, g in zip(*trace_array(ids, ids > 0, Affine.translation(0, row0))):
        i = int(i)
        _, top, _, bottom = g.bounds
        border = (not first_row and top == row0) or (not last_row and bottom == row0 + height)
        if values is not None and nv[i] > 0:
            stats = (int(n[i]), float(nv[i]), float(sums[i]), float(lo[i]), float(hi[i]))
        else:
            stats = (int(n[i]), 0.0, np.nan, np.nan, np.nan)
        out.append((int(kind[i]), g, *stats, border))
    return out


def _regions(pieces: list, crs):
    """GeoDataFrame of regions (label, geometry, pixels, valued, sum, min, max), border pieces merged."""
    import geopandas as gpd
    import pandas as pd

    cols = ["label", "geometry", "pixels", "valued", "sum", "min", "max", "border"]
    if not pieces:
        return gpd.GeoDataFrame({c: [] for c in cols[:1] + cols[2:-1]}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    gdf = gpd.GeoDataFrame(pd.DataFrame(pieces, columns=cols), geometry="geometry", crs=crs)
    inner = gdf[~gdf["border"]].drop(columns="border")
    cut = gdf[gdf["border"]].drop(columns="border")
    if not len(cut):
        return inner.reset_index(drop=True)
    merged = cut[["label", "geometry"]].dissolve(by="label").explode(index_parts=False).reset_index()
    merged["region"] = np.arange(len(merged))
    points = cut.copy()
    points["geometry"] = cut.representative_point()
    joined = gpd.sjoin(points, merged[["region", "label", "geometry"]], predicate="within")
    joined = joined[joined["label_left"] == joined["label_right"]]
    agg = joined.groupby("region").agg(pixels=("pixels", "sum"), valued=("valued", "sum"), sum=("sum", "sum"),
                                       min=("min", "min"), max=("max", "max"))
    merged = merged.join(agg, on="region").drop(columns="region")
    return gpd.GeoDataFrame(pd.concat([inner, merged[inner.columns]], ignore_index=True), geometry="geometry",
                            crs=crs)


def _vectorise(read, width: int, height: int, transform, crs, min_area: float = 0.0):
    """Regions of the whole raster, strip by strip. A region inside one strip that is smaller than
    ``min_area`` m² is dropped at once (it can never grow): what is held is the polygons kept
    and the pieces on strip borders, not every speck (139,000 pieces of land-cover transition,
    most of a few pixels, were held at 8192², for 8,900 polygons of at least 10 m²)."""
    pieces = []
    rows = _strip_rows(width)
    starts = list(range(0, height, rows))
    min_pixels = min_area / abs(transform.a * transform.e - transform.b * transform.d)
    for k, row in enumerate(starts):
        h = min(rows, height - row)
        win = Window(0, row, width, h)
        labels, values = read(win)
        if not labels.any():
            continue
        # columns of a piece: label, geometry, pixels, valued, sum, min, max, border
        pieces += [p for p in _pieces(labels, values, row, k == 0, k == len(starts) - 1)
                   if p[7] or p[2] >= min_pixels]
    regions = _regions(pieces, crs)
    # pixel (column, row) -> map coordinates
    regions["geometry"] = regions.geometry.affine_transform(
        [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f])
    return regions


def change_polygons(steps: list[Step], *, canopy: Path | None, canopy_classes: Path | None,
                    transitions: Path | None, classes: ClassTable | None, min_area: float = 0.0):
    """Polygons of the canopy change classes (loss, partial loss, gain: ``canopy_classes``, with
    the height change from ``canopy``) and of land-cover transitions for every step, at least
    ``min_area`` m² each."""
    import geopandas as gpd
    import pandas as pd

    sources = {}
    if canopy is not None:
        sources["canopy"] = rasterio.open(canopy)
        sources["canopy_classes"] = rasterio.open(canopy_classes)
    if transitions is not None:
        sources["transitions"] = rasterio.open(transitions)
    try:
        ref = next(iter(sources.values()))
        frames = []
        for step in steps:
            if "canopy" in sources:
                src = sources["canopy"]

                def read_canopy(win, src=src, band=step.band):
                    lab = sources["canopy_classes"].read(band, window=win)
                    lab[lab == NO_CHANGE] = 0
                    return lab, src.read(band, window=win)

                gdf = _vectorise(read_canopy, ref.width, ref.height, ref.transform, ref.crs, min_area)
                names = {c.code: c.name for c in CANOPY_CHANGE_CLASSES.classes}
                gdf["type"] = [names[int(c)] for c in gdf["label"]]
                gdf["transition"] = ""
                frames.append(_finish(gdf, step))
            if "transitions" in sources:
                n = len(classes)
                unchanged = {1 + i * n + i for i in range(n)}

                def read_transitions(win, band=step.band, unchanged=unchanged):
                    codes = sources["transitions"].read(band, window=win)
                    lab = np.where(np.isin(codes, list(unchanged)), 0, codes)
                    dh = sources["canopy"].read(band, window=win) if "canopy" in sources else None
                    return lab, dh

                gdf = _vectorise(read_transitions, ref.width, ref.height, ref.transform, ref.crs, min_area)
                names = {c.code: c.name for c in transition_table(classes).classes}
                gdf["type"] = "land-cover transition"
                gdf["transition"] = [names.get(int(c), "") for c in gdf["label"]]
                frames.append(_finish(gdf, step))
    finally:
        for src in sources.values():
            src.close()
    columns = ["type", "transition", "date_from", "date_to", "step", "area_m2", "mean_height_change_m",
               "min_height_change_m", "max_height_change_m", "pixels"]
    frames = [f for f in frames if len(f)]
    if not frames:
        return gpd.GeoDataFrame({c: [] for c in columns}, geometry=gpd.GeoSeries([], crs=ref.crs), crs=ref.crs)
    out = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=ref.crs)
    if min_area > 0:
        out = out[out["area_m2"] >= min_area]
    out = out.sort_values(["step", "type", "area_m2"], ascending=[True, True, False], kind="stable")
    return out[columns + ["geometry"]].reset_index(drop=True)


def _finish(gdf, step: Step):
    gdf["date_from"], gdf["date_to"], gdf["step"] = step.date_from, step.date_to, step.label
    gdf["area_m2"] = gdf.geometry.area
    with np.errstate(invalid="ignore", divide="ignore"):
        gdf["mean_height_change_m"] = np.where(gdf["valued"] > 0, gdf["sum"] / gdf["valued"], np.nan)
    gdf["min_height_change_m"], gdf["max_height_change_m"] = gdf["min"], gdf["max"]
    gdf["pixels"] = gdf["pixels"].astype(np.int64)
    return gdf


def transition_matrix(path: Path, band: int, n_classes: int) -> np.ndarray:
    """Pixel counts (from, to) of one band of a transition raster (nodata left out)."""
    counts = np.zeros(n_classes * n_classes + 1, np.int64)
    with rasterio.open(path) as src:
        for win in _strips(src):
            counts += np.bincount(src.read(band, window=win).ravel(), minlength=counts.size)[:counts.size]
    return counts[1:].reshape(n_classes, n_classes)


def canopy_summary(change: Path, change_classes: Path, band: int) -> dict:
    """Valid, loss, partial-loss and gain pixel counts and mean changes of one step."""
    counts = np.zeros(GAIN + 1, np.int64)
    sums = np.zeros(GAIN + 1)
    total = 0.0
    with rasterio.open(change) as src, rasterio.open(change_classes) as cls:
        for win in _strips(src):
            dh = src.read(band, window=win).astype(np.float64)
            code = cls.read(band, window=win).ravel()
            finite = np.isfinite(dh.ravel()) & (code > 0)
            code, dh = code[finite], dh.ravel()[finite]
            total += dh.sum()
            counts += np.bincount(code, minlength=GAIN + 1)[:GAIN + 1]
            sums += np.bincount(code, weights=dh, minlength=GAIN + 1)[:GAIN + 1]
    valid = int(counts[1:].sum())

    def mean(k):
        return float(sums[k] / counts[k]) if counts[k] else None

    return {"valid_pixels": valid, "loss_pixels": int(counts[LOSS]), "partial_loss_pixels": int(counts[PARTIAL_LOSS]),
            "gain_pixels": int(counts[GAIN]), "mean_change_m": total / valid if valid else None,
            "mean_loss_m": mean(LOSS), "mean_partial_loss_m": mean(PARTIAL_LOSS), "mean_gain_m": mean(GAIN)}


def embedding_summary(path: Path, band: int) -> dict:
    """Mean and percentiles (to 0.005) of one embedding-change band over valid patches."""
    hist = np.zeros(400, np.int64)  # 0.005 bins over [0, 2]
    total, n = 0.0, 0
    with rasterio.open(path) as src:
        for win in _strips(src):
            v = src.read(band, window=win).astype(np.float64)
            v = v[np.isfinite(v)]
            n += v.size
            total += v.sum()
            hist += np.bincount(np.clip((v / 0.005).astype(np.int64), 0, 399), minlength=400)
    if not n:
        return {"valid_patches": 0}
    cdf = np.cumsum(hist) / n
    return {"valid_patches": n, "mean": round(total / n, 4),
            "p50": round(float(np.searchsorted(cdf, 0.5)) * 0.005, 3),
            "p95": round(float(np.searchsorted(cdf, 0.95)) * 0.005, 3)}


__all__ = ["Step", "canopy_summary", "change_polygons", "embedding_summary", "transition_matrix"]
