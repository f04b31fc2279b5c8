"""A synthetic pair of dates of one landscape, with the truth of what changed between them.

The later date is the same synthetic landscape (:mod:`geodino.synth`, same seed) with edits
that are, like everything there, pure functions of position:

- a clear-cut: the tree cover inside one stand becomes bare soil and grass, its trees gone;
- growth: every tree of another stand is 2-5 m taller (its crown a little wider);
- a new built-up lot on open land;
- everywhere else nothing changes on the ground, but the sun stands lower and further east
  (shadows are longer and point elsewhere), reflectance has a small gain, offset and fresh
  sensor noise, and the valid footprint may be rotated differently: "no change" is never
  "equal pixels".

Where the stands go is decided once from a coarse sample of the land cover (the most
forested places for the clear-cut and the growth stand, the most open one for the lot), so
the pair is a pure function of the config. Truth rasters: ``truth_change.tif`` (what happened
where, with a colour table) and ``truth_canopy_change.tif`` (after minus before, metres).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geodino.classes import ClassTable, LandCoverClass
from geodino.synth import (
    BARE,
    BUILT,
    CROP,
    GRASS,
    SHRUB,
    TREE,
    SynthConfig,
    SynthOutputs,
    _fbm,
    _profile,
    _uniform,
    footprint_mask,
    generate,
    landcover_at,
)

UNCHANGED, CLEARCUT, GROWTH, NEW_BUILT = 1, 2, 3, 4
TRUTH_CLASSES = ClassTable((
    LandCoverClass(UNCHANGED, "unchanged", (210, 210, 210)),
    LandCoverClass(CLEARCUT, "clear-cut", (220, 30, 30)),
    LandCoverClass(GROWTH, "tree growth", (30, 160, 60)),
    LandCoverClass(NEW_BUILT, "new built-up", (250, 150, 0)),
), nodata=0)


@dataclass(frozen=True)
class Stand:
    """A rotated rectangle in global pixel coordinates (centre, half sizes, angle in degrees)."""

    cy: float
    cx: float
    half_h: float
    half_w: float
    angle: float = 0.0

    def contains(self, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
        a = math.radians(self.angle)
        dy, dx = gy - self.cy, gx - self.cx
        ry = dy * math.cos(a) - dx * math.sin(a)
        rx = dy * math.sin(a) + dx * math.cos(a)
        return (np.abs(ry) <= self.half_h) & (np.abs(rx) <= self.half_w)

    @property
    def radius(self) -> float:
        return math.hypot(self.half_h, self.half_w)


@dataclass(frozen=True)
class ChangeEdit:
    """What differs at the later date; passed to :func:`geodino.synth.render_block` as ``edit``."""

    seed: int
    clearcut: Stand
    growth: Stand
    lot: Stand
    gain: tuple[float, float, float, float] = (1.04, 1.03, 1.05, 0.97)
    offset: tuple[float, float, float, float] = (25.0, 15.0, 20.0, -30.0)
    noise: float = 0.04

    def landcover(self, gy, gx, lc: np.ndarray) -> np.ndarray:
        cut = self.clearcut.contains(gy, gx) & (lc == TREE)
        grass = _fbm(self.seed, 50, gy, gx, 40.0, octaves=2) > 0.55
        lc = np.where(cut, np.where(grass, np.uint8(GRASS), np.uint8(BARE)), lc)
        return np.where(self.lot.contains(gy, gx), np.uint8(BUILT), lc).astype(np.uint8)

    def tree_heights(self, cy, cx, ci, cj, height: np.ndarray) -> np.ndarray:
        grown = height + 2.0 + 3.0 * _uniform(self.seed, 51, ci, cj)
        return np.where(self.growth.contains(cy, cx), np.minimum(grown, 40.0), height)

    def radiometry(self, spectra: np.ndarray, gy, gx) -> np.ndarray:
        out = np.empty_like(spectra)
        for band in range(spectra.shape[0]):
            noise = _uniform(self.seed, 52 + band, gy, gx) - 0.5
            out[band] = (spectra[band] * self.gain[band] + self.offset[band]) * (1.0 + self.noise * noise)
        return out

    def truth(self, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
        """Truth change codes (:data:`TRUTH_CLASSES`) at global pixel coordinates."""
        forest = landcover_at(self.seed, gy, gx) == TREE
        out = np.full(gy.shape, UNCHANGED, np.uint8)
        out[self.growth.contains(gy, gx) & forest] = GROWTH
        out[self.clearcut.contains(gy, gx) & forest] = CLEARCUT
        out[self.lot.contains(gy, gx)] = NEW_BUILT
        return out


def plan_change(cfg: SynthConfig, step: int = 8) -> ChangeEdit:
    """Place the clear-cut, the growth stand and the lot for a scene of this config.

    Scores every candidate position on a ``step``-pixel sample of the land cover with summed
    area tables (forest share for the stands, open-land share for the lot), inside the middle
    70% of the scene so a nodata collar does not cut them.
    """
    rows = np.arange(step / 2, cfg.height, step)
    cols = np.arange(step / 2, cfg.width, step)
    gy, gx = np.meshgrid(rows, cols, indexing="ij")
    lc = landcover_at(cfg.seed, gy, gx)
    forest = (lc == TREE).astype(np.float64)
    open_land = np.isin(lc, (GRASS, BARE, SHRUB, CROP)).astype(np.float64)
    big = (max(24.0, 0.09 * cfg.height), max(24.0, 0.12 * cfg.width))
    small = (max(12.0, 0.03 * cfg.height), max(16.0, 0.045 * cfg.width))
    clearcut = _best(forest, big, 15.0, step, [])
    growth = _best(forest, big, -10.0, step, [clearcut])
    lot = _best(open_land, small, 0.0, step, [clearcut, growth])
    return ChangeEdit(cfg.seed, clearcut, growth, lot)


def _best(score: np.ndarray, half: tuple[float, float], angle: float, step: int, avoid: list[Stand]) -> Stand:
    """The stand whose bounding box has the highest mean ``score`` (first such, row-major)."""
    hh, hw = max(1, round(half[0] / step)), max(1, round(half[1] / step))
    n, m = score.shape
    sat = np.pad(score, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    r = np.arange(n)[:, None]
    c = np.arange(m)[None, :]
    r0, r1 = np.clip(r - hh, 0, n), np.clip(r + hh, 0, n)
    c0, c1 = np.clip(c - hw, 0, m), np.clip(c + hw, 0, m)
    value = (sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]) / np.maximum(1, (r1 - r0) * (c1 - c0))
    cy, cx = (r + 0.5) * step, (c + 0.5) * step
    allowed = ((r >= max(hh, int(0.15 * n))) & (r < min(n - hh, math.ceil(0.85 * n)))
               & (c >= max(hw, int(0.15 * m))) & (c < min(m - hw, math.ceil(0.85 * m))))
    radius = math.hypot(*half)
    for o in avoid:
        allowed &= np.hypot(cy - o.cy, cx - o.cx) >= radius + o.radius + 2 * step
    if not allowed.any():  # a scene too small for separate stands: the middle
        allowed = np.zeros_like(allowed)
        allowed[n // 2, m // 2] = True
    # ties (e.g. several fully forested places) go to the one nearest the middle
    centrality = np.hypot(cy / (n * step) - 0.5, cx / (m * step) - 0.5)
    i, j = np.unravel_index(np.argmax(np.where(allowed, value - 1e-3 * centrality, -1.0)), value.shape)
    return Stand(float(cy[i, 0]), float(cx[0, j]), half[0], half[1], angle)


@dataclass
class ChangePair:
    before: SynthOutputs
    after: SynthOutputs
    truth_change: Path
    truth_canopy_change: Path
    edit: ChangeEdit
    dates: tuple[str, str]


def _datetime_tag(date: str) -> str:
    """TIFFTAG_DATETIME's form (YYYY:MM:DD HH:MM:SS) of an ISO date."""
    return date.replace("-", ":") + " 10:30:00"


