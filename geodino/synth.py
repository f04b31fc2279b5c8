"""Deterministic synthetic scenes with ground truth.

A scene is a pure function of (seed, global pixel position): every pixel's land cover,
canopy height and reflectance is computed from counter-based hashes and value noise of its
global coordinates, never from a random stream. Any block can therefore be rendered on its
own, the result does not depend on the block size, and a 16384 x 16384 scene is written
block by block in bounded memory.

What is drawn, at 0.6 m ground sampling:
- land cover with an ESA WorldCover-like legend: natural vegetation from a moisture field
  (tree cover, shrubland, grassland, bare), cropland parcels, towns with buildings on lots,
  straight roads, lakes and meandering rivers;
- individual tree crowns (2-40 m tall, radius growing with height) inside tree cover; the
  canopy-height raster is the crown surface in metres, 0 m elsewhere;
- 4-band surface reflectance x10000 (blue, green, red, NIR): crowns are bright in NIR and
  shaded by their own slope, and every crown casts a ground shadow whose length is
  height / tan(sun elevation) in the direction away from the sun, so height is learnable
  from the image;
- optionally a rotated valid footprint (a nodata collar like a real scene edge).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from geodino.classes import WORLDCOVER

TREE, SHRUB, GRASS, CROP, BUILT, BARE, WATER = 10, 20, 30, 40, 50, 60, 80
BAND_NAMES = ("blue", "green", "red", "nir")
GENERATOR_VERSION = "1"

# Surface reflectance x10000 per class (blue, green, red, NIR): typical values of
# vegetation, soil, roofs and water in the visible and near infrared.
_SPECTRA = {
    TREE: (260, 480, 280, 3600),
    SHRUB: (430, 640, 650, 2600),
    GRASS: (400, 720, 560, 3100),
    CROP: (480, 820, 620, 3900),
    BUILT: (1250, 1250, 1320, 1550),
    BARE: (1350, 1600, 1900, 2350),
    WATER: (620, 520, 300, 140),
}
_FOREST_FLOOR = (300, 450, 380, 2400)
_BARE_FIELD = (900, 1100, 1300, 2000)

_CELL = 10  # tree cell size in pixels; one crown at most per cell
_MAX_RADIUS = 9.0  # pixels; < _CELL so a crown only reaches its 8 neighbour cells
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SynthConfig:
    width: int = 1024
    height: int = 1024
    seed: int = 0
    gsd: float = 0.6
    crs: str = "EPSG:32737"
    origin_x: float = 300000.0
    origin_y: float = 9700000.0
    sun_elevation: float = 55.0
    sun_azimuth: float = 45.0
    nodata_collar: bool = False
    collar_angle: float = 8.0
    block: int = 512

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError("width and height must be positive")
        if not 5.0 <= self.sun_elevation <= 90.0:
            raise ValueError("sun elevation must be between 5 and 90 degrees")
        if self.block % 16 or self.block < 16:
            raise ValueError("block must be a positive multiple of 16")

    @property
    def transform(self):
        return from_origin(self.origin_x, self.origin_y, self.gsd, self.gsd)

    @property
    def shadow_step(self) -> tuple[float, float]:
        """Unit shadow direction in (row, col): away from the sun, rows grow southwards."""
        az = math.radians(self.sun_azimuth)
        return math.cos(az), -math.sin(az)

    def shadow_length_px(self, height_m):
        return np.asarray(height_m) / math.tan(math.radians(self.sun_elevation)) / self.gsd


@dataclass
class SynthOutputs:
    scene: Path
    landcover: Path
    canopy_height: Path
    polygons: Path | None = None
    config: SynthConfig = field(default_factory=SynthConfig)


# --------------------------------------------------------------------------------------
# counter-based randomness: a pure function of (seed, stream, integer coordinates)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _hash(seed: int, stream: int, *coords) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = _mix(np.uint64((seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF)
                 * np.ones(1, np.uint64))
        for c in coords:
            c = np.asarray(c).astype(np.int64).view(np.uint64)
            h = _mix(h ^ (c * np.uint64(0x9E3779B97F4A7C15)))
    return h


def _uniform(seed: int, stream: int, *coords) -> np.ndarray:
    """Uniform [0, 1) floats, one per coordinate tuple."""
    return (_hash(seed, stream, *coords) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _value_noise(seed: int, stream: int, gy: np.ndarray, gx: np.ndarray, scale: float) -> np.ndarray:
    fy, fx = gy / scale, gx / scale
    iy, ix = np.floor(fy), np.floor(fx)
    ty, tx = fy - iy, fx - ix
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    v00 = _uniform(seed, stream, iy, ix)
    v01 = _uniform(seed, stream, iy, ix + 1)
    v10 = _uniform(seed, stream, iy + 1, ix)
    v11 = _uniform(seed, stream, iy + 1, ix + 1)
    return (v00 * (1 - tx) + v01 * tx) * (1 - ty) + (v10 * (1 - tx) + v11 * tx) * ty


def _fbm(seed: int, stream: int, gy, gx, scale: float, octaves: int = 3) -> np.ndarray:
    total, amp, norm = 0.0, 1.0, 0.0
    for o in range(octaves):
        total = total + amp * _value_noise(seed, stream * 16 + o, gy, gx, scale / 2**o)
        norm += amp
        amp *= 0.5
    return total / norm


# --------------------------------------------------------------------------------------
# land cover as a pointwise function of global position


def landcover_at(seed: int, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Land-cover codes at global pixel coordinates (float arrays of any shape)."""
    gy = np.asarray(gy, dtype=np.float64)
    gx = np.asarray(gx, dtype=np.float64)
    moisture = _fbm(seed, 1, gy, gx, 520.0)
    lc = np.full(gy.shape, BARE, np.uint8)
    lc[moisture > 0.30] = GRASS
    lc[moisture > 0.47] = SHRUB
    lc[moisture > 0.56] = TREE

    # cropland: rectangular parcels in agricultural zones
    agri = _fbm(seed, 2, gy, gx, 1100.0, octaves=2) > 0.56
    py, px = np.floor(gy / 110.0), np.floor(gx / 170.0)
    u = _uniform(seed, 3, py, px)
    parcel = np.where(u < 0.7, CROP, np.where(u < 0.85, GRASS, BARE)).astype(np.uint8)
    lc = np.where(agri, parcel, lc)

    # towns: buildings on 28 px lots, streets every 4 lots
    town = _fbm(seed, 4, gy, gx, 900.0, octaves=2) > 0.66
    ly, lx = np.floor(gy / 28.0), np.floor(gx / 28.0)
    oy, ox = gy - ly * 28.0, gx - lx * 28.0
    margin_y = 3 + 6 * _uniform(seed, 5, ly, lx)
    margin_x = 3 + 6 * _uniform(seed, 6, ly, lx)
    building = (oy > margin_y) & (oy < 28 - margin_y * 0.6) & (ox > margin_x) & (ox < 28 - margin_x * 0.6)
    building &= _uniform(seed, 7, ly, lx) < 0.8
    street = (np.mod(gy, 112.0) < 5) | (np.mod(gx, 112.0) < 5)
    lc = np.where(town, np.where(building | street, BUILT, GRASS), lc).astype(np.uint8)

    # lakes
    lc[_fbm(seed, 8, gy, gx, 700.0, octaves=2) > 0.78] = WATER

    # a meandering river every 3000 rows
    k = np.round((gy - 1000.0) / 3000.0)
    phase1 = 2 * np.pi * _uniform(seed, 9, k)
    phase2 = 2 * np.pi * _uniform(seed, 10, k)
    centre = k * 3000.0 + 1000.0 + 120 * np.sin(2 * np.pi * gx / 1300.0 + phase1) + 55 * np.sin(
        2 * np.pi * gx / 470.0 + phase2
    )
    width = 16 + 6 * np.sin(2 * np.pi * gx / 900.0 + phase2)
    lc[np.abs(gy - centre) < width / 2] = WATER

    # straight, slightly tilted roads
    v = np.mod(gy - 0.04 * gx, 1400.0)
    w = np.mod(gx + 0.05 * gy, 1700.0)
    lc[(np.abs(v - 700.0) < 3.0) | (np.abs(w - 850.0) < 3.0)] = BUILT
    return lc


