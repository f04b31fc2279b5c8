"""Scoring detected trees against reference trees: detection F1, height and crown-area errors.

Detected and reference tops are paired one to one, nearest pairs first, within a distance
(the usual greedy matching of individual-tree-detection studies, e.g. the benchmark of
Eysn et al. 2015). Unpaired detections are false positives, unpaired references misses.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def match_points(det_xy: np.ndarray, ref_xy: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (det, ref) of one-to-one pairs closer than ``max_distance``, nearest first."""
    det_xy = np.asarray(det_xy, np.float64).reshape(-1, 2)
    ref_xy = np.asarray(ref_xy, np.float64).reshape(-1, 2)
    if len(det_xy) == 0 or len(ref_xy) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(det_xy).sparse_distance_matrix(cKDTree(ref_xy), max_distance, output_type="ndarray")
    order = np.lexsort((pairs["j"], pairs["i"], pairs["v"]))
    used_d = np.zeros(len(det_xy), bool)
    used_r = np.zeros(len(ref_xy), bool)
    out_d, out_r = [], []
    for i, j in zip(pairs["i"][order], pairs["j"][order]):
        if not used_d[i] and not used_r[j]:
            used_d[i] = used_r[j] = True
            out_d.append(i)
            out_r.append(j)
    return np.asarray(out_d, np.int64), np.asarray(out_r, np.int64)


def score_trees(det_xy, ref_xy, *, max_distance: float = 1.5, det_height=None, ref_height=None,
                det_area=None, ref_area=None) -> dict:
    """Precision, recall, F1, and on matched trees the height and crown-area errors."""
    d, r = match_points(det_xy, ref_xy, max_distance)
    n_det, n_ref, tp = len(np.asarray(det_xy).reshape(-1, 2)), len(np.asarray(ref_xy).reshape(-1, 2)), len(d)
    precision = tp / n_det if n_det else 0.0
    recall = tp / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    out = {"detected": n_det, "reference": n_ref, "matched": tp, "precision": round(precision, 4),
           "recall": round(recall, 4), "f1": round(f1, 4), "match_distance_m": max_distance}
    if tp and det_height is not None and ref_height is not None:
        err = np.asarray(det_height, np.float64)[d] - np.asarray(ref_height, np.float64)[r]
        out["height_abs_error_median_m"] = round(float(np.median(np.abs(err))), 4)
        out["height_bias_m"] = round(float(np.mean(err)), 4)
    if tp and det_area is not None and ref_area is not None:
        ref_a = np.asarray(ref_area, np.float64)[r]
        ok = ref_a > 0
        rel = np.abs(np.asarray(det_area, np.float64)[d][ok] - ref_a[ok]) / ref_a[ok]
        out["crown_area_rel_error_median"] = round(float(np.median(rel)), 4) if rel.size else None
    return out
