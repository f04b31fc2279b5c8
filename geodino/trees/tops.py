"""Tree tops: local maxima of canopy height within a window that grows with height.

The method is the variable-window local-maximum filter of Popescu & Wynne (2004), as
lidR's ``lmf`` implements it for rasters: a pixel at least ``min_height`` tall is a tree
top when no pixel inside the circle of diameter ``window(h)`` around it is higher. Ties
(flat tops, quantised heights) go to the pixel first in raster order, so a plateau gives
one top and the choice does not depend on how the raster is cut into blocks.

scipy's ``maximum_filter`` finds the 3x3 candidates; the circle test then runs only on
those, ring by ring outwards, dropping a candidate as soon as a ring holds a higher pixel.
Most candidates on a noisy surface die in the first rings, so the cost follows the number
of real tops times their window area instead of the scene area times the largest window
(a full-image maximum filter per window size, which is what a per-pixel window would need).

With smoothing, tops are searched on the smoothed surface and then moved uphill on the raw
heights to the nearest raw local maximum, so a reported height is always a value of the
input raster (the height of its local maximum), never a smoothed one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from geodino.trees.params import (
    SMOOTH_TRUNCATE,
    CrownParams,
    PixelSize,
    climb_steps,
    smoothing_sigma_px,
)

_OFFSETS_PER_STEP = 48  # ring offsets tested per vectorised step


def surface(raw: np.ndarray, params: CrownParams, pixel: PixelSize) -> np.ndarray:
    """The surface tops are searched on: NaN-aware Gaussian smoothing of ``raw`` (or ``raw``).

    Normalised convolution (smooth the values and the valid mask, divide) keeps nodata and
    the raster's edge from pulling heights towards zero. Invalid pixels stay NaN.
    """
    if params.smoothing_m <= 0:
        return raw
    valid = np.isfinite(raw)
    sigma = smoothing_sigma_px(params, pixel)
    num = ndimage.gaussian_filter(np.where(valid, raw, 0).astype(np.float32), sigma, mode="constant",
                                  truncate=SMOOTH_TRUNCATE)
    den = ndimage.gaussian_filter(valid.astype(np.float32), sigma, mode="constant", truncate=SMOOTH_TRUNCATE)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[~valid] = np.nan
    return out


def _disk_offsets(radius_m: float, pixel: PixelSize):
    """Pixel offsets within ``radius_m`` (excluding the centre), sorted by distance."""
    ry, rx = pixel.reach(radius_m), pixel.reach(radius_m)
    dy, dx = np.meshgrid(np.arange(-ry, ry + 1), np.arange(-rx, rx + 1), indexing="ij")
    dist = np.hypot(dy * pixel.y, dx * pixel.x)
    keep = (dist <= radius_m) & ((dy != 0) | (dx != 0))
    dy, dx, dist = dy[keep], dx[keep], dist[keep]
    # 3x3 neighbours first: they decide most candidates
    order = np.lexsort((dx, dy, np.maximum(np.abs(dy), np.abs(dx)) > 1, dist))
    return dy[order], dx[order], dist[order]


def find_tops(raw: np.ndarray, smoothed: np.ndarray, params: CrownParams, pixel: PixelSize,
              zone: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tree tops whose final position lies in ``zone`` of the arrays: rows, cols, raw heights.

    ``raw`` and ``smoothed`` hold NaN for nodata. The caller gives arrays that reach far
    enough around ``zone`` (:class:`geodino.trees.params.Halos`) for the result there to
    be exact; rows and columns are indices into the arrays, sorted in raster order.
    """
    h, w = raw.shape
    s = np.where(np.isfinite(smoothed), smoothed, -np.inf).astype(np.float32)
    climb = climb_steps(params, pixel)
    # candidates: 3x3 maxima over min_height, searched a climb's reach around the zone
    z0 = max(zone[0].start - climb, 0), min(zone[0].stop + climb, h)
    z1 = max(zone[1].start - climb, 0), min(zone[1].stop + climb, w)
    sub = s[z0[0]:z0[1], z1[0]:z1[1]]
    peak = ndimage.maximum_filter(s, size=3, mode="constant", cval=-np.inf)[z0[0]:z0[1], z1[0]:z1[1]]
    rows, cols = np.nonzero((sub >= params.min_height) & (sub >= peak))
    rows, cols = rows + z0[0], cols + z1[0]
    rows, cols = _window_test(s, rows, cols, params, pixel)
    if climb:
        rows, cols, settled = _climb(raw, rows, cols, climb)
        # a top still rising after the longest allowed climb has no raw peak of its own
        rows, cols = rows[settled], cols[settled]
    heights = raw[rows, cols] if rows.size else np.zeros(0, np.float32)
    inside = ((rows >= zone[0].start) & (rows < zone[0].stop) & (cols >= zone[1].start)
              & (cols < zone[1].stop) & (heights >= params.min_height))
    rows, cols, heights = rows[inside], cols[inside], heights[inside]
    # two smoothed tops that climbed to the same raw peak are one tree
    key = rows.astype(np.int64) * w + cols
    key, first = np.unique(key, return_index=True)
    return rows[first], cols[first], heights[first].astype(np.float32)


