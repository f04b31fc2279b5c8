"""Accuracy metrics for canopy height and land cover, and raster-to-raster evaluation.

Metrics are accumulated from sufficient statistics, so a whole scene can be evaluated strip
by strip in bounded memory; the array functions are thin wrappers over the accumulators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geodino.errors import InputError
from geodino.units import pixel_area_m2

BLOCK = 50  # pixels: block-R² averages heights over 50 x 50 px blocks


@dataclass
class HeightAccumulator:
    n: int = 0
    sum_err: float = 0.0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    sum_ref: float = 0.0
    sum_ref2: float = 0.0
    block_pred: list = field(default_factory=list)
    block_ref: list = field(default_factory=list)

    def update(self, pred: np.ndarray, ref: np.ndarray, block: int = BLOCK, min_valid: float = 0.5) -> None:
        """Add a strip (2-D arrays; NaN = no data). Strips should start on multiples of ``block``."""
        pred = np.asarray(pred, np.float64)
        ref = np.asarray(ref, np.float64)
        ok = np.isfinite(pred) & np.isfinite(ref)
        p, r = pred[ok], ref[ok]
        err = p - r
        self.n += p.size
        self.sum_err += err.sum()
        self.sum_abs += np.abs(err).sum()
        self.sum_sq += (err * err).sum()
        self.sum_ref += r.sum()
        self.sum_ref2 += (r * r).sum()
        h, w = pred.shape
        for y in range(0, h - block + 1, block):
            for x in range(0, w - block + 1, block):
                m = ok[y:y + block, x:x + block]
                if m.mean() >= min_valid:
                    self.block_pred.append(pred[y:y + block, x:x + block][m].mean())
                    self.block_ref.append(ref[y:y + block, x:x + block][m].mean())

    def result(self) -> dict:
        if self.n == 0:
            return {"pixels": 0}
        mean_ref = self.sum_ref / self.n
        ss_tot = self.sum_ref2 - self.n * mean_ref ** 2
        out = {"pixels": self.n, "mae": self.sum_abs / self.n, "rmse": math.sqrt(self.sum_sq / self.n),
               "bias": self.sum_err / self.n, "r2": 1 - self.sum_sq / ss_tot if ss_tot > 0 else float("nan"),
               "blocks": len(self.block_ref)}
        out["block_r2"] = r2_score(np.array(self.block_pred), np.array(self.block_ref)) if len(self.block_ref) > 1 \
            else float("nan")
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def r2_score(pred: np.ndarray, ref: np.ndarray) -> float:
    ss_res = float(((ref - pred) ** 2).sum())
    ss_tot = float(((ref - ref.mean()) ** 2).sum())
    return 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def height_metrics(pred: np.ndarray, ref: np.ndarray, block: int = BLOCK) -> dict:
    """MAE, RMSE, bias (pred - ref), R² and block-R² over pixels valid in both (NaN = none)."""
    acc = HeightAccumulator()
    acc.update(pred, ref, block)
    return acc.result()


@dataclass
class ClassAccumulator:
    codes: list[int]
    matrix: np.ndarray = None  # rows: reference, columns: prediction

    def __post_init__(self) -> None:
        if self.matrix is None:
            self.matrix = np.zeros((len(self.codes), len(self.codes)), np.int64)
        lut = np.full(256, -1, np.int64)
        lut[np.asarray(self.codes)] = np.arange(len(self.codes))
        self._lut = lut

    def update(self, pred: np.ndarray, ref: np.ndarray) -> None:
        """Add pixels; codes outside the table (nodata, unlabelled) are ignored."""
        p = self._lut[np.asarray(pred, np.int64).ravel() & 255]
        r = self._lut[np.asarray(ref, np.int64).ravel() & 255]
        ok = (p >= 0) & (r >= 0)
        k = len(self.codes)
        self.matrix += np.bincount(r[ok] * k + p[ok], minlength=k * k).reshape(k, k)

    def result(self, names: list[str] | None = None) -> dict:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        present = m.sum(1) > 0
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
        names = names or [str(c) for c in self.codes]
        total = m.sum()
        return {
            "pixels": int(total),
            "overall_accuracy": round(float(tp.sum() / total), 6) if total else float("nan"),
            "miou": round(float(np.nanmean(iou[present])), 6) if present.any() else float("nan"),
            "iou": {n: (round(float(v), 6) if np.isfinite(v) else None) for n, v in zip(names, iou)},
            "confusion_matrix": {"codes": list(map(int, self.codes)), "rows_reference": self.matrix.tolist()},
        }


def class_metrics(pred: np.ndarray, ref: np.ndarray, codes: list[int], names: list[str] | None = None) -> dict:
    """Per-class IoU, mIoU (over classes present in the reference), overall accuracy, confusion matrix."""
    acc = ClassAccumulator(list(codes))
    acc.update(pred, ref)
    return acc.result(names)


def evaluate_rasters(prediction: str | Path, reference: str | Path, task: str, *, strip: int = 500) -> dict:
    """Compare a prediction raster with a reference on any grid (reprojected onto the prediction's).

    Heights: the reference is averaged onto the prediction grid; classes: nearest neighbour
    (mode when the reference is finer).
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    from geodino.sources import _open_checked

    if task not in ("canopy", "landcover"):
        raise InputError(f"unknown task {task!r}; use canopy or landcover")
    with _open_checked(str(prediction)) as pred, _open_checked(str(reference)) as ref:
        for ds, label in ((pred, prediction), (ref, reference)):
            if ds.crs is None:
                raise InputError(f"{label}: has no CRS")
            check_task_matches(ds, label, task)
        overlap = _overlap_pixels(pred, ref)
        if overlap == 0:
            raise InputError(f"{prediction} and {reference} do not overlap (prediction bounds "
                             f"{_fmt_bounds(pred.bounds)}, reference bounds {_fmt_bounds(_bounds_in(ref, pred.crs))} "
                             f"in {pred.crs.to_string()}); nothing to compare")
        finer = abs(ref.transform.a) < abs(pred.transform.a) * 0.75
        if task == "canopy":
            resampling = Resampling.average if finer else Resampling.bilinear
        else:
            resampling = Resampling.mode if finer else Resampling.nearest
        with WarpedVRT(ref, crs=pred.crs, transform=pred.transform, width=pred.width, height=pred.height,
                       resampling=resampling, src_nodata=ref.nodata, nodata=ref.nodata if ref.nodata is not None
                       else (np.nan if task == "canopy" else 0)) as aligned:
            if task == "canopy":
                acc = HeightAccumulator()
            else:
                codes = _class_codes(pred)
                acc = ClassAccumulator(codes)
            for row in range(0, pred.height, strip):
                win = Window(0, row, pred.width, min(strip, pred.height - row))
                p = pred.read(1, window=win, masked=True)
                r = aligned.read(1, window=win, masked=True)
                if task == "canopy":
                    acc.update(p.astype("float64").filled(np.nan), r.astype("float64").filled(np.nan))
                else:
                    acc.update(p.filled(0), r.filled(0))
            if task == "canopy":
                out = acc.result()
            else:
                out = acc.result(_class_names(pred, codes))
        if out["pixels"] < MIN_PIXELS:
            px_m2 = pixel_area_m2(pred.crs, pred.transform)
            px_km2 = px_m2 / 1e6 if px_m2 else None
            area = f", {overlap * px_km2:.4g} km²" if px_km2 else ""
            raise InputError(f"{prediction} and {reference} overlap on {overlap} prediction pixels{area}, of which "
                             f"{out['pixels']} are valid in both: fewer than {MIN_PIXELS}, too few for metrics "
                             "that mean anything; check that the rasters cover the same place")
    out.update(task=task, prediction=str(prediction), reference=str(reference), overlap_pixels=overlap)
    return out


MIN_PIXELS = 100  # pixels valid in both rasters that evaluate_rasters needs


def check_task_matches(ds, label, task: str) -> None:
    """Refuse a raster that does not hold what the task compares: class codes (integers,
    often with a colour table or class tags) for land cover, heights for canopy."""
    kind = np.dtype(ds.dtypes[0]).kind
    tags = ds.tags(1)
    classes = "class_codes" in tags or "CATEGORY_NAMES" in tags or _has_colormap(ds)
    if task == "landcover" and kind == "f":
        raise InputError(f"{label}: holds {ds.dtypes[0]} values (heights?), not class codes; "
                         "use --task canopy for canopy heights")
    if task == "canopy" and classes:
        raise InputError(f"{label}: is a class raster (it has a colour table or class names), not heights; "
                         "use --task landcover for land cover")


def _has_colormap(ds) -> bool:
    try:
        return bool(ds.colormap(1))
    except ValueError:
        return False


def _bounds_in(ds, crs):
    from rasterio.warp import transform_bounds

    return ds.bounds if ds.crs == crs else transform_bounds(ds.crs, crs, *ds.bounds, densify_pts=21)


def _fmt_bounds(b) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


def _overlap_pixels(pred, ref) -> int:
    """Prediction pixels inside the reference's extent (in the prediction's CRS)."""
    west, south, east, north = _bounds_in(ref, pred.crs)
    pw, ps, pe, pn = pred.bounds
    w, e = max(west, pw), min(east, pe)
    s, n = max(south, ps), min(north, pn)
    if w >= e or s >= n:
        return 0
    return round((e - w) / abs(pred.transform.a)) * round((n - s) / abs(pred.transform.e))


def _class_codes(ds) -> list[int]:
    tags = ds.tags(1)
    if "class_codes" in tags:
        return [int(c) for c in tags["class_codes"].split(",")]
    try:
        return sorted(c for c in ds.colormap(1) if c != ds.nodata and ds.colormap(1)[c][3] > 0)
    except ValueError:
        return list(range(1, 256))


def _class_names(ds, codes) -> list[str]:
    tags = ds.tags(1)
    if "class_names" in tags and len(tags["class_names"].split(",")) == len(codes):
        return tags["class_names"].split(",")
    return [str(c) for c in codes]
