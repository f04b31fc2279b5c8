"""Overview levels built while blocks stream.

GDAL builds overviews by reading the full resolution back and resampling it: measured on a
4096^2 float32 canopy raster, that is 0.66 of a COG conversion's 1.22 CPU seconds. Here each
block, as it is written, is pooled 2x2 level after level into tiled GeoTIFFs of their own
(mean of the valid values for continuous data, the most frequent valid code for classes, as
GDAL's AVERAGE and MODE do), each written a whole row of tiles at a time
(:class:`geodino.tilerows.TileRows`). The levels then become the COG's internal overviews,
either with their tiles copied as they are (:func:`geodino.cog.assemble_cog`, when they are
written with the COG's own codec) or through a VRT that declares them as overviews
(``<Overview>`` elements) for GDAL's COG driver. GDAL offers no way to supply overview pixels
while streaming, hence this module. Levels deeper than the block grid allows (blocks must
start on multiples of 2^k) are pooled from the last streamed level after streaming, which is
small.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine

OVERVIEW_BLOCK = 512


def levels_needed(height: int, width: int, block: int = OVERVIEW_BLOCK) -> int:
    """How many 2x levels the COG driver makes: halve until the largest side fits one block."""
    n, size = 0, max(height, width)
    while size > block:
        size = math.ceil(size / 2)
        n += 1
    return n


def streamable_levels(chunks: Sequence[Sequence[int]], needed: int) -> int:
    """Levels that can be pooled block by block: every block boundary a multiple of 2^level."""
    bounds = [b for axis in chunks[-2:] for b in np.cumsum(axis[:-1])]
    level = 0
    while level < needed and all(b % 2 ** (level + 1) == 0 for b in bounds):
        level += 1
    return level


def pool2(block: np.ndarray, classes: bool, nodata) -> np.ndarray:
    """One 2x coarser level of a (band, h, w) block (odd edges padded as invalid)."""
    c, h, w = block.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        pad = np.full((c, ph, pw), np.nan if not classes else nodata, block.dtype)
        pad[:, :h, :w] = block
        block = pad
    # each pixel of the quad in an array of its own (a copy, even where a view would do: the
    # mean clears NaN in place): numpy's loops on the stride-2 views are several times slower
    # than gathering them once
    quarter = [block[:, i::2, j::2].copy() for i in (0, 1) for j in (0, 1)]
    return _mode4(quarter, block, nodata) if classes else _mean4(quarter, block)


def _mean4(quarter: list, block: np.ndarray) -> np.ndarray:
    """Mean of the valid (non-NaN) values of each 2x2 quad; NaN where none is valid.

    A block without NaN is summed in its own dtype, (((a + b) + c) + d) / 4; one with NaN in
    float64, the valid values only, divided by their count. The two can round apart (in the
    last bit), so each block keeps the arithmetic it always had and the levels stay byte for
    byte the same. A NaN anywhere in the block reaches the pooled sum, so testing the sum
    (a quarter of the pixels) tells the blocks apart; inf - inf makes NaN too, hence the
    test of the block itself before taking the NaN path.
    """
    a, b, c, d = quarter
    out = a + b
    out += c
    out += d
    out *= 0.25
    if not np.isnan(out).any() or not np.isnan(block).any():
        return out
    # the sums exactly as before: ((((0 + a) + b) + c) + d) in float64, 0 for an invalid value
    count = np.full(out.shape, len(quarter), np.uint8)
    bits = np.dtype(f"u{block.dtype.itemsize}")
    for x in quarter:
        invalid = np.isnan(x).view(np.uint8)
        count -= invalid
        x.view(bits)[...] &= np.subtract(invalid, 1, dtype=bits)  # NaN -> +0.0 (all bits 0)
    total = np.add(quarter[0], 0.0, dtype=np.float64)
    for x in quarter[1:]:
        total += x
    with np.errstate(invalid="ignore"):
        total /= count
    out[...] = total
    out[count == 0] = np.nan  # the NaN np.nan is, not the one 0 / 0 makes (another sign bit)
    return out


def _mode4(quarter: list, block: np.ndarray, nodata) -> np.ndarray:
    """The most frequent valid code of each 2x2 quad, first in reading order on ties; nodata if none.

    The winner follows from which of the four are equal, without counting votes: ``a`` if it
    equals another (two or more votes, and no other code can have more), else ``b`` if it
    equals ``c`` or ``d``, else ``c`` if it equals ``d``, else the first valid one (all
    differ). An invalid pixel holds ``nodata`` itself, so "first valid" falls through to
    ``d``, nodata or not. The rules are applied from the weakest to the strongest, each
    overriding the ones before; a block without nodata skips the validity tests.
    """
    a, b, c, d = quarter
    some_invalid = nodata is not None and (block == nodata).any()
    if not some_invalid:
        out = a.copy()
        _select(out, c, c == d)
        pick = b == c
        pick |= b == d
    else:
        out = d.copy()
        for x in (c, b, a):
            _select(out, x, x != nodata)
        pick = c == d
        pick &= c != nodata
        _select(out, c, pick)
        pick = b == c
        pick |= b == d
        pick &= b != nodata
    _select(out, b, pick)
    pick = a == b
    pick |= a == c
    pick |= a == d
    if some_invalid:
        pick &= a != nodata
    _select(out, a, pick)
    return out


def _select(out: np.ndarray, x: np.ndarray, where: np.ndarray) -> None:
    """``out[where] = x[where]``: for integers as ``out += (x - out) * where`` (wrapping), three
    vectorised passes where numpy's masked copy is an element-by-element loop (~10x slower)."""
    if out.dtype.kind not in "iu":
        np.copyto(out, x, where=where)
        return
    step = np.subtract(x, out)
    step *= where
    out += step


