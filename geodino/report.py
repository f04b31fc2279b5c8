"""The JSON report of a finished scene: what was made, from what, and summary statistics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio

import geodino
from geodino.classes import ClassTable

if TYPE_CHECKING:
    from geodino.pipeline import SceneRun

REPORT = "report.json"


def make_report(run: SceneRun, out: Path, elapsed: float, outputs: dict, stats: dict | None = None) -> dict:
    """The report of a written scene. ``stats``: accumulators filled while the outputs were
    written (output name -> ClassCounts / HeightStats); outputs without one are read back."""
    stats = stats or {}
    grid = run.scene.grid
    rx, ry = grid.res
    area_km2 = grid.width * grid.height * rx * ry / 1e6 if grid.crs.is_projected else None
    report = {
        "scene": list(run.scene.paths), "geodino_version": geodino.__version__,
        "crs": grid.crs.to_string(), "width": grid.width, "height": grid.height,
        "transform": list(grid.transform)[:6], "area_km2": area_km2,
        "windows": len(run.tiles), "seconds": round(elapsed, 3),
        "windows_per_second": round(len(run.tiles) / elapsed, 3) if elapsed > 0 else None,
        "models": {"backbone": run.options.backbone, "canopy_head": run.options.canopy_head,
                   "landcover_head": run.options.landcover_head, "canopy_model": run.options.canopy_model},
        "sensor_profile": run.normalisation.profile, "normalisation": run.normalisation.to_dict(),
        "window": run.options.window, "overlap": run.options.overlap, "outputs": outputs,
    }
    if "landcover" in outputs:
        report["landcover_area_km2"] = (stats["landcover"].areas_km2(run.classes, rx * ry) if "landcover" in stats
                                        else class_areas(out / outputs["landcover"], run.classes))
    if "canopy_height" in outputs:
        report["canopy_height_m"] = (stats["canopy_height"].result() if "canopy_height" in stats
                                     else height_stats(out / outputs["canopy_height"]))
    report["complete"] = True
    return report


class ClassCounts:
    """Pixels per class code, accumulated block by block (as blocks are written, or read back)."""

    def __init__(self) -> None:
        self.counts = np.zeros(256, np.int64)

    def update(self, block: np.ndarray) -> None:
        self.counts += np.bincount(np.asarray(block, np.uint8).ravel(), minlength=256)

    def areas_km2(self, classes: ClassTable, pixel_area_m2: float) -> dict:
        return {c.name: round(self.counts[c.code] * pixel_area_m2 / 1e6, 6) for c in classes.classes}


class HeightStats:
    """Mean, quantiles (0.1 m bins to 100 m), maximum and cover above 2 m of valid heights."""

    def __init__(self) -> None:
        self.hist = np.zeros(1000, np.int64)
        self.total, self.n, self.peak = 0.0, 0, 0.0

    def update(self, block: np.ndarray) -> None:
        v = np.asarray(block, np.float32).ravel()
        v = v[np.isfinite(v)]
        if v.size:
            self.total += float(v.sum(dtype=np.float64))
            self.n += v.size
            self.peak = max(self.peak, float(v.max()))
            self.hist += np.bincount(np.clip((v * 10).astype(np.int64), 0, 999), minlength=1000)

    def result(self) -> dict:
        if self.n == 0:
            return {"valid_pixels": 0}
        cdf = np.cumsum(self.hist) / self.n

        def q(p):
            return round(float(np.searchsorted(cdf, p)) / 10, 1)

        return {"valid_pixels": int(self.n), "mean": round(self.total / self.n, 3), "p50": q(0.5),
                "p95": q(0.95), "max": round(self.peak, 3), "fraction_above_2m": round(float(1 - cdf[19]), 4)}


def _read_blocks(path: Path, into) -> float:
    """Feed every block of band 1 of a raster to ``into.update``; returns the pixel area (m²)."""
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            into.update(src.read(1, window=window))
        return abs(src.transform.a * src.transform.e)


def class_areas(path: Path, classes: ClassTable) -> dict:
    counts = ClassCounts()
    px = _read_blocks(path, counts)
    return counts.areas_km2(classes, px)


def height_stats(path: Path) -> dict:
    stats = HeightStats()
    _read_blocks(path, stats)
    return stats.result()