# --------------------------------------------------------------------------------------
# trees


def _tree_cells(cfg: SynthConfig, ci: np.ndarray, cj: np.ndarray):
    """Attributes of the crown (if any) in tree cells (ci, cj): present, centre, radius, height."""
    s = cfg.seed
    cy = (ci + 0.2 + 0.6 * _uniform(s, 20, ci, cj)) * _CELL
    cx = (cj + 0.2 + 0.6 * _uniform(s, 21, ci, cj)) * _CELL
    stand = _fbm(s, 22, cy, cx, 400.0, octaves=2)
    height = np.clip((6.0 + 36.0 * stand) * (0.7 + 0.45 * _uniform(s, 23, ci, cj)), 2.0, 40.0)
    radius = np.minimum(2.5 + height / 40.0 * 5.0 + 1.5 * _uniform(s, 24, ci, cj), _MAX_RADIUS)
    present = (_uniform(s, 25, ci, cj) < 0.85) & (landcover_at(s, cy, cx) == TREE)
    return present, cy, cx, radius, height


def _shadow_offsets(cfg: SynthConfig) -> list[tuple[int, int]]:
    """Cell offsets whose crowns can shade a pixel: back along the shadow direction."""
    dy, dx = cfg.shadow_step
    reach = float(cfg.shadow_length_px(40.0)) + _MAX_RADIUS
    offsets = set()
    for t in np.linspace(0.0, reach, int(reach) + 2):
        by, bx = -t * dy / _CELL, -t * dx / _CELL
        for ey in (-1, 0, 1):
            for ex in (-1, 0, 1):
                offsets.add((int(math.floor(by)) + ey, int(math.floor(bx)) + ex))
    return sorted(offsets)


