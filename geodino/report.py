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


def make_report(run: SceneRun, out: Path, elapsed: float, outputs: dict) -> dict:
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
    backbone = run.bundle.load()[0]
    report["precision"] = backbone.precision
    report["precision_detail"] = backbone.precision_detail
    if "landcover" in outputs:
        report["landcover_area_km2"] = class_areas(out / outputs["landcover"], run.classes)
    if "canopy_height" in outputs:
        report["canopy_height_m"] = height_stats(out / outputs["canopy_height"])
    report["complete"] = True
    return report


def class_areas(path: Path, classes: ClassTable) -> dict:
    counts = np.zeros(256, np.int64)
    with rasterio.open(path) as src:
        px = abs(src.transform.a * src.transform.e)
        for _, window in src.block_windows(1):
            counts += np.bincount(src.read(1, window=window).ravel(), minlength=256)
    return {c.name: round(counts[c.code] * px / 1e6, 6) for c in classes.classes}


def height_stats(path: Path) -> dict:
    hist = np.zeros(1000, np.int64)  # 0.1 m bins to 100 m
    total, n, peak = 0.0, 0, 0.0
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            v = src.read(1, window=window)
            v = v[np.isfinite(v)]
            if v.size:
                total += float(v.sum())
                n += v.size
                peak = max(peak, float(v.max()))
                hist += np.bincount(np.clip((v * 10).astype(np.int64), 0, 999), minlength=1000)
    if n == 0:
        return {"valid_pixels": 0}
    cdf = np.cumsum(hist) / n

    def q(p):
        return round(float(np.searchsorted(cdf, p)) / 10, 1)

    return {"valid_pixels": int(n), "mean": round(total / n, 3), "p50": q(0.5), "p95": q(0.95),
            "max": round(peak, 3), "fraction_above_2m": round(float(1 - cdf[19]), 4)}
