"""Change as polygons and tables, read back from the written change rasters in one pass.

- :func:`change_tables`: per step, in one pass over strips of rows (each raster read once):
  the canopy summary (valid, loss, partial-loss and gain pixels, mean changes), the
  land-cover transition matrix, and optionally the polygons of :func:`change_polygons`;
- :func:`change_polygons`: canopy loss, partial canopy loss and gain (the classes of
  ``canopy_change_class.tif``), and land-cover transitions (from != to), one polygon per
  4-connected region, with area and the mean, minimum and maximum height change inside it;
- :func:`embedding_summary`: figures for the report.

Rasters are read a row of their tiles at a time (each tile decoded once, whatever GDAL's
block cache holds) and labelled in strips of rows, at most about a million pixels each
(memory bounded whatever the scene's width). Regions are labelled with
``skimage.measure.label``; a region inside a strip below the minimum area is dropped before it
is traced (it cannot grow), the others are traced by GDAL's polygoniser
(:func:`geodino.vectorize.trace_array`) on the same 4-connectivity. Pieces cut by a strip
border are joined where their pixels touch across it (a graph of pieces, its connected
components: ``scipy.sparse.csgraph``), their geometries unioned and their pixel statistics
summed, so a region crossing strips becomes one polygon with exact statistics. Rows of tiles
may be processed on several threads (``workers``); by default one: labelling and the Python
around it hold the GIL, and on the 8192² bench pair two threads took as long as one (5.1 vs
4.9 s, 5 runs each) and held ~100 MB more.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
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
from geodino.units import pixel_area_m2

STRIP_ROWS = 512  # rows labelled at a time, at most ...
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


@dataclass
class _Pieces:
    """The regions of one map in one strip that are kept: those of at least the minimum area
    and those that reach a strip border (they may go on next door).

    ``stats``: (pixels, pixels with a value, sum, min, max of the values) per piece (sum 0,
    min +inf and max -inf where none has a value). ``top`` / ``bottom``: the piece of each
    pixel of the strip's first / last row (index into these pieces, -1 for none).
    """

    kinds: np.ndarray
    geoms: np.ndarray
    stats: np.ndarray
    top: np.ndarray
    bottom: np.ndarray


def _pieces(labels: np.ndarray, values: np.ndarray | None, row0: int, min_pixels: float, first_row: bool,
            last_row: bool) -> _Pieces | None:
    """The kept regions of one strip (None if it has none), traced in whole pixel coordinates of
    the scene (column, row), so that the edges two strips share are exactly equal and their
    pieces union into one polygon (in map coordinates, each strip's own transform rounds the
    shared edge differently)."""
    from affine import Affine
    from skimage.measure import label as connected

    from geodino.vectorize import trace_array

    ids = connected(labels, background=0, connectivity=1).astype(np.int32)
    count = int(ids.max())
    inside = ids > 0
    idx = ids[inside]  # only the pixels in regions: usually a small share of the strip
    n = np.bincount(idx, minlength=count + 1)
    keep = n >= min_pixels
    if not first_row:
        keep[ids[0]] = True
    if not last_row:
        keep[ids[-1]] = True
    keep[0] = False
    kept = np.flatnonzero(keep)
    if not len(kept):
        return None
    kind = np.zeros(count + 1, np.int64)
    kind[idx] = labels[inside]
    stats = np.zeros((count + 1, 5))
    stats[:, 0] = n
    stats[:, 3], stats[:, 4] = np.inf, -np.inf
    if values is not None:
        v = values[inside].astype(np.float64)
        finite = np.isfinite(v)
        at, v = idx[finite], v[finite]
        stats[:, 1] = np.bincount(at, minlength=count + 1)
        stats[:, 2] = np.bincount(at, weights=v, minlength=count + 1)
        # ufunc.at instead of scipy.ndimage.minimum/maximum, which argsort the whole strip
        np.minimum.at(stats[:, 3], at, v)
        np.maximum.at(stats[:, 4], at, v)
    # the specks left out are not traced at all (most regions of a land-cover transition map)
    traced, geoms = trace_array(ids, keep[ids], Affine.translation(0, row0))
    position = np.full(count + 1, -1, np.int64)
    position[kept] = np.arange(len(kept))
    if len(traced) != len(kept):
        raise AssertionError(f"GDAL traced {len(traced)} regions for {len(kept)} 4-connected ones")
    ordered = np.empty(len(kept), dtype=object)
    ordered[position[traced]] = geoms
    return _Pieces(kind[kept], ordered, stats[kept], position[ids[0]], position[ids[-1]])


def _regions(strips: list[_Pieces | None], crs):
    """GeoDataFrame of regions (label, geometry, pixels, valued, sum, min, max): the pieces of
    consecutive strips that touch across their border, with the same label, joined."""
    import geopandas as gpd
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    present = [p for p in strips if p is not None]
    if not present:
        return gpd.GeoDataFrame({c: [] for c in ("label", "pixels", "valued", "sum", "min", "max")},
                                geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    # index of each strip's first piece among all pieces
    offsets = np.cumsum([0] + [0 if p is None else len(p.kinds) for p in strips])
    kinds = np.concatenate([p.kinds for p in present])
    edges = []
    for k in range(1, len(strips)):
        above, below = strips[k - 1], strips[k]
        if above is None or below is None:
            continue
        a = above.bottom + offsets[k - 1]
        b = below.top + offsets[k]
        touch = (above.bottom >= 0) & (below.top >= 0)
        touch[touch] &= kinds[a[touch]] == kinds[b[touch]]
        edges.append(np.unique(np.stack([a[touch], b[touch]], axis=1), axis=0))
    m = len(kinds)
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    count, group = connected_components(coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m)),
                                        directed=False)
    stats = np.concatenate([p.stats for p in present])
    geoms = np.concatenate([p.geoms for p in present])
    first = np.full(count, m)
    np.minimum.at(first, group, np.arange(m))  # each region in the order of its first piece
    out = {"label": kinds[first]}
    for j, name in ((0, "pixels"), (1, "valued"), (2, "sum")):
        out[name] = np.bincount(group, weights=stats[:, j], minlength=count)
    lo, hi = np.full(count, np.inf), np.full(count, -np.inf)
    np.minimum.at(lo, group, stats[:, 3])
    np.maximum.at(hi, group, stats[:, 4])
    out["min"], out["max"] = np.where(np.isfinite(lo), lo, np.nan), np.where(np.isfinite(hi), hi, np.nan)
    out["sum"] = np.where(out["valued"] > 0, out["sum"], np.nan)
    merged = geoms[first]
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for members in np.split(order, bounds):
        if len(members) > 1:
            merged[group[members[0]]] = shapely.union_all(geoms[members])
    return gpd.GeoDataFrame(out, geometry=gpd.GeoSeries(merged, crs=crs), crs=crs)


@dataclass
class _StepTables:
    """One step's figures, summed over strips."""

    canopy_counts: np.ndarray = field(default_factory=lambda: np.zeros(GAIN + 1, np.int64))
    canopy_sums: np.ndarray = field(default_factory=lambda: np.zeros(GAIN + 1))
    canopy_total: float = 0.0
    transitions: np.ndarray | None = None
    canopy_pieces: list = field(default_factory=list)
    transition_pieces: list = field(default_factory=list)

    def canopy_summary(self) -> dict:
        """Valid, loss, partial-loss and gain pixel counts and mean changes."""
        counts, sums = self.canopy_counts, self.canopy_sums
        valid = int(counts[1:].sum())

        def mean(k):
            return float(sums[k] / counts[k]) if counts[k] else None

        return {"valid_pixels": valid, "loss_pixels": int(counts[LOSS]),
                "partial_loss_pixels": int(counts[PARTIAL_LOSS]), "gain_pixels": int(counts[GAIN]),
                "mean_change_m": self.canopy_total / valid if valid else None, "mean_loss_m": mean(LOSS),
                "mean_partial_loss_m": mean(PARTIAL_LOSS), "mean_gain_m": mean(GAIN)}