def _crown_surface(cfg: SynthConfig, gy, gx, pi, pj, present, ccy, ccx, crad, cheight, track_owner=False,
                   shaded=True):
    """Crown domes over the pixels: (canopy height, illumination factor, owning cell as (2, h, w)).

    Each pixel takes the highest dome among the crowns of its own and its 8 neighbour cells;
    the owner is that crown's cell (-1 where no crown covers the pixel; only if ``track_owner``).
    """
    canopy = np.zeros(gy.shape, np.float64)
    shade = np.ones(gy.shape, np.float64)  # crown illumination factor
    owner = np.full((2,) + gy.shape, -1, np.int64) if track_owner else None
    sun_az, sun_el = math.radians(cfg.sun_azimuth), math.radians(cfg.sun_elevation)
    # sun vector in (row, col, up): rows grow south, so north component is -row
    sun = np.array([-math.cos(sun_az) * math.cos(sun_el), math.sin(sun_az) * math.cos(sun_el), math.sin(sun_el)])
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            a, b = pi + oy, pj + ox
            p = present[a, b]
            dyy = gy - ccy[a, b]
            dxx = gx - ccx[a, b]
            r = crad[a, b]
            d2 = (dyy * dyy + dxx * dxx) / (r * r)
            inside = p & (d2 < 1.0)
            surface = np.where(inside, cheight[a, b] * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)) ** 0.5, 0.0)
            take = surface > canopy
            if take.any():
                canopy = np.where(take, surface, canopy)
                if shaded:
                    # unit normal of the crown dome, lit by the sun vector
                    nz = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
                    illum = dyy / r * sun[0] + dxx / r * sun[1] + nz * sun[2]
                    shade = np.where(take, 0.55 + 0.45 * np.clip(illum, 0.0, 1.0), shade)
                if track_owner:
                    owner[0] = np.where(take, np.floor(gy / _CELL) + oy, owner[0])
                    owner[1] = np.where(take, np.floor(gx / _CELL) + ox, owner[1])
    return canopy, shade, owner


