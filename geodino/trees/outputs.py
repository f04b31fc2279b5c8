"""Where found trees go: the GeoPackage (tops and crowns), the crown-id COG, the summary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rasterio.windows import Window

import geodino
from geodino.export import COG_BLOCK
from geodino.trees.source import CanopyRaster

TREETOPS, CROWNS = "treetops", "crowns"
ATTRIBUTES = ("id", "height_m", "crown_area_m2", "crown_diameter_m")


class TreeLayers:
    """Appends trees to the two layers of a GeoPackage as blocks find them.

    Trees are buffered up to ``batch`` and written together: each append reopens the file
    and updates its spatial index tree by tree, which cost 0.13 ms per feature in blocks of
    1024² against 0.04 ms written at once; the buffer keeps memory bounded all the same.
    """

    def __init__(self, path: Path, crs, batch: int = 25000) -> None:
        self.path = path
        self.crs = crs
        self.batch = batch
        self.created: set[str] = set()
        self._pending: list[tuple[dict, object, object]] = []
        self._count = 0

    def append(self, table: dict, points, polygons) -> None:
        self._pending.append((table, points, polygons))
        self._count += len(table["id"])
        if self._count >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered (the first write creates both layers, even with no tree)."""
        import geopandas as gpd
        import pyogrio

        if not self._pending and self.created:
            return
        table = {k: np.concatenate([np.asarray(t[k]) for t, _, _ in self._pending]) if self._pending
                 else np.zeros(0) for k in ATTRIBUTES}
        table["id"] = table["id"].astype(np.int64)
        for layer, index, kind in ((TREETOPS, 1, "Point"), (CROWNS, 2, "Polygon")):
            geoms = [g for item in self._pending for g in item[index]]
            frame = gpd.GeoDataFrame(table, geometry=geoms, crs=self.crs)
            pyogrio.write_dataframe(frame, self.path, layer=layer, driver="GPKG", geometry_type=kind,
                                    append=layer in self.created)
            self.created.add(layer)
        self._pending, self._count = [], 0


def crown_polygons(labels: np.ndarray, keep: np.ndarray, row0: int, col0: int, transform):
    """(labels, polygons): one polygon per kept label (labels are 4-connected: one piece each).

    Vertices are traced in the scene's pixel coordinates (whole numbers, exact) and mapped
    through the scene's transform in one array operation, so a crown has the same
    coordinates, to the bit, whichever block traced it.
    """
    import shapely
    from affine import Affine

    from geodino.vectorize import trace_array

    values, polygons = trace_array(labels, keep[labels], Affine.translation(col0, row0))
    if not len(values):
        return np.zeros(0, np.int64), np.empty(0, object)
    return values, shapely.transform(polygons, lambda px: np.column_stack(
        [transform.c + px[:, 0] * transform.a + px[:, 1] * transform.b,
         transform.f + px[:, 0] * transform.d + px[:, 1] * transform.e]))


def id_raster_profile(raster: CanopyRaster, block: int) -> dict:
    tile = next((s for s in (512, 256, 128, 64, 32, 16) if block % s == 0), COG_BLOCK)
    return {"driver": "GTiff", "width": raster.width, "height": raster.height, "count": 1, "dtype": "uint32",
            "crs": raster.crs, "transform": raster.transform, "nodata": 0, "tiled": True, "blockxsize": tile,
            "blockysize": tile, "compress": "ZSTD", "predictor": 2, "BIGTIFF": "IF_SAFER"}


def describe_id_raster(dst, tags: dict) -> None:
    dst.set_band_description(1, "tree crown id")
    dst.update_tags(1, meaning="id of the tree in trees.gpkg (layers treetops and crowns); 0: no crown")
    dst.update_tags(**{k: str(v) for k, v in tags.items()})


def write_ids(dst, ids: np.ndarray, row0: int, col0: int) -> None:
    dst.write(ids, 1, window=Window(col0, row0, ids.shape[1], ids.shape[0]))


class Summary:
    """Counts and distributions accumulated block by block (fixed-size histograms, so the
    summary of a scene of any size takes the same memory)."""

    HEIGHT_BIN = 0.1  # m
    AREA_BIN = 0.25  # m²

    def __init__(self) -> None:
        self.trees = 0
        self.valid_px = 0
        self.canopy_px = 0
        self.heights = np.zeros(1500, np.int64)  # 0.1 m bins to 150 m
        self.areas = np.zeros(8000, np.int64)  # 0.25 m² bins to 2000 m²
        self.height_sum = 0.0
        self.height_max = 0.0

    def add_pixels(self, core: np.ndarray, min_height: float) -> None:
        valid = np.isfinite(core)
        self.valid_px += int(valid.sum())
        self.canopy_px += int((core[valid] >= min_height).sum())

    def add_trees(self, heights: np.ndarray, areas: np.ndarray) -> None:
        self.trees += heights.size
        if heights.size:
            self.height_sum += float(heights.sum())
            self.height_max = max(self.height_max, float(heights.max()))
            self.heights += np.bincount(np.clip((heights / self.HEIGHT_BIN).astype(np.int64), 0, 1499),
                                        minlength=1500)
            self.areas += np.bincount(np.clip((areas / self.AREA_BIN).astype(np.int64), 0, 7999), minlength=8000)

    def report(self, raster: CanopyRaster) -> dict:
        px_ha = raster.pixel.area_m2 / 1e4
        valid_ha, canopy_ha = self.valid_px * px_ha, self.canopy_px * px_ha
        out = {
            "trees": self.trees,
            "valid_area_ha": round(valid_ha, 4),
            "canopy_area_ha": round(canopy_ha, 4),
            "density_per_ha": round(self.trees / valid_ha, 3) if valid_ha else None,
            "density_per_canopy_ha": round(self.trees / canopy_ha, 3) if canopy_ha else None,
        }
        if self.trees:
            out["height_m"] = {"mean": round(self.height_sum / self.trees, 3),
                               **_quantiles(self.heights, self.HEIGHT_BIN), "max": round(self.height_max, 3)}
            edges = list(range(0, math.ceil(self.height_max / 5.0) * 5 + 5, 5))
            per_m = np.add.reduceat(self.heights, [int(e / self.HEIGHT_BIN) for e in edges[:-1]])
            out["height_histogram"] = {"edges_m": edges, "trees": [int(v) for v in per_m[:len(edges) - 1]]}
            out["crown_area_m2"] = _quantiles(self.areas, self.AREA_BIN)
            out["crown_diameter_m"] = {k: round(2 * math.sqrt(v / math.pi), 3)
                                       for k, v in out["crown_area_m2"].items()}
        return out


def _quantiles(hist: np.ndarray, step: float) -> dict:
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    return {f"p{int(q * 100)}": round((float(np.searchsorted(cdf, q)) + 0.5) * step, 3)
            for q in (0.05, 0.25, 0.5, 0.75, 0.95)}


def provenance(raster: CanopyRaster, params) -> dict:
    from dataclasses import asdict

    return {"geodino_version": geodino.__version__, "canopy_height": str(raster.path), "band": raster.band,
            **{f"crowns_{k}": v for k, v in asdict(params).items()}}