def _tile_rows(src, strip: int) -> list[tuple[int, int]]:
    """(first row, rows) of the units read at once: whole rows of the rasters' tiles (each tile
    is decoded once), and at least a strip high."""
    block = src.block_shapes[0][0]
    unit = max(block, -(-strip // block) * block)
    return [(r, min(unit, src.height - r)) for r in range(0, src.height, unit)]


@dataclass
class _Pass:
    """What one row of tiles of one step gives: its share of the tables, its strips' pieces."""

    paths: dict[str, Path]
    n_classes: int
    width: int
    height: int
    strip_rows: int
    min_pixels: float
    polygons: bool

    def __post_init__(self) -> None:
        self.changed_class = np.arange(256, dtype=np.uint8)  # canopy change class -> 0 for no change
        self.changed_class[NO_CHANGE] = 0
        self.changed_pair = np.arange(256, dtype=np.uint8)  # transition code -> 0 where from == to
        self.changed_pair[[1 + i * self.n_classes + i for i in range(self.n_classes)]] = 0

    def unit(self, band: int, row0: int, h: int) -> _StepTables:
        # opened by the thread that reads them: a rasterio dataset and its GDAL environment
        # are the opening thread's own
        with ExitStack() as stack:
            src = {k: stack.enter_context(rasterio.open(p)) for k, p in self.paths.items()}
            win = Window(0, row0, self.width, h)
            part = _StepTables()
            dh = code = codes = None
            if "canopy" in src:
                dh = src["canopy"].read(band, window=win)
                code = src["canopy_classes"].read(band, window=win)
                valued = np.isfinite(dh) & (code > 0)
                part.canopy_total = float(dh[valued].sum(dtype=np.float64))
                part.canopy_counts = np.bincount(code[valued], minlength=GAIN + 1)[:GAIN + 1]
                part.canopy_sums = np.bincount(code[valued], weights=dh[valued], minlength=GAIN + 1)[:GAIN + 1]
            if "transitions" in src:
                codes = src["transitions"].read(band, window=win)
                size = self.n_classes * self.n_classes + 1
                part.transitions = np.bincount(codes.ravel(), minlength=size)[:size]
        if not self.polygons:
            return part
        for r in range(0, h, self.strip_rows):
            s = slice(r, min(r + self.strip_rows, h))
            ends = (row0 + r == 0, row0 + s.stop == self.height)
            if code is not None:
                part.canopy_pieces.append(_pieces(self.changed_class[code[s]], dh[s], row0 + r, self.min_pixels,
                                                  *ends))
            if codes is not None:
                part.transition_pieces.append(_pieces(self.changed_pair[codes[s]], None if dh is None else dh[s],
                                                      row0 + r, self.min_pixels, *ends))
        return part


def change_tables(steps: list[Step], *, canopy: Path | None, canopy_classes: Path | None,
                  transitions: Path | None, classes: ClassTable | None, min_area: float = 0.0,
                  polygons: bool = True, workers: int = 1) -> tuple[list[_StepTables], object]:
    """Per step, the canopy summary and transition matrix (``_StepTables``), and the change
    polygons (:func:`change_polygons`; None unless ``polygons``), in one pass over the rasters,
    rows of tiles on ``workers`` threads (see the module notes)."""
    paths = {k: p for k, p in (("canopy", canopy), ("canopy_classes", canopy_classes),
                               ("transitions", transitions)) if p is not None}
    if not paths:  # embeddings only: nothing to count or trace
        return [_StepTables() for _ in steps], None
    with rasterio.open(next(iter(paths.values()))) as ref:
        width, height, transform, crs = ref.width, ref.height, ref.transform, ref.crs
        rows = _strip_rows(width)
        units = _tile_rows(ref, rows)
    work = _Pass(paths, len(classes) if transitions is not None else 0, width, height, rows,
                 min_area / pixel_area_m2(crs, transform), polygons)
    tables, frames = [], []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="geodino-vectors") as pool:
        for step in steps:
            parts = list(pool.map(lambda u, band=step.band: work.unit(band, *u), units))
            total = _StepTables(canopy_total=sum(p.canopy_total for p in parts),
                                canopy_counts=sum(p.canopy_counts for p in parts),
                                canopy_sums=sum(p.canopy_sums for p in parts),
                                transitions=sum(p.transitions for p in parts) if transitions is not None else None)
            tables.append(total)
            if not polygons:
                continue
            if canopy is not None:
                gdf = _regions([q for p in parts for q in p.canopy_pieces], crs)
                names = {c.code: c.name for c in CANOPY_CHANGE_CLASSES.classes}
                gdf["type"] = [names[int(c)] for c in gdf["label"]]
                gdf["transition"] = ""
                frames.append(_finish(gdf, step, transform, pixel_area_m2(crs, transform)))
            if transitions is not None:
                gdf = _regions([q for p in parts for q in p.transition_pieces], crs)
                names = {c.code: c.name for c in transition_table(classes).classes}
                gdf["type"] = "land-cover transition"
                gdf["transition"] = [names.get(int(c), "") for c in gdf["label"]]
                frames.append(_finish(gdf, step, transform, pixel_area_m2(crs, transform)))
    return tables, (_polygon_table(frames, crs, min_area) if polygons else None)


def change_polygons(steps: list[Step], *, canopy: Path | None, canopy_classes: Path | None,
                    transitions: Path | None, classes: ClassTable | None, min_area: float = 0.0):
    """Polygons of the canopy change classes (loss, partial loss, gain: ``canopy_classes``, with
    the height change from ``canopy``) and of land-cover transitions for every step, at least
    ``min_area`` m² each."""
    return change_tables(steps, canopy=canopy, canopy_classes=canopy_classes, transitions=transitions,
                         classes=classes, min_area=min_area)[1]


def _polygon_table(frames: list, crs, min_area: float):
    """The steps' polygons in one table: by step, type, area (largest first), then position."""
    import geopandas as gpd
    import pandas as pd

    columns = ["type", "transition", "date_from", "date_to", "step", "area_m2", "mean_height_change_m",
               "min_height_change_m", "max_height_change_m", "pixels"]
    frames = [f for f in frames if len(f)]
    if not frames:
        return gpd.GeoDataFrame({c: [] for c in columns}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    out = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs)
    if min_area > 0:
        out = out[out["area_m2"] >= min_area]
    # equal areas (small regions, above all) in the order of their top, then left edge: an order
    # that does not depend on how the raster was cut into strips
    b = out.geometry.bounds
    out = out.assign(_top=-b["maxy"], _left=b["minx"])
    out = out.sort_values(["step", "type", "area_m2", "_top", "_left"], ascending=[True, True, False, True, True],
                          kind="stable")
    return out[columns + ["geometry"]].reset_index(drop=True)


def _finish(gdf, step: Step, transform, pixel_m2: float):
    # pixel (column, row) -> map coordinates
    gdf["geometry"] = gdf.geometry.affine_transform(
        [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f])
    gdf["date_from"], gdf["date_to"], gdf["step"] = step.date_from, step.date_to, step.label
    # whole pixels times the pixel's ground area: m² whatever the CRS's unit (feet on State Plane)
    gdf["area_m2"] = gdf["pixels"] * pixel_m2
    with np.errstate(invalid="ignore", divide="ignore"):
        gdf["mean_height_change_m"] = np.where(gdf["valued"] > 0, gdf["sum"] / gdf["valued"], np.nan)
    gdf["min_height_change_m"], gdf["max_height_change_m"] = gdf["min"], gdf["max"]
    gdf["pixels"] = gdf["pixels"].astype(np.int64)
    return gdf


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


__all__ = ["Step", "change_polygons", "change_tables", "embedding_summary"]