def generate_pair(out_dir: str | os.PathLike, cfg: SynthConfig | None = None, *,
                  dates: tuple[str, str] = ("2021-06-14", "2024-06-20"), overwrite: bool = False,
                  progress=None) -> ChangePair:
    """Write ``before/`` and ``after/`` (each as :func:`geodino.synth.generate` writes a scene)
    and the truth rasters ``truth_change.tif`` and ``truth_canopy_change.tif`` to out_dir.

    The acquisition dates are stored as TIFFTAG_DATETIME, so ``geodino change`` finds them.
    """
    from geodino.errors import OutputExistsError
    from geodino.export import atomic_path

    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    truth_change, truth_chm = out / "truth_change.tif", out / "truth_canopy_change.tif"
    existing = [str(p) for p in (truth_change, truth_chm) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
    edit = plan_change(cfg)
    after_cfg = replace(cfg, sun_elevation=max(20.0, cfg.sun_elevation - 8.0),
                        sun_azimuth=(cfg.sun_azimuth + 30.0) % 360.0, collar_angle=-0.75 * cfg.collar_angle)
    scenario = json.dumps({k: v for k, v in asdict(edit).items()})
    half = (lambda n, total: progress(n, 2 * total)) if progress else None
    before = generate(out / "before", cfg, overwrite=overwrite, progress=half,
                      extra_tags={"TIFFTAG_DATETIME": _datetime_tag(dates[0]), "change_role": "before"})
    after = generate(out / "after", after_cfg, overwrite=overwrite, edit=edit,
                     progress=(lambda n, total: progress(total + n, 2 * total)) if progress else None,
                     extra_tags={"TIFFTAG_DATETIME": _datetime_tag(dates[1]), "change_role": "after",
                                 "change_scenario": scenario})
    tags = {"generator": "geodino.synth_change", "dates": f"{dates[0]},{dates[1]}", "change_scenario": scenario}
    # one with: the datasets close before atomic_path renames the files into place
    with atomic_path(truth_change) as t_change, atomic_path(truth_chm) as t_chm, \
            rasterio.open(before.canopy_height) as b, rasterio.open(after.canopy_height) as a, \
            rasterio.open(t_change, "w", **_profile(cfg, 1, "uint8", 0, 2)) as dc, \
            rasterio.open(t_chm, "w", **_profile(cfg, 1, "float32", float("nan"), 3)) as dh:
        dc.update_tags(**tags)
        dc.set_band_description(1, f"truth change {dates[0]} -> {dates[1]}")
        dc.write_colormap(1, TRUTH_CLASSES.colormap())
        dc.update_tags(1, class_codes=",".join(map(str, TRUTH_CLASSES.codes)),
                       class_names=",".join(TRUTH_CLASSES.names))
        dh.update_tags(**tags)
        dh.set_band_description(1, f"truth canopy change {dates[0]} -> {dates[1]}")
        dh.update_tags(1, units="m")
        for r in range(0, cfg.height, cfg.block):
            for c in range(0, cfg.width, cfg.block):
                h, w = min(cfg.block, cfg.height - r), min(cfg.block, cfg.width - c)
                win = Window(c, r, w, h)
                gy, gx = np.meshgrid(np.arange(r, r + h) + 0.5, np.arange(c, c + w) + 0.5, indexing="ij")
                delta = a.read(1, window=win) - b.read(1, window=win)
                codes = edit.truth(gy, gx)
                valid = np.isfinite(delta)
                if cfg.nodata_collar:  # the collars of both dates
                    valid &= footprint_mask(cfg, gy, gx) & footprint_mask(after_cfg, gy, gx)
                codes[~valid] = 0
                dc.write(codes, 1, window=win)
                dh.write(np.where(valid, delta, np.nan).astype(np.float32), 1, window=win)
    return ChangePair(before, after, truth_change, truth_chm, edit, tuple(dates))


__all__ = [
    "CLEARCUT",
    "GROWTH",
    "NEW_BUILT",
    "TRUTH_CLASSES",
    "UNCHANGED",
    "ChangeEdit",
    "ChangePair",
    "Stand",
    "generate_pair",
    "plan_change",
]
