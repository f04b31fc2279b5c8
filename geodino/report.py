"""The JSON report of a finished scene: what was made, from what, and summary statistics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio

import geodino
from geodino.classes import ClassTable
from geodino.fingerprint import MODEL_OPTIONS, display_path, fingerprint, model_stamp

if TYPE_CHECKING:
    from geodino.pipeline import SceneRun

REPORT = "report.json"


def make_report(run: SceneRun, out: Path, elapsed: float, outputs: dict) -> dict:
    """What was made, from what (paths relative to ``out``, never this machine's absolute
    paths), with the run's fingerprint and summary statistics of the outputs."""
    grid = run.scene.grid
    rx, ry = grid.res
    pixel_km2 = rx * ry / 1e6 if grid.crs.is_projected else None
    o = run.options
    fp = getattr(run, "fingerprint", None) or fingerprint(list(run.scene.paths), o, out)
    report = {
        "scene": [display_path(p, out) for p in run.scene.paths], "geodino_version": geodino.__version__,
        "crs": grid.crs.to_string(), "width": grid.width, "height": grid.height,
        "transform": list(grid.transform)[:6],
        # the whole grid, nodata collar included; valid_area_km2 below counts mapped pixels only
        "footprint_area_km2": round(grid.width * grid.height * pixel_km2, 6) if pixel_km2 else None,
        "windows": len(run.tiles), "seconds": round(elapsed, 3),
        "windows_per_second": round(len(run.tiles) / elapsed, 3) if elapsed > 0 else None,
        "models": {role: display_path(getattr(o, role), out) if getattr(o, role) else None
                   for role in MODEL_OPTIONS},
        "demo_model": is_demo_model(o),
        "bands_used": {"indexes": list(run.scene.bands), "names": list(run.scene.band_names)},
        "sensor_profile": run.normalisation.profile, "normalisation": run.normalisation.to_dict(),
        "window": o.window, "overlap": o.overlap, "target_gsd": o.target_gsd, "outputs": outputs,
    }
    if "landcover_polygons" in outputs:
        report["min_polygon_area_m2"] = o.min_polygon_area
    valid = None
    if "landcover" in outputs:
        report["landcover_area_km2"], valid = class_areas(out / outputs["landcover"], run.classes, counts=True)
    if "canopy_height" in outputs:
        report["canopy_height_m"] = height_stats(out / outputs["canopy_height"])
        valid = report["canopy_height_m"]["valid_pixels"] if valid is None else valid
    if valid is None and "embeddings" in outputs:
        valid = _finite_pixels(out / outputs["embeddings"]) * run.bundle.patch_size ** 2
    report["valid_area_km2"] = round(valid * pixel_km2, 6) if pixel_km2 and valid is not None else None
    report["fingerprint"] = fp
    report["complete"] = True
    return report


def is_demo_model(options) -> bool:
    """Whether the run used the bundled demonstration model (a randomly initialised tiny
    backbone: its maps show that the pipeline works, not what is on the ground)."""
    bundled = Path(geodino.__file__).resolve().parents[1] / "data_samples" / "model"
    for role in MODEL_OPTIONS:
        value = getattr(options, role, None)
        if value and Path(value).exists() and bundled in Path(value).resolve().parents:
            return True
    backbone = Path(str(options.backbone))
    return backbone.is_dir() and (bundled / "backbone").is_dir() and \
        model_stamp(str(backbone)) == model_stamp(str(bundled / "backbone"))


def _finite_pixels(path: Path) -> int:
    n = 0
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            n += int(np.isfinite(src.read(1, window=window)).sum())
    return n


def class_areas(path: Path, classes: ClassTable, counts: bool = False):
    """Area (km²) of each class; with ``counts``, also the number of pixels of any class."""
    hist = np.zeros(256, np.int64)
    with rasterio.open(path) as src:
        px = abs(src.transform.a * src.transform.e)
        for _, window in src.block_windows(1):
            hist += np.bincount(src.read(1, window=window).ravel(), minlength=256)
    areas = {c.name: round(hist[c.code] * px / 1e6, 6) for c in classes.classes}
    return (areas, int(hist[classes.codes].sum())) if counts else areas


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
