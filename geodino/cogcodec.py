"""How an output's COG is encoded: tile size, codec and level per kind of data, and which way
its tiles are made (written once and moved into the COG, encoded by geodino or by GDAL, or
staged for GDAL's COG driver)."""

from __future__ import annotations

import itertools
from pathlib import Path

import rasterio

COG_BLOCK = 512


def stream_tile_size(chunks) -> int:
    """Tile size of the intermediate GeoTIFF that blocks stream into: the largest power of two
    up to 512 dividing every block boundary, so each block write completes whole tiles and
    GDAL never holds a half-written tile (a row of those is as wide as the scene)."""
    bounds = [b for axis in chunks[-2:] for b in itertools.accumulate(axis[:-1])]
    for size in (512, 256, 128, 64, 32, 16):
        if all(b % size == 0 for b in bounds):
            return size
    return COG_BLOCK


# DEFLATE level per kind of data (BENCHMARKS.md): float heights at level 1 take 0.59x the CPU
# time of level 6 for 8% more bytes (4096² output); class maps compress best without a
# predictor, and level 5 takes 0.4x the CPU of 6 for 19% more bytes (8192², GDAL's
# libdeflate; geodino.tilecodec maps these levels onto ISA-L's). ZSTD level 3: smaller than
# DEFLATE 6, as fast as DEFLATE 1.
LEVELS = {("DEFLATE", True): 1, ("DEFLATE", False): 5, ("ZSTD", True): 3, ("ZSTD", False): 3}


def to_cog(src_path: Path, dst_path: Path, *, resampling: str, compress: str = "DEFLATE",
           threads: int | str = "ALL_CPUS") -> None:
    """Convert a tiled GeoTIFF (or a VRT of one) into a Cloud-Optimized GeoTIFF with internal
    overviews: the source's own overviews where it has them, else made with ``resampling``."""
    from rasterio.shutil import copy as rio_copy

    with rasterio.open(src_path) as src:
        is_float = src.dtypes[0].startswith("float")
    options = dict(COMPRESS=compress.upper(), PREDICTOR="FLOATING_POINT" if is_float else "NO")
    level = LEVELS.get((compress.upper(), is_float))
    if level is not None:
        options["LEVEL"] = str(level)
    rio_copy(str(src_path), str(dst_path), driver="COG", BLOCKSIZE=str(COG_BLOCK),
             OVERVIEW_RESAMPLING=resampling.upper(), RESAMPLING=resampling.upper(), BIGTIFF="IF_SAFER",
             NUM_THREADS=str(threads), **options)


# Pixels that :class:`geodino.tilerows.TileRows` may hold for one output (full resolution and
# its overview levels) before the output is staged instead: 16384 px wide float32 holds ~130 MB.
DIRECT_BUFFER_LIMIT = 160 * 2**20


def codec_options(compress: str, is_float: bool) -> dict | None:
    """GTiff creation options that encode tiles as the COG driver would (None: not offered)."""
    compress = compress.upper()
    level = LEVELS.get((compress, is_float))
    options = dict(compress=compress, predictor=3 if is_float else 1)
    if compress == "DEFLATE":
        options["ZLEVEL"] = level
    elif compress == "ZSTD":
        options["ZSTD_LEVEL"] = level
    elif compress not in ("LZW", "NONE"):
        return None
    return options


def encodes_here(count: int, profile: dict) -> bool:
    """Whether an image's tiles are encoded by :mod:`geodino.tilecodec` rather than by GDAL:
    one band (GDAL interleaves several by pixel), DEFLATE."""
    from geodino.tilecodec import PREDICTORS

    return (count == 1 and str(profile.get("compress", "")).upper() == "DEFLATE"
            and profile.get("predictor", 1) in PREDICTORS and "ZLEVEL" in profile)


def fill_value(dtype: str, nodata):
    """What pads an image's edge tiles: its nodata (NaN for floats without one), else 0."""
    if nodata is not None:
        return nodata
    return float("nan") if dtype.startswith("float") else 0


def writes_direct(shape: tuple[int, int, int], dtype: str, compress: str) -> bool:
    """Whether a (bands, height, width) output's tiles can be written once, in their final
    codec and size, and moved into the COG as they are (else: a fast intermediate file that
    GDAL's COG driver re-encodes)."""
    from geodino.tilerows import TileRows

    count, _, width = shape
    if codec_options(compress, dtype.startswith("float")) is None:
        return False
    # full resolution plus overview levels (half as wide each): at most twice the former
    return 2 * TileRows.buffer_bytes(count, width, dtype, COG_BLOCK) <= DIRECT_BUFFER_LIMIT


__all__ = ["COG_BLOCK", "DIRECT_BUFFER_LIMIT", "LEVELS", "codec_options", "encodes_here", "fill_value",
           "stream_tile_size", "to_cog", "writes_direct"]
