"""Relative radiometric normalisation: a later date's bands mapped onto the first date's.

Two acquisitions of unchanged ground differ in gain and offset (sun elevation, atmosphere,
sensor calibration), and a model fitted on one radiometry reads a brighter date as different
ground: on the synthetic pair (gain 1.03-1.05, offset +15-25 on reflectance x 10000) the demo
model made unchanged forest 3 m lower at the later date, and 9-50% of it "canopy loss".
Relative radiometric normalisation, the usual step before differencing two dates, fits per
band ``later = gain * first + offset`` on ground that did not change and applies it.

How the fit is made (written here because no library we use does it on lazy scenes):

- pixel pairs are aggregated to 16 x 16 pixel block means first: at single pixels the two
  dates correlate poorly even on unchanged ground (shadows move with the sun, sensor noise),
  which biases a regression; block means keep the radiometric relation and lose the rest;
- blocks come from the whole grid up to 2048 x 2048 pixels, beyond that from 8 x 8 windows
  of 256 x 256 pixels spread over it (the cost does not grow with the scene);
- the line is a reduced-major-axis fit (symmetric in the two dates) with iterative 3-sigma
  trimming of the residuals (median absolute deviation): changed ground (a clear-cut, new
  roofs) falls out as outliers and the fit rests on pseudo-invariant blocks.

On the synthetic pairs (gain 1.03-1.05, offset +15-25) the fitted gains are within
0.01-0.02 of the true ones and the fitted lines within about 1% of the true lines over the
forest's reflectances (gain and offset trade off; the other sun's deeper shadows are in the
fit too, as they should be for the model's sake). The fits are applied by changing each date's fixed normalisation (``lo``/``hi`` of
:class:`geodino.sensor.Normalisation`) so that every date lands on the dates' mean
radiometry (:func:`common_normalisations`): one global linear map per date (DESIGN
invariant 4), nothing per window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from rasterio.windows import Window

from geodino.coregistration import read_area

BLOCK = 16  # pixels per side of the aggregated pairs (one backbone patch)
SAMPLE_WINDOW = 256
SAMPLES_PER_SIDE = 8
MIN_BLOCKS = 50
GAIN_RANGE = (0.5, 2.0)  # gain relative to the dates' means; outside: not the same ground, not applied


@dataclass(frozen=True)
class RadiometricMatch:
    """Per band ``moving = gain * reference + offset`` (raw units), fitted on ``blocks`` block means,
    ``kept`` of them pseudo-invariant; ``applied`` False (with ``reason``) when the fit was unusable."""

    gain: tuple[float, ...]
    offset: tuple[float, ...]
    blocks: int
    kept: float
    applied: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return {"method": "reduced major axis on 16 x 16 block means, 3-sigma trimmed",
                "gain": [round(g, 4) for g in self.gain], "offset": [round(o, 2) for o in self.offset],
                "blocks": self.blocks, "pseudo_invariant_share": round(self.kept, 3), "applied": self.applied,
                "reason": self.reason}


def _windows(grid) -> list[Window]:
    """The whole grid when it is no larger than the sample, else a spread grid of sample windows."""
    if grid.height * grid.width <= (SAMPLES_PER_SIDE * SAMPLE_WINDOW) ** 2:
        return [Window(0, 0, grid.width, grid.height)]
    size = min(SAMPLE_WINDOW, grid.height, grid.width)
    n_r = min(SAMPLES_PER_SIDE, max(1, grid.height // size))
    n_c = min(SAMPLES_PER_SIDE, max(1, grid.width // size))
    rows = np.linspace(0, grid.height - size, n_r).astype(int)
    cols = np.linspace(0, grid.width - size, n_c).astype(int)
    return [Window(int(c), int(r), size, size) for r in rows for c in cols]


def _block_means(data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bands, h, w = data.shape
    h, w = h // BLOCK * BLOCK, w // BLOCK * BLOCK
    means = data[:, :h, :w].reshape(bands, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(2, 4), dtype=np.float64)
    full = valid[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).all(axis=(1, 3))
    return means, full


def _samples(reference, moving) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for win in _windows(reference.grid):
        a, a_ok = read_area(reference, win)  # the whole of a small grid in pieces
        b, b_ok = read_area(moving, win)
        ma, ok = _block_means(a, a_ok & b_ok)
        mb, _ = _block_means(b, a_ok & b_ok)
        xs.append(ma[:, ok])
        ys.append(mb[:, ok])
    return np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)


def _trimmed_rma(x: np.ndarray, y: np.ndarray, rounds: int = 5) -> tuple[float, float, np.ndarray]:
    keep = np.ones(x.size, bool)
    gain, offset = 1.0, 0.0
    for _ in range(rounds):
        xk, yk = x[keep], y[keep]
        if xk.size < MIN_BLOCKS or xk.std() == 0 or yk.std() == 0:
            break
        gain = math.copysign(yk.std() / xk.std(), np.corrcoef(xk, yk)[0, 1])
        offset = float(yk.mean() - gain * xk.mean())
        residual = y - (gain * x + offset)
        scale = 1.4826 * np.median(np.abs(residual[keep]))
        if scale == 0:
            break
        keep = np.abs(residual) <= 3.0 * scale
    return float(gain), offset, keep


def match_radiometry(reference, moving) -> RadiometricMatch:
    """Fit ``moving``'s bands against ``reference``'s (two :class:`geodino.scene.Scene` on one grid,
    the same bands selected).

    A fit is refused when a gain is not positive or, relative to the dates' scales (gain x mean
    of the first / mean of the later date), outside :data:`GAIN_RANGE`: a date in reflectance
    0-1 against one in reflectance x 10000 is a plausible pair, a negative gain is not."""
    x, y = _samples(reference, moving)
    n = x.shape[1]
    identity = ((1.0,) * x.shape[0], (0.0,) * x.shape[0])
    if n < MIN_BLOCKS:
        return RadiometricMatch(*identity, n, 0.0, False,
                                f"{n} blocks of {BLOCK} x {BLOCK} pixels valid in both dates (at least {MIN_BLOCKS} needed)")
    gains, offsets, kept = [], [], []
    for xb, yb in zip(x, y):
        g, o, keep = _trimmed_rma(xb, yb)
        gains.append(g)
        offsets.append(o)
        kept.append(keep.mean())
    share = float(min(kept))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = list(np.asarray(gains) * x.mean(axis=1) / y.mean(axis=1))
    if not all(g > 0 for g in gains) or not all(GAIN_RANGE[0] <= g <= GAIN_RANGE[1] for g in relative):
        return RadiometricMatch(tuple(gains), tuple(offsets), n, share, False,
                                f"fitted gains {', '.join(f'{g:.2f}' for g in relative)} (relative to the dates' means) are outside "
                                f"{GAIN_RANGE[0]}-{GAIN_RANGE[1]}: the dates do not look like one ground")
    return RadiometricMatch(tuple(gains), tuple(offsets), n, share, True)


def common_normalisations(reference_norm, norms, matches: list[RadiometricMatch]) -> list:
    """Each date's normalisation onto the dates' mean radiometry.

    ``matches[k]`` fits date k + 1 against the first date (``y_k = g_k x + o_k``; the first date
    is ``g = 1, o = 0``). Every date is mapped onto ``z = mean(g) x + mean(o)``, the average of
    the dates' radiometries, rather than onto the first date's: that target does not depend on
    the order of the dates (with two dates the reduced-major-axis fit is symmetric), so swapping
    them still negates the change. When any fit was unusable, every date keeps its own ``norms``.
    """
    if not all(m.applied for m in matches):
        return list(norms)
    g = np.vstack([np.ones(len(matches[0].gain))] + [np.asarray(m.gain) for m in matches])
    o = np.vstack([np.zeros(len(matches[0].offset))] + [np.asarray(m.offset) for m in matches])
    big_g, big_o = g.mean(axis=0), o.mean(axis=0)
    lo, hi = np.asarray(reference_norm.lo), np.asarray(reference_norm.hi)
    out = []
    for gk, ok in zip(g, o):
        # raw y of date k -> z = big_g * (y - ok) / gk + big_o; z is stretched by the first date's lo..hi
        out.append(replace(reference_norm, lo=tuple(map(float, gk * (lo - big_o) / big_g + ok)),
                           hi=tuple(map(float, gk * (hi - big_o) / big_g + ok))))
    return out


__all__ = ["RadiometricMatch", "common_normalisations", "match_radiometry"]