class Pyramid:
    """Streams overview levels of one output beside its intermediate GeoTIFF; see module doc."""

    def __init__(self, base: Path, profile: dict, chunks, *, classes: bool, codec: dict | None = None,
                 encode: dict | None = None) -> None:
        """``codec``: creation options of the level files (default: the base profile's own).
        ``encode``: predictor, level and fill of :class:`geodino.tilecodec.TileStore`, to encode
        the streamed levels' tiles here (their files then only hold the structure); the last
        streamed level is left to GDAL when deeper levels are pooled from it."""
        from geodino.tilecodec import TileStore
        from geodino.tilerows import TileRows

        self.base, self.classes = Path(base), classes
        self.codec = dict(codec or {})
        self.nodata = profile.get("nodata")
        height, width = profile["height"], profile["width"]
        self.levels = levels_needed(height, width)
        self.streamed = streamable_levels(chunks, self.levels)
        self.paths = [self.base.with_name(f"{self.base.stem}.ovr{k + 1}.tif") for k in range(self.levels)]
        self._files = []
        self.stores: list = [None] * self.levels  # TileStore of each level whose tiles are encoded here
        self._stack = contextlib.ExitStack()
        for k in range(self.streamed):
            level = self._profile(profile, k)
            if encode is not None and (k < self.streamed - 1 or self.streamed == self.levels):
                self.stores[k] = TileStore(self.paths[k].with_suffix(".tiles"), level["height"], level["width"],
                                           OVERVIEW_BLOCK, level["dtype"], **encode)
                self._stack.callback(self.stores[k].close)
                level["SPARSE_OK"] = True
            dst = self._stack.enter_context(rasterio.open(self.paths[k], "w", **level))
            self._files.append(TileRows(dst, OVERVIEW_BLOCK, store=self.stores[k]))
        self._profile_base = profile

    @staticmethod
    def streams(profile: dict, chunks) -> bool:
        """Whether a Pyramid of this raster makes its levels as blocks stream (see :attr:`usable`)."""
        levels = levels_needed(profile["height"], profile["width"])
        return levels == 0 or streamable_levels(chunks, levels) > 0

    @property
    def usable(self) -> bool:
        """Whether the levels can be made here (else GDAL computes them as before)."""
        return self.levels == 0 or self.streamed > 0

    def _profile(self, profile: dict, k: int) -> dict:
        f = 2 ** (k + 1)
        return dict(profile, height=math.ceil(profile["height"] / f), width=math.ceil(profile["width"] / f),
                    transform=profile["transform"] * Affine.scale(f), blockxsize=OVERVIEW_BLOCK,
                    blockysize=OVERVIEW_BLOCK, **self.codec)

    def write(self, block: np.ndarray, rows: slice, cols: slice) -> None:
        """Pool a just-written full-resolution block into every streamed level."""
        r, c = rows.start, cols.start
        for k, rows_of_tiles in enumerate(self._files):
            block = pool2(block, self.classes, self.nodata)
            r, c = r // 2, c // 2
            _, height, width = rows_of_tiles.shape
            h, w = min(block.shape[1], height - r), min(block.shape[2], width - c)
            rows_of_tiles.write(block[:, :h, :w], slice(r, r + h), slice(c, c + w))

    def finish(self) -> None:
        """Close the streamed levels and pool the deeper ones from the last of them."""
        for rows_of_tiles in self._files:
            rows_of_tiles.close()
        self._stack.close()
        if not self.usable or self.streamed == self.levels:
            return
        with rasterio.open(self.paths[self.streamed - 1]) as src:
            data = src.read()
        for k in range(self.streamed, self.levels):
            data = pool2(data, self.classes, self.nodata)
            profile = self._profile(self._profile_base, k)
            data = data[:, :profile["height"], :profile["width"]]
            with rasterio.open(self.paths[k], "w", **profile) as dst:
                dst.write(data)

    def vrt(self, source: Path, profile: dict) -> Path:
        """A VRT of ``source`` declaring the levels as its overviews (written beside it)."""
        path = self.base.with_name(f"{self.base.stem}.vrt")
        dtype = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32",
                 "float64": "Float64"}[profile["dtype"]]
        nodata = profile.get("nodata")
        nodata_xml = "" if nodata is None else f"<NoDataValue>{'nan' if nodata != nodata else nodata}</NoDataValue>"
        bands = []
        for b in range(1, profile["count"] + 1):
            overviews = "".join(
                f'<Overview><SourceFilename relativeToVRT="0">{escape(str(p))}</SourceFilename>'
                f"<SourceBand>{b}</SourceBand></Overview>" for p in self.paths)
            bands.append(
                f'<VRTRasterBand dataType="{dtype}" band="{b}">{nodata_xml}'
                f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(source))}</SourceFilename>'
                f"<SourceBand>{b}</SourceBand></SimpleSource>{overviews}</VRTRasterBand>")
        gt = ", ".join(repr(v) for v in profile["transform"].to_gdal())
        srs = f"<SRS>{escape(profile['crs'].to_wkt())}</SRS>" if profile.get("crs") else ""
        path.write_text(f'<VRTDataset rasterXSize="{profile["width"]}" rasterYSize="{profile["height"]}">'
                        f"{srs}<GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>")
        return path

    def cleanup(self) -> None:
        self._stack.close()
        for store in self.stores:
            if store is not None:
                store.remove()
        for p in self.paths + [self.base.with_name(f"{self.base.stem}.vrt")]:
            for leftover in (p, p.with_name(p.name + ".aux.xml")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
