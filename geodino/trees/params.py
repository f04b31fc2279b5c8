"""Parameters of individual-tree detection, in metres, and their conversion to pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

from geodino.errors import ConfigError


@dataclass(frozen=True)
class CrownParams:
    """How trees are found in a canopy-height raster. Every length is in metres.

    The tree-top search window is a circle whose diameter grows linearly with the height of
    the pixel tested, as in Popescu & Wynne (2004): ``window_m(h) = window_intercept_m +
    window_slope * h``, clipped to [``window_min_m``, ``window_max_m``]. The default,
    1 m + 0.08 h (1.8 m at 10 m height, 3.4 m at 30 m), is the linear form of lidR's ``lmf``
    documentation example (3 + 0.1 h there) made narrower, because a window wider than the
    distance between neighbouring tops merges trees: on the synthetic scenes (crowns 3-11 m
    wide, tops as close as 2.4 m) 3 + 0.1 h finds 72% of the visible tops, 1 + 0.08 h 92%.
    For a rough lidar CHM at fine pixels add smoothing (``smoothing_m`` 0.3-0.5) or widen
    the window to your forest's crown-width allometry.
    """

    min_height: float = 2.0  # m; lower pixels are neither tops nor crowns (lidR's hmin)
    smoothing_m: float = 0.0  # Gaussian sigma in metres applied before the search; 0: none
    window_intercept_m: float = 1.0
    window_slope: float = 0.08  # metres of window diameter per metre of height
    window_min_m: float = 1.0
    window_max_m: float = 10.0
    max_crown_radius_m: float = 10.0  # a crown pixel is at most this far from its top
    crown_fraction: float = 0.5  # a crown pixel is at least this fraction of its top's height
    block: int = 1024  # pixels per block side (memory and parallelism only, not results)

    def __post_init__(self) -> None:
        checks = [
            (self.min_height >= 0, "min_height must be >= 0 m"),
            (self.smoothing_m >= 0, "smoothing_m must be >= 0 m (0 turns smoothing off)"),
            (self.window_slope >= 0, "window_slope must be >= 0"),
            (0 < self.window_min_m <= self.window_max_m, "need 0 < window_min_m <= window_max_m"),
            (self.window_max_m <= 60, "window_max_m must be at most 60 m"),
            (0 < self.max_crown_radius_m <= 50, "max_crown_radius_m must be in (0, 50] m"),
            (0 <= self.crown_fraction < 1, "crown_fraction must be in [0, 1)"),
            (self.block >= 64 and self.block % 16 == 0, "block must be a multiple of 16, at least 64"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def window_diameter_m(self, height):
        """Search-window diameter (m) for tops of this height (array or scalar)."""
        import numpy as np

        return np.clip(self.window_intercept_m + self.window_slope * np.asarray(height, np.float64),
                       self.window_min_m, self.window_max_m)


@dataclass(frozen=True)
class PixelSize:
    """Ground size of one pixel in metres along rows (y) and columns (x)."""

    y: float
    x: float

    @property
    def area_m2(self) -> float:
        return self.y * self.x

    def reach(self, metres: float) -> int:
        """Pixels needed to cover ``metres`` along the shorter pixel side (at least 1)."""
        return max(1, math.ceil(metres / min(self.y, self.x)))


@dataclass(frozen=True)
class Halos:
    """Margins around a block core, in pixels, for each stage to see all it depends on."""

    smooth: int  # the Gaussian kernel's radius
    climb: int  # steps a smoothed top may move uphill on the raw heights
    window: int  # the largest search-window radius
    crown: int  # the largest crown radius

    @property
    def tops(self) -> int:
        """Tops found in a core are exact when the block sees this far around it."""
        return self.climb + self.window + self.smooth + 1

    @property
    def crowns(self) -> int:
        """Crowns of a core's trees reach one crown radius out, the tops competing with them
        another, and those competitors' own neighbours a third: the flood that splits two
        crowns is shaped by them too. With two radii, one crown pixel of the 8426 trees of
        the real lidar test raster changed with the block size; with three, none (tested).
        The smoothed surface needs its kernel beyond that."""
        return 3 * self.crown + self.smooth + 2


def halos(params: CrownParams, pixel: PixelSize) -> Halos:
    return Halos(smooth=smoothing_radius(params, pixel), climb=climb_steps(params, pixel),
                 window=pixel.reach(params.window_max_m / 2), crown=pixel.reach(params.max_crown_radius_m))


def climb_steps(params: CrownParams, pixel: PixelSize) -> int:
    """Most steps a smoothed top may take uphill on the raw heights to a raw local maximum:
    the smoothing kernel's radius plus the largest search window's (0 without smoothing)."""
    if params.smoothing_m <= 0:
        return 0
    return smoothing_radius(params, pixel) + pixel.reach(params.window_max_m / 2) + 1


SMOOTH_TRUNCATE = 2.0  # Gaussian kernel radius in sigmas


def smoothing_sigma_px(params: CrownParams, pixel: PixelSize) -> tuple[float, float]:
    return params.smoothing_m / pixel.y, params.smoothing_m / pixel.x


def smoothing_radius(params: CrownParams, pixel: PixelSize) -> int:
    if params.smoothing_m <= 0:
        return 0
    return int(SMOOTH_TRUNCATE * max(smoothing_sigma_px(params, pixel)) + 0.5)