def _window_test(s: np.ndarray, rows: np.ndarray, cols: np.ndarray, params: CrownParams, pixel: PixelSize):
    """Keep candidates that no pixel within their window beats (higher, or equal and earlier)."""
    if rows.size == 0:
        return rows, cols
    top = s[rows, cols]
    radius = params.window_diameter_m(top) / 2.0
    dy, dx, dist = _disk_offsets(float(radius.max()), pixel)
    pad = max(int(np.abs(dy).max(initial=0)), int(np.abs(dx).max(initial=0)))
    padded = np.pad(s, pad, mode="constant", constant_values=-np.inf)
    earlier = (dy < 0) | ((dy == 0) & (dx < 0))  # an equal pixel earlier in raster order wins
    alive = np.arange(rows.size)
    survivors = []
    for k in range(0, dy.size, _OFFSETS_PER_STEP):
        sl = slice(k, k + _OFFSETS_PER_STEP)
        done = radius[alive] < dist[k]  # whole window tested, never beaten
        survivors.append(alive[done])
        alive = alive[~done]
        if alive.size == 0:
            break
        vals = padded[rows[alive, None] + pad + dy[None, sl], cols[alive, None] + pad + dx[None, sl]]
        t = top[alive, None]
        within = dist[None, sl] <= radius[alive, None]
        beaten = within & ((vals > t) | ((vals == t) & earlier[None, sl]))
        alive = alive[~beaten.any(axis=1)]
    keep = np.zeros(rows.size, bool)
    keep[np.concatenate([alive, *survivors])] = True
    return rows[keep], cols[keep]


def _climb(raw: np.ndarray, rows: np.ndarray, cols: np.ndarray, steps: int):
    """Move each position uphill on ``raw`` (steepest 8-neighbour ascent), at most ``steps``;
    also says which positions reached a raw local maximum."""
    r = np.where(np.isfinite(raw), raw, -np.inf)
    padded = np.pad(r, 1, mode="constant", constant_values=-np.inf)
    # the centre first, so a pixel stays where it is unless a neighbour is strictly higher
    oy = np.array([0, -1, -1, -1, 0, 0, 1, 1, 1])
    ox = np.array([0, -1, 0, 1, -1, 1, -1, 0, 1])
    settled = np.zeros(rows.size, bool)
    for _ in range(steps + 1):
        vals = padded[rows[:, None] + 1 + oy[None], cols[:, None] + 1 + ox[None]]
        best = np.argmax(vals, axis=1)
        settled = best == 0
        if settled.all():
            break
        rows, cols = rows + oy[best], cols + ox[best]
    return rows, cols, settled
