"""Sensor profiles: raw digital numbers -> the 3-channel input of the DINOv3 backbone.

Normalisation is global by construction: a profile fixes, once per scene, a linear stretch
``lo..hi`` per channel (either constants of the sensor or percentiles computed once from a
decimated read of the whole scene), followed by the mean/std of the backbone family. A
window's input therefore depends only on its own pixels and these fixed numbers, never on
per-window statistics (DESIGN invariant 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geodino.errors import InputError

# Means and standard deviations of the DINOv3 pretraining data, after scaling to [0, 1].
FAMILY_STATS = {
    "web": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # LVD-1689M
    "sat": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),  # SAT-493M (Maxar RGB)
}
# Meta's CHMv2 canopy-height model was trained with its own mean (red 0.420, not SAT's
# 0.430): its inference notebook and transformers' CHMv2ImageProcessor both use these.
CHMV2_STATS = ((0.420, 0.411, 0.296), (0.213, 0.156, 0.143))


@dataclass(frozen=True)
class SensorProfile:
    """How to turn one sensor's raw values into [0, 1] RGB.

    ``lo``/``hi``: raw values mapped to 0 and 1 (None: percentiles per scene). ``bands``: default
    band choice for (red, green, blue), tried in order: names (matched to band descriptions)
    then 1-based indexes.
    """

    name: str
    description: str
    dtypes: tuple[str, ...]
    min_bands: int
    band_names: tuple[str, str, str] | None
    band_indexes: tuple[int, int, int] | None
    lo: float | None
    hi: float | None
    percentiles: tuple[float, float] = (2.0, 98.0)


PROFILES: dict[str, SensorProfile] = {
    p.name: p
    for p in (
        SensorProfile(
            "rgb8", "8-bit RGB imagery (Maxar, NEON, aerial orthophotos): value / 255",
            ("uint8",), 3, ("red", "green", "blue"), (1, 2, 3), 0.0, 255.0),
        SensorProfile(
            "naip", "NAIP 4-band RGBN, uint8: bands 1-3 as RGB, value / 255",
            ("uint8",), 4, ("red", "green", "blue"), (1, 2, 3), 0.0, 255.0),
        SensorProfile(
            "sentinel2-l2a",
            "Sentinel-2 L2A surface reflectance, uint16, processing baseline >= 04.00 "
            "(BOA_ADD_OFFSET -1000): bands B04, B03, B02; reflectance 0-0.3 -> 0-1",
            ("uint16",), 3, ("B04", "B03", "B02"), (4, 3, 2), 1000.0, 1000.0 + 3000.0),
        SensorProfile(
            "landsat-c2-l2",
            "Landsat Collection 2 Level-2 surface reflectance, uint16, scale 2.75e-5, offset -0.2: "
            "bands SR_B4, SR_B3, SR_B2 (Landsat 8/9); reflectance 0-0.3 -> 0-1",
            ("uint16",), 3, ("SR_B4", "SR_B3", "SR_B2"), (4, 3, 2), 0.2 / 2.75e-5, 0.5 / 2.75e-5),
        SensorProfile(
            "reflectance",
            "surface reflectance x10000 without offset (geodino synth, Landsat TM/ETM+ stacks): "
            "bands named red/green/blue, else 3, 2, 1 (blue-green-red-NIR order); reflectance 0-0.3 -> 0-1",
            ("uint16", "int16", "int32", "float32", "float64"), 3, ("red", "green", "blue"), (3, 2, 1),
            0.0, 3000.0),
        SensorProfile(
            "auto",
            "any sensor: a 2-98 percentile stretch per band, computed once per scene from a "
            "decimated read of its valid pixels",
            ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"), 3,
            ("red", "green", "blue"), None, None, None),
    )
}


def get_profile(name: str) -> SensorProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InputError(f"unknown sensor profile {name!r}; choose one of {', '.join(PROFILES)}") from None


@dataclass(frozen=True)
class Normalisation:
    """Fixed per-scene transform raw (3, h, w) -> backbone input (3, h, w)."""

    profile: str
    family: str
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    mean: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))
    std: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))

    def __call__(self, raw: np.ndarray, valid: np.ndarray | None = None, *, inplace: bool = False) -> np.ndarray:
        """Normalised float32 copy of ``raw`` (or ``raw`` itself, overwritten, with ``inplace``
        when it is float32: no temporary arrays in the window-reading hot path)."""
        lo = np.asarray(self.lo, np.float32)[:, None, None]
        hi = np.asarray(self.hi, np.float32)[:, None, None]
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        if inplace and raw.dtype == np.float32:
            x = raw
            np.subtract(x, lo, out=x)
        else:
            x = np.subtract(raw, lo, dtype=np.float32)
        np.divide(x, hi - lo, out=x)
        np.clip(x, 0.0, 1.0, out=x)
        np.subtract(x, mean, out=x)
        np.divide(x, std, out=x)
        if valid is not None:
            # invalid pixels carry no information: the dataset mean (0 after standardising)
            np.copyto(x, 0.0, where=~(valid[..., None, :, :] if x.ndim == 4 else valid[None]))
        return x

    def to_dict(self) -> dict:
        return {"profile": self.profile, "family": self.family, "lo": list(self.lo), "hi": list(self.hi),
                "mean": list(self.mean), "std": list(self.std)}


def choose_bands(profile: SensorProfile, scene) -> tuple[int, int, int] | None:
    """Default (red, green, blue) band indexes of ``scene`` for ``profile`` (None: use as is)."""
    import rasterio

    from geodino.sources import resolve_bands

    with rasterio.open(scene.source) as ds:
        if ds.count < profile.min_bands:
            raise InputError(f"{scene.paths[0]}: profile {profile.name} needs at least {profile.min_bands} bands, "
                             f"the file has {ds.count}; choose another --profile or pass --bands")
        if profile.band_names is not None:
            try:
                return resolve_bands(ds, profile.band_names, scene.paths[0])
            except InputError:
                pass
        if profile.band_indexes is not None and max(profile.band_indexes) <= ds.count:
            return tuple(profile.band_indexes)
    return None


def suggest_profile(scene) -> tuple[str, str] | None:
    """(profile, why) that fits a scene by its dtype, band count and band descriptions, if one clearly does."""
    import rasterio

    with rasterio.open(scene.source) as ds:
        descriptions = [(d or "").strip() for d in ds.descriptions]
        count, dtype = ds.count, ds.dtypes[0]
    named = {d.upper() for d in descriptions if d}
    if {"SR_B4", "SR_B3", "SR_B2"} <= named and dtype == "uint16":
        return "landsat-c2-l2", "its band descriptions name Landsat Collection 2 surface reflectance (SR_B4, SR_B3, SR_B2)"
    if ({"B04", "B03", "B02"} <= named or {"B4", "B3", "B2"} <= named) and dtype == "uint16":
        return "sentinel2-l2a", "its band descriptions name Sentinel-2 bands (B04, B03, B02)"
    if sum("reflectance" in d.lower() for d in descriptions) >= 3 and dtype != "uint8":
        return "reflectance", "its band descriptions say surface reflectance (blue, green, red, NIR order)"
    if {"RED", "GREEN", "BLUE"} <= named and dtype in ("uint16", "int16"):
        return "reflectance", "its bands are named red, green, blue with 16-bit values (reflectance x10000)"
    if count == 4 and dtype == "uint8" and not named:
        return "naip", "it is 4-band uint8 with undescribed bands, as NAIP RGBN is"
    if count >= 3 and dtype == "uint8":
        return "rgb8", "it is 8-bit imagery (bands 1-3 as red, green, blue)"
    return None


def profile_hint(scene, otherwise: str, current: str | None = None) -> str:
    fit = suggest_profile(scene)
    if fit is None or fit[0] == current:
        return otherwise
    return f"use --profile {fit[0]} ({fit[1]}), or {otherwise}"


def prepare(scene, profile_name: str = "auto", family: str = "sat", bands=None):
    """Select the 3 input bands of ``scene`` for a profile and compute its fixed normalisation.

    Returns (scene with 3 bands selected, Normalisation).
    """
    from geodino.scene import with_bands

    profile = get_profile(profile_name)
    if family not in FAMILY_STATS:
        raise InputError(f"unknown backbone family {family!r}; expected web or sat")
    if bands is not None:
        scene = with_bands(scene, bands)
    else:
        chosen = choose_bands(profile, scene)
        if chosen is not None:
            scene = with_bands(scene, chosen)
        elif scene.count != 3:
            raise InputError(f"{scene.paths[0]}: cannot tell which bands are red, green and blue with profile "
                             f"{profile.name} (bands are {', '.join(scene.band_names)}); "
                             + profile_hint(scene, "pass --bands R,G,B"))
    if scene.count != 3:
        raise InputError(f"{scene.paths[0]}: the backbone takes 3 bands, {scene.count} selected "
                         f"({', '.join(scene.band_names)}); pass exactly three with --bands")
    if scene.dtype not in profile.dtypes:
        raise InputError(f"{scene.paths[0]}: profile {profile.name} expects {'/'.join(profile.dtypes)} data, "
                         f"the scene is {scene.dtype}; "
                         + profile_hint(scene, "use --profile auto or a profile for this sensor", profile.name))
    mean, std = FAMILY_STATS[family]
    if profile.lo is not None:
        lo, hi = (profile.lo,) * 3, (profile.hi,) * 3
    else:
        lo, hi = scene_percentiles(scene, profile.percentiles)
    return scene, Normalisation(profile.name, family, tuple(map(float, lo)), tuple(map(float, hi)), mean, std)


def scene_percentiles(scene, percentiles=(2.0, 98.0), max_size: int | None = None):
    """Per-band percentiles of the valid pixels of a decimated whole-scene read
    (``max_size``: default :data:`geodino.scene.OVERVIEW_SIZE`, the read a run shares)."""
    from geodino.scene import OVERVIEW_SIZE, require_valid_pixels

    max_size = max_size or OVERVIEW_SIZE
    require_valid_pixels(scene)
    data, valid = scene.read_overview(max_size)
    lo, hi = [], []
    for band in data:
        values = band[valid]
        a, b = np.percentile(values, percentiles) if values.size else (0.0, 1.0)
        if b <= a:
            b = a + 1.0
        lo.append(float(a))
        hi.append(float(b))
    return tuple(lo), tuple(hi)