def render_block(cfg: SynthConfig, row0: int, col0: int, height: int, width: int, *,
                 with_shadow: bool = False):
    """Render one block: (image uint16 (4,h,w), land cover uint8 (h,w), canopy float32 (h,w)).

    Pure function of the config and the block's global position. ``with_shadow`` appends the
    ground-shadow mask (for checks of the shading model).
    """
    rows = np.arange(row0, row0 + height, dtype=np.float64) + 0.5
    cols = np.arange(col0, col0 + width, dtype=np.float64) + 0.5
    gy, gx = np.meshgrid(rows, cols, indexing="ij")
    lc = landcover_at(cfg.seed, gy, gx)

    # Cell attributes on the cell grid that covers the block plus the shadow/crown halo.
    offsets = _shadow_offsets(cfg)
    reach = max(max(abs(o[0]), abs(o[1])) for o in offsets) + 1
    ci0 = row0 // _CELL - reach
    cj0 = col0 // _CELL - reach
    ci1 = (row0 + height) // _CELL + reach + 1
    cj1 = (col0 + width) // _CELL + reach + 1
    ci, cj = np.meshgrid(np.arange(ci0, ci1), np.arange(cj0, cj1), indexing="ij")
    present, ccy, ccx, crad, cheight = _tree_cells(cfg, ci.astype(np.float64), cj.astype(np.float64))

    pi = (np.floor(gy / _CELL).astype(np.int64) - ci0)
    pj = (np.floor(gx / _CELL).astype(np.int64) - cj0)

    canopy, shade, _ = _crown_surface(cfg, gy, gx, pi, pj, present, ccy, ccx, crad, cheight)

    # Ground shadows: inside the capsule swept by a crown disk along the shadow direction.
    sdy, sdx = cfg.shadow_step
    in_shadow = np.zeros(gy.shape, bool)
    ground = canopy <= 0.0
    for oy, ox in offsets:
        a, b = pi + oy, pj + ox
        p = present[a, b]
        if not p.any():
            continue
        length = cfg.shadow_length_px(cheight[a, b])
        ry, rx = gy - ccy[a, b], gx - ccx[a, b]
        t = np.clip(ry * sdy + rx * sdx, 0.0, length)
        ey, ex = ry - t * sdy, rx - t * sdx
        in_shadow |= p & (ey * ey + ex * ex < crad[a, b] ** 2)
    in_shadow &= ground

    crown = canopy > 0.0
    lc = np.where(crown, np.uint8(TREE), lc)

    # Reflectance
    spectra = np.zeros((4,) + gy.shape, np.float64)
    for code, spec in _SPECTRA.items():
        m = lc == code
        if m.any():
            spectra[:, m] = np.asarray(spec, np.float64)[:, None]
    floor = (lc == TREE) & ~crown
    spectra[:, floor] = np.asarray(_FOREST_FLOOR, np.float64)[:, None]
    py, px = np.floor(gy / 110.0), np.floor(gx / 170.0)
    bare_field = (lc == CROP) & (_uniform(cfg.seed, 30, py, px) < 0.25)
    spectra[:, bare_field] = np.asarray(_BARE_FIELD, np.float64)[:, None]
    # per-parcel / per-lot brightness variation, per-crown variation
    crop = lc == CROP
    spectra[:, crop] *= (0.85 + 0.3 * _uniform(cfg.seed, 31, py, px))[crop][None]
    lots = np.floor(gy / 28.0), np.floor(gx / 28.0)
    roof = (lc == BUILT)
    spectra[:, roof] *= (0.7 + 0.6 * _uniform(cfg.seed, 32, *lots))[roof][None]
    spectra[:, crown] *= shade[crown][None]
    nir_shadow = np.array([0.35, 0.35, 0.35, 0.45])[:, None]
    spectra[:, in_shadow] *= nir_shadow
    for band in range(4):
        noise = _uniform(cfg.seed, 40 + band, gy, gx) - 0.5
        spectra[band] *= 1.0 + 0.08 * noise
    image = np.clip(np.round(spectra), 1, 10000).astype(np.uint16)
    canopy = canopy.astype(np.float32)

    if cfg.nodata_collar:
        valid = footprint_mask(cfg, gy, gx)
        image[:, ~valid] = 0
        lc = np.where(valid, lc, np.uint8(0))
        canopy = np.where(valid, canopy, np.float32(np.nan)).astype(np.float32)
    if with_shadow:
        return image, lc.astype(np.uint8), canopy, in_shadow
    return image, lc.astype(np.uint8), canopy


