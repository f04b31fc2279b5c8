"""The JSON report of a finished scene: what was made, from what, and summary statistics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio

import geodino
from geodino.classes import ClassTable
from geodino.fingerprint import MODEL_OPTIONS, display_path, fingerprint
from geodino.model_checks import is_demo_model
from geodino.units import pixel_area_m2

if TYPE_CHECKING:
    from geodino.pipeline import SceneRun

REPORT = "report.json"


def make_report(run: SceneRun, out: Path, elapsed: float, outputs: dict, stats: dict | None = None) -> dict:
    """What was made, from what (paths relative to ``out``, never this machine's absolute
    paths), with the run's fingerprint and summary statistics of the outputs.

    ``stats``: accumulators filled while the outputs were written (output name ->
    :class:`ClassCounts` / :class:`HeightStats`); outputs without one are read back.
    """
    stats = stats or {}
    grid = run.scene.grid
    pixel_m2 = pixel_area_m2(grid.crs, grid.transform)
    pixel_km2 = pixel_m2 / 1e6 if pixel_m2 else None
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
        "demo_model": is_demo_model(o.backbone),
        "bands_used": {"indexes": list(run.scene.bands), "names": list(run.scene.band_names)},
        "sensor_profile": run.normalisation.profile, "normalisation": run.normalisation.to_dict(),
        "window": o.window, "overlap": o.overlap, "target_gsd": o.target_gsd, "outputs": outputs,
    }
    backbone = run.bundle.load()[0]
    report["precision"] = backbone.precision
    report["precision_detail"] = backbone.precision_detail
    if "landcover_polygons" in outputs:
        report["min_polygon_area_m2"] = o.min_polygon_area
    valid = None
    if "landcover" in outputs:
        counts = stats.get("landcover") or _read_blocks(out / outputs["landcover"], ClassCounts())
        report["landcover_area_km2"] = counts.areas_km2(run.classes, pixel_m2) if pixel_m2 else None
        valid = counts.valid(run.classes)
    if "canopy_height" in outputs:
        heights = stats.get("canopy_height") or _read_blocks(out / outputs["canopy_height"], HeightStats())
        report["canopy_height_m"] = heights.result()
        valid = heights.n if valid is None else valid
    if valid is None and "embeddings" in outputs:
        valid = _finite_pixels(out / outputs["embeddings"]) * run.bundle.patch_size ** 2
    report["valid_area_km2"] = round(valid * pixel_km2, 6) if pixel_km2 and valid is not None else None
    report["fingerprint"] = fp
    report["complete"] = True
    return report


def _finite_pixels(path: Path) -> int:
    n = 0
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            n += int(np.isfinite(src.read(1, window=window)).sum())
    return n


class ClassCounts:
    """Pixels per class code, accumulated block by block (as blocks are written, or read back)."""

    def __init__(self) -> None:
        self.counts = np.zeros(256, np.int64)

    def update(self, block: np.ndarray) -> None:
        self.counts += np.bincount(np.asarray(block, np.uint8).ravel(), minlength=256)

    def areas_km2(self, classes: ClassTable, pixel_area_m2: float) -> dict:
        return {c.name: round(self.counts[c.code] * pixel_area_m2 / 1e6, 6) for c in classes.classes}

    def valid(self, classes: ClassTable) -> int:
        """Pixels of any class of the table (nodata excluded)."""
        return int(self.counts[classes.codes].sum())


class HeightStats:
    """Mean, quantiles (0.1 m bins to 100 m), maximum and cover above 2 m of valid heights."""

    def __init__(self) -> None:
        self.hist = np.zeros(1000, np.int64)
        self.total, self.n, self.peak = 0.0, 0, 0.0

    def update(self, block: np.ndarray) -> None:
        v = np.asarray(block, np.float32).ravel()
        finite = np.isfinite(v)
        if not finite.all():
            v = v[finite]
        if v.size:
            self.total += float(v.sum(dtype=np.float64))
            self.n += v.size
            self.peak = max(self.peak, float(v.max()))
            # clipped as floats, then truncated: the bins of truncating first, at a sixth of the
            # CPU (numpy's clip of int64 is slow); heights past the top bin all land in it
            tenths = v * np.float32(10)
            np.clip(tenths, 0, 999, out=tenths)
            self.hist += np.bincount(tenths.astype(np.intp), minlength=1000)

    def result(self) -> dict:
        if self.n == 0:
            return {"valid_pixels": 0}
        cdf = np.cumsum(self.hist) / self.n

        def q(p):
            return round(float(np.searchsorted(cdf, p)) / 10, 1)

        return {"valid_pixels": int(self.n), "mean": round(self.total / self.n, 3), "p50": q(0.5),
                "p95": q(0.95), "max": round(self.peak, 3), "fraction_above_2m": round(float(1 - cdf[19]), 4)}


def _read_blocks(path: Path, into):
    """Feed every block of band 1 of a raster to ``into.update``; returns ``into``."""
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            into.update(src.read(1, window=window))
    return into
