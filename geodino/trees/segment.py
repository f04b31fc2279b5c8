"""Crowns: marker-controlled watershed from the tree tops, bounded like Dalponte's region growing.

Each top floods the inverted height surface (Meyer & Beucher 1990, marker-controlled
watershed; scikit-image's ``watershed``), so neighbouring crowns meet in the valleys between
them. As in Dalponte & Coomes (2016, lidR's ``dalponte2016``) a crown then keeps only the
pixels that are at least ``crown_fraction`` of its top's height and within
``max_crown_radius_m`` of its top, and only the part still connected to the top (pixels cut
off by those two rules do not become separate pieces of the same tree).
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_regions
from skimage.segmentation import watershed

from geodino.trees.params import CrownParams, PixelSize


def segment_crowns(raw: np.ndarray, smoothed: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                   params: CrownParams, pixel: PixelSize, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Crown labels (int32, 0 = no crown): pixel value k + 1 belongs to the top (rows[k], cols[k]).

    ``raw`` and ``smoothed`` are the heights with NaN for nodata; the flooding runs on the
    smoothed surface (the raw one when smoothing is off), the height rule on the raw one.
    ``origin`` is the scene position of the arrays' first pixel (see :func:`_tie_breaker`).
    """
    valid = np.isfinite(raw)
    markers = np.zeros(raw.shape, np.int32)
    n = rows.size
    if n == 0:
        return markers
    markers[rows, cols] = np.arange(1, n + 1, dtype=np.int32)
    canopy = valid & (raw >= params.min_height)
    floor = np.where(np.isfinite(smoothed), smoothed, 0.0).astype(np.float64)
    flood = _tie_breaker(raw.shape, origin) - floor
    labels = watershed(flood, markers, mask=canopy, connectivity=1).astype(np.int32)

    top_h = np.concatenate([[np.inf], raw[rows, cols].astype(np.float64)])
    top_r = np.concatenate([[0], rows])
    top_c = np.concatenate([[0], cols])
    yy, xx = np.nonzero(labels)
    k = labels[yy, xx]
    dist2 = ((yy - top_r[k]) * pixel.y) ** 2 + ((xx - top_c[k]) * pixel.x) ** 2
    drop = (raw[yy, xx] < params.crown_fraction * top_h[k]) | (dist2 > params.max_crown_radius_m ** 2)
    labels[yy[drop], xx[drop]] = 0

    # keep the piece of each crown that holds its top
    pieces = connected_regions(labels, background=0, connectivity=1)
    holds_top = np.zeros(int(pieces.max()) + 1, bool)
    holds_top[pieces[rows, cols]] = True
    holds_top[0] = False
    labels[~holds_top[pieces]] = 0
    return labels


def _tie_breaker(shape: tuple[int, int], origin: tuple[int, int]) -> np.ndarray:
    """A different tiny value (< 1e-9 m) for each scene pixel, from its scene position.

    Heights are often quantised (lidar CHMs to 1 cm), and the watershed floods equal
    heights in the order it first met them, which depends on where the array starts:
    crowns on flat ties then changed with the block size. Adding this makes every height
    distinct in a way that belongs to the scene, not to the block.
    """
    r = (np.arange(shape[0], dtype=np.uint64) + np.uint64(origin[0] + 2**31))[:, None]
    c = (np.arange(shape[1], dtype=np.uint64) + np.uint64(origin[1] + 2**31))[None, :]
    with np.errstate(over="ignore"):
        h = (r * np.uint64(0x9E3779B97F4A7C15)) ^ (c * np.uint64(0xC2B2AE3D27D4EB4F))
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return (h >> np.uint64(11)).astype(np.float64) * (1e-9 / 2**53)


def crown_pixel_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels per crown, for labels 1..n (index k holds label k + 1)."""
    return np.bincount(labels.ravel(), minlength=n + 1)[1:n + 1]