def _canopy_with_owner(cfg: SynthConfig, row0: int, col0: int, height: int, width: int):
    gy, gx = np.meshgrid(np.arange(row0, row0 + height) + 0.5, np.arange(col0, col0 + width) + 0.5, indexing="ij")
    gi, gj = np.meshgrid(np.arange(row0 // _CELL - 2, (row0 + height) // _CELL + 3),
                         np.arange(col0 // _CELL - 2, (col0 + width) // _CELL + 3), indexing="ij")
    cells = _tree_cells(cfg, gi.astype(np.float64), gj.astype(np.float64))
    pi = np.floor(gy / _CELL).astype(np.int64) - gi[0, 0]
    pj = np.floor(gx / _CELL).astype(np.int64) - gj[0, 0]
    canopy, _, owner = _crown_surface(cfg, gy, gx, pi, pj, *cells, track_owner=True, shaded=False)
    return canopy, owner, (gy, gx), int(gj[0, 0])


def render_canopy(cfg: SynthConfig, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Only the canopy-height band of :func:`render_block` (the same float32 values), without
    the land cover, shadows and reflectance that make a full block ten times slower."""
    canopy, _, (gy, gx), _ = _canopy_with_owner(cfg, row0, col0, height, width)
    canopy = canopy.astype(np.float32)
    if cfg.nodata_collar:
        canopy = np.where(footprint_mask(cfg, gy, gx), canopy, np.float32(np.nan)).astype(np.float32)
    return canopy


def crown_table(cfg: SynthConfig, row0: int = 0, col0: int = 0, height: int | None = None,
                width: int | None = None) -> dict[str, np.ndarray]:
    """Every crown whose centre lies in a region, from the same hashes that draw the pixels.

    Returns arrays, one entry per crown, sorted by centre row then column: ``row``, ``col``
    (centre in global pixel coordinates, fractional), ``x``, ``y`` (centre in the scene's
    CRS), ``radius_m``, ``height_m`` (the dome's apex), ``area_m2`` (the disk, pi r^2),
    ``visible_area_m2`` (pixels where this crown is the top surface, as the canopy raster
    shows it) and ``apex_visible`` (the pixel holding the centre shows this crown, inside
    the valid footprint: a top that a canopy raster can reveal; a crown under a taller
    neighbour's dome cannot be found from heights alone).
    """
    height = cfg.height - row0 if height is None else height
    width = cfg.width - col0 if width is None else width
    ci, cj = np.meshgrid(np.arange(row0 // _CELL - 1, (row0 + height) // _CELL + 2),
                         np.arange(col0 // _CELL - 1, (col0 + width) // _CELL + 2), indexing="ij")
    ci, cj = ci.ravel().astype(np.float64), cj.ravel().astype(np.float64)
    present, cy, cx, radius, tree_h = _tree_cells(cfg, ci, cj)
    keep = present & (cy >= row0) & (cy < row0 + height) & (cx >= col0) & (cx < col0 + width)
    order = np.lexsort((cx[keep], cy[keep]))
    ci, cj, cy, cx, radius, tree_h = (a[keep][order] for a in (ci, cj, cy, cx, radius, tree_h))

    # who owns each pixel of the region grown by the largest crown radius
    m = math.ceil(_MAX_RADIUS) + 1
    r0, c0, h, w = row0 - m, col0 - m, height + 2 * m, width + 2 * m
    _, owner, (gy, gx), gj0 = _canopy_with_owner(cfg, r0, c0, h, w)
    if cfg.nodata_collar:
        owner[:, ~footprint_mask(cfg, gy, gx)] = -1
    # owners as one integer key per cell, counted per crown
    span = int(max(np.abs(owner[1]).max(), abs(gj0), np.abs(cj).max() if cj.size else 0)) * 2 + 8
    key_pix = owner[0] * span + owner[1]
    key_tree = (ci * span + cj).astype(np.int64)
    uniq, counts = np.unique(key_pix[owner[0] >= 0], return_counts=True)
    uniq, counts = np.append(uniq, np.iinfo(np.int64).max), np.append(counts, 0)  # a sentinel past every key
    pos = np.searchsorted(uniq, key_tree)
    visible_px = np.where(uniq[pos] == key_tree, counts[pos], 0)
    apex_owner = key_pix[np.floor(cy).astype(np.int64) - r0, np.floor(cx).astype(np.int64) - c0]
    t = cfg.transform
    return {
        "row": cy, "col": cx, "x": t.c + cx * t.a, "y": t.f + cy * t.e,
        "radius_m": radius * cfg.gsd, "height_m": tree_h, "area_m2": math.pi * (radius * cfg.gsd) ** 2,
        "visible_area_m2": visible_px * cfg.gsd ** 2, "apex_visible": apex_owner == key_tree,
    }


def footprint_mask(cfg: SynthConfig, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """A rotated rectangle inset in the scene: the valid footprint of a real scene edge."""
    cy, cx = cfg.height / 2.0, cfg.width / 2.0
    ang = math.radians(cfg.collar_angle)
    ry = (gy - cy) * math.cos(ang) - (gx - cx) * math.sin(ang)
    rx = (gy - cy) * math.sin(ang) + (gx - cx) * math.cos(ang)
    half_h = cfg.height * 0.5 / (1.0 + abs(math.tan(ang))) * 1.0
    half_w = cfg.width * 0.5 / (1.0 + abs(math.tan(ang))) * 1.0
    return (np.abs(ry) <= half_h) & (np.abs(rx) <= half_w)


# --------------------------------------------------------------------------------------
# writing


def _profile(cfg: SynthConfig, count: int, dtype: str, nodata, predictor: int) -> dict:
    return dict(
        driver="GTiff", width=cfg.width, height=cfg.height, count=count, dtype=dtype,
        crs=cfg.crs, transform=cfg.transform, nodata=nodata, tiled=True,
        blockxsize=512, blockysize=512, compress="deflate", predictor=predictor,
        BIGTIFF="IF_SAFER",
    )


def _tags(cfg: SynthConfig) -> dict:
    tags = {f"synth_{k}": str(v) for k, v in asdict(cfg).items()}
    tags["generator"] = f"geodino.synth v{GENERATOR_VERSION}"
    tags["sun_elevation"] = str(cfg.sun_elevation)
    tags["sun_azimuth"] = str(cfg.sun_azimuth)
    return tags


def generate(out_dir: str | os.PathLike, cfg: SynthConfig = SynthConfig(), *, polygons: bool = False,
             overwrite: bool = False, progress=None) -> SynthOutputs:
    """Write scene.tif, landcover.tif, canopy_height.tif (and landcover.gpkg) to out_dir.

    Files are written under temporary names and renamed into place when complete.
    """
    from geodino.export import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = SynthOutputs(out / "scene.tif", out / "landcover.tif", out / "canopy_height.tif", config=cfg)
    targets = [paths.scene, paths.landcover, paths.canopy_height]
    if not overwrite:
        from geodino.errors import OutputExistsError

        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise OutputExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
    nodata_img = 0 if cfg.nodata_collar else None
    tags = _tags(cfg)
    with atomic_path(paths.scene) as t_img, atomic_path(paths.landcover) as t_lc, atomic_path(
        paths.canopy_height
    ) as t_chm:
        with rasterio.open(t_img, "w", **_profile(cfg, 4, "uint16", nodata_img, 2)) as img, rasterio.open(
            t_lc, "w", **_profile(cfg, 1, "uint8", 0, 2)
        ) as lcd, rasterio.open(t_chm, "w", **_profile(cfg, 1, "float32", float("nan"), 3)) as chm:
            img.update_tags(**tags, reflectance_scale="10000")
            for i, name in enumerate(BAND_NAMES, start=1):
                img.set_band_description(i, name)
                img.update_tags(i, units="reflectance x10000")
            lcd.update_tags(**tags)
            lcd.set_band_description(1, "land cover")
            lcd.write_colormap(1, WORLDCOVER.colormap())
            lcd.update_tags(1, class_codes=",".join(map(str, WORLDCOVER.codes)),
                            class_names=",".join(WORLDCOVER.names))
            chm.update_tags(**tags)
            chm.set_band_description(1, "canopy height")
            chm.update_tags(1, units="m")
            b = cfg.block
            blocks = [(r, c) for r in range(0, cfg.height, b) for c in range(0, cfg.width, b)]
            for n, (r, c) in enumerate(blocks):
                h, w = min(b, cfg.height - r), min(b, cfg.width - c)
                image, lc, canopy = render_block(cfg, r, c, h, w)
                win = Window(c, r, w, h)
                img.write(image, window=win)
                lcd.write(lc, 1, window=win)
                chm.write(canopy, 1, window=win)
                if progress is not None:
                    progress(n + 1, len(blocks))
    if polygons:
        from geodino.export import polygonize

        paths.polygons = out / "landcover.gpkg"
        polygonize(paths.landcover, paths.polygons, WORLDCOVER, overwrite=overwrite)
    return paths
