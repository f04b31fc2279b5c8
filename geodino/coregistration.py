"""Co-registration check between dates: how far one date's content sits from another's.

Two scenes warped onto one grid should show the same ground at the same pixel. When they
do not (a bad orthorectification, a shifted geotransform), every edge in the image shows up
as change. The shift is estimated with scikit-image's phase correlation
(``skimage.registration.phase_cross_correlation``) on the edges of the band mean, in two
steps on one read of the central 2048 x 2048 pixels of both dates: phase correlation of
every 4th pixel finds shifts of up to a few hundred pixels to about 4, then up to nine
full-resolution windows, valid in both dates and spread over that area, refine it to a
tenth of a pixel (the cost does not grow with the scene); the median
of the windows' estimates is reported (real change or moving shadows in one window do not
sway it). Only the estimate is made: nothing is resampled.

On a small common grid (a ``--grid`` reference or a coarse ``--target-gsd`` can leave a few
hundred pixels or fewer) the windows shrink so that a 3 x 3 layout still fits; a shift is
only called a mis-registration when at least :data:`MIN_WINDOWS` windows agree (their spread
within the limit). Otherwise the check is *inconclusive* and says so: before this, a 160 x
145 pixel grid fitted no window at all and the coarse estimate of a changed landscape alone
(3.2 px, and 14.4 px on a 90 x 100 grid) was reported as a mis-registration of a pair that
is exactly co-registered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

LIMIT_PX = 1.0
MIN_WINDOWS = 3  # windows that must agree before a shift is reported as a mis-registration
MIN_WINDOW_PX = 32  # smaller windows hold too few edges for phase correlation
READ_PIECE = 256  # largest piece of a check's read: no larger than the run's own windows


def read_area(scene, area: Window) -> tuple[np.ndarray, np.ndarray]:
    """``scene.read(area)`` (raw values, validity), read in pieces of at most
    :data:`READ_PIECE` pixels a side.

    The scene's cache of decoded source tiles (:mod:`geodino.tiles`) makes room for the
    largest window read through it and keeps that room: one read of a 2048² crop of an 8192²
    scene left room for four rows of tiles across the width, which the streamed pass then
    filled (2 x 228 MB for a change of two 8192² dates, 2 x 48 MB for the run's own
    windows). Pieces no larger than a window leave the cache as the run sizes it; the
    values are the same, to the bit.
    """
    r0, c0, h, w = int(area.row_off), int(area.col_off), int(area.height), int(area.width)
    data = np.empty((len(scene.bands), h, w), np.float32)
    valid = np.empty((h, w), bool)
    for r in range(0, h, READ_PIECE):
        for c in range(0, w, READ_PIECE):
            ph, pw = min(READ_PIECE, h - r), min(READ_PIECE, w - c)
            part = np.empty((len(scene.bands), ph, pw), np.float32)
            _, ok = scene.read(Window(c0 + c, r0 + r, pw, ph), out=part)
            data[:, r:r + ph, c:c + pw], valid[r:r + ph, c:c + pw] = part, ok
    return data, valid


@dataclass(frozen=True)
class Coregistration:
    """Displacement (rows down, columns right) of ``moving``'s content relative to ``reference``'s,
    in pixels of the common grid; ``spread_px``: median absolute deviation of the windows.

    ``verified``: at least :data:`MIN_WINDOWS` windows gave an estimate and they agree within
    ``limit_px``; when not, the estimate is not evidence either way (the report's ``ok`` is null).
    """

    reference: str
    moving: str
    dy: float
    dx: float
    windows: int
    spread_px: float
    limit_px: float = LIMIT_PX

    @property
    def verified(self) -> bool:
        return self.windows >= MIN_WINDOWS and self.spread_px <= self.limit_px

    @property
    def magnitude(self) -> float:
        return math.hypot(self.dy, self.dx)

    @property
    def ok(self) -> bool:
        return self.magnitude <= self.limit_px

    @property
    def warning(self) -> str | None:
        if not self.verified:
            return (f"the co-registration of {self.moving} against {self.reference} could not be verified "
                    f"({self.windows} windows with enough valid overlap, spread {self.spread_px:.1f} pixels; "
                    f"{MIN_WINDOWS} that agree within {self.limit_px:g} pixel are needed): check the pair's "
                    f"alignment by eye before trusting these change maps")
        if self.ok:
            return None
        return (f"{self.moving} is shifted by {self.magnitude:.1f} pixels ({self.dy:+.1f} rows, {self.dx:+.1f} "
                f"columns) against {self.reference}: the dates are not co-registered, so edges everywhere "
                f"will show up as change; co-register them (e.g. with AROSICS or gdalwarp -tps on tie "
                f"points) before trusting these change maps")

    def to_dict(self) -> dict:
        return {"reference": self.reference, "moving": self.moving, "shift_px": [round(self.dy, 2), round(self.dx, 2)],
                "magnitude_px": round(self.magnitude, 2), "windows": self.windows,
                "spread_px": round(self.spread_px, 2), "limit_px": self.limit_px, "verified": self.verified,
                "ok": self.ok if self.verified else None, "warning": self.warning}


def _grey(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Band mean, standardised over valid pixels (gain and offset between dates drop out); 0 elsewhere."""
    g = data.mean(axis=0, dtype=np.float64)
    v = g[valid]
    if v.size:
        g = (g - v.mean()) / (v.std() or 1.0)
    return np.where(valid, g, 0.0)


def _edges(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Gradient magnitude (Sobel) of the band mean, zero on and next to invalid pixels.

    Edges rather than brightness: measured on the synthetic pairs, brightness correlation of
    a small scene whose second date was reprojected (so slightly blurred) locked onto a large
    changed area 49 pixels off; its edges (crowns, roads, roofs: what does not move) found 0.1.
    """
    from scipy.ndimage import binary_erosion
    from skimage.filters import sobel

    edges = sobel(_grey(data, valid))
    edges[~binary_erosion(valid, iterations=2)] = 0.0
    return edges


def _coarse(ref: np.ndarray, ref_ok: np.ndarray, mov: np.ndarray, mov_ok: np.ndarray, scale: float
            ) -> tuple[int, int]:
    """Integer full-resolution shift from decimated reads of both whole scenes.

    Phase correlation of edges (whitened spectra, Hann taper) rather than a masked
    cross-correlation of brightness, which locked onto a large clear-cut 80 pixels off on
    the synthetic pair where this found the 3-pixel test shift.
    """
    from skimage.filters import window as taper
    from skimage.registration import phase_cross_correlation

    if ref.shape != mov.shape or not (ref_ok.any() and mov_ok.any()):
        return 0, 0
    hann = taper("hann", ref.shape[-2:])
    shift, _, _ = phase_cross_correlation(_edges(ref, ref_ok) * hann, _edges(mov, mov_ok) * hann, upsample_factor=10)
    return round(-shift[0] * scale), round(-shift[1] * scale)


def _window_origins(valid: np.ndarray, scale: float, size: int, shape: tuple[int, int], per_side: int = 3
                    ) -> list[tuple[int, int]]:
    """Up to per_side² window origins (full resolution) fully valid on the decimated mask, one per
    sector of the scene, each the valid one nearest its sector's centre."""
    from scipy.ndimage import minimum_filter

    k = max(1, math.ceil(size / scale))
    # "nearest": a window may touch the crop's edge (origins are clipped inside below); with a
    # zero border a window as large as the grid never fitted
    inside = minimum_filter(valid.astype(np.uint8), size=k + 2, mode="nearest") > 0
    rows, cols = np.nonzero(inside)
    if not len(rows):
        return []
    height, width = shape
    # decimated centre -> full-resolution window origin
    r0 = np.clip(((rows + 0.5) * scale - size / 2).astype(int), 0, max(0, height - size))
    c0 = np.clip(((cols + 0.5) * scale - size / 2).astype(int), 0, max(0, width - size))
    out = []
    for i in range(per_side):
        for j in range(per_side):
            cy, cx = (i + 0.5) * height / per_side, (j + 0.5) * width / per_side
            sector = ((r0 + size / 2) * per_side // height == i) & ((c0 + size / 2) * per_side // width == j)
            if sector.any():
                d = np.hypot(r0[sector] + size / 2 - cy, c0[sector] + size / 2 - cx)
                best = np.argmin(d)
                out.append((int(r0[sector][best]), int(c0[sector][best])))
    return sorted(set(out))


def check_coregistration(reference, moving, *, reference_name: str = "reference", moving_name: str = "moving",
                         window: int = 256, crop: int = 2048, max_size: int = 512,
                         limit_px: float = LIMIT_PX) -> Coregistration:
    """Estimate how far ``moving``'s content is displaced from ``reference``'s (two
    :class:`geodino.scene.Scene` on the same grid; raw bands are compared, not model outputs).

    Both dates are read once, over the central ``crop`` x ``crop`` pixels of the grid (the
    cost does not grow with the scene; shifts up to a few hundred pixels are found); the
    coarse step uses every f-th pixel of it (at most ``max_size`` across), the windows are
    cut from it at full resolution.
    """
    from skimage.filters import window as taper
    from skimage.registration import phase_cross_correlation

    grid = reference.grid
    h, w = min(crop, grid.height), min(crop, grid.width)
    area = Window((grid.width - w) // 2, (grid.height - h) // 2, w, h)
    ref, ref_ok = read_area(reference, area)
    mov, mov_ok = read_area(moving, area)
    f = max(1, math.ceil(max(h, w) / max_size))
    cdy, cdx = _coarse(ref[:, ::f, ::f], ref_ok[::f, ::f], mov[:, ::f, ::f], mov_ok[::f, ::f], f)
    size = min(window, max(MIN_WINDOW_PX, min(h, w) // 3))  # a 3 x 3 layout fits on small grids
    hann = taper("hann", (size, size))
    estimates = []
    for r, c in _window_origins((ref_ok & mov_ok)[::f, ::f], f, size, (h, w)):
        mr, mc = r + cdy, c + cdx
        if not (0 <= mr <= h - size and 0 <= mc <= w - size):
            continue
        a, a_ok = ref[:, r:r + size, c:c + size], ref_ok[r:r + size, c:c + size]
        b, b_ok = mov[:, mr:mr + size, mc:mc + size], mov_ok[mr:mr + size, mc:mc + size]
        if not (a_ok.all() and b_ok.all()):
            continue
        shift, _, _ = phase_cross_correlation(_edges(a, a_ok) * hann, _edges(b, b_ok) * hann, upsample_factor=10)
        estimates.append((cdy - shift[0], cdx - shift[1]))
    if estimates:
        est = np.asarray(estimates)
        dy, dx = np.median(est, axis=0)
        spread = float(np.median(np.hypot(est[:, 0] - dy, est[:, 1] - dx)))
    else:
        dy, dx, spread = float(cdy), float(cdx), float(f)
    return Coregistration(reference_name, moving_name, float(dy), float(dx), len(estimates), spread, limit_px)


__all__ = ["LIMIT_PX", "MIN_WINDOWS", "Coregistration", "check_coregistration", "read_area"]
