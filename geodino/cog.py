"""Cloud-Optimized GeoTIFF by moving compressed tiles, not by decoding and encoding them again.

GDAL's COG driver is create-copy only and always decodes every tile of its source and
encodes it again (measured: 3.6 CPU s for one 8192^2 float32 band at DEFLATE level 1, the
largest single cost of a run's export once the model is fast). geodino already writes each
output as a tiled GeoTIFF with the final tile size and compression (GDAL writes those), and
its overview levels as tiled GeoTIFFs of their own (:mod:`geodino.overviews`). All a COG adds
is the layout: every IFD at the start of the file, then the tiles of the smallest overview
first and the full resolution last, each level row-major. :func:`assemble_cog` writes that
layout and copies the tiles' bytes as they are: the same pixels, bit for bit, for the cost of
a file copy. It also writes what GDAL's COG driver adds for its readers: the structural
metadata after the header (so GDAL reports ``LAYOUT=COG``), each tile's size in the four
bytes before it and its last four bytes repeated after it.

No library does this relayout (GDAL, rio-cogeo and tifffile all re-encode or write their own
IFD order), hence this module. It reads the sources' structure with tifffile, writes classic
TIFF or BigTIFF (when the file could pass 4 GiB), and copies each tag's value bytes verbatim,
so georeferencing, nodata, colour table and GDAL metadata are exactly what GDAL wrote.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

TILE_OFFSETS, TILE_BYTE_COUNTS, NEW_SUBFILE_TYPE = 324, 325, 254
# what an overview IFD needs to be read: geometry, sample layout, codec, colour table, nodata
_OVERVIEW_TAGS = {256, 257, 258, 259, 262, 277, 284, 317, 320, 322, 323, 338, 339, 50674, 42113}
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}
_BIG_ONLY_TYPES = {16, 17, 18}
_CLASSIC_LIMIT = 2**32 - 2**20  # leave room for rounding: classic TIFF offsets are 32-bit
_GHOST_BODY = (b"LAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\nBLOCK_LEADER=SIZE_AS_UINT4\n"
               b"BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n ")
_GHOST = b"GDAL_STRUCTURAL_METADATA_SIZE=%06d bytes\n" % len(_GHOST_BODY) + _GHOST_BODY
_GHOST += b"\0" * (len(_GHOST) & 1)  # IFDs start on a word boundary
_LEADER = _TRAILER = 4  # bytes before (the tile's size) and after (its last 4 bytes) each tile


class LayoutError(ValueError):
    """The sources cannot be laid out as one COG (different codecs, not tiled, big-endian...)."""


@dataclass(frozen=True)
class _Tag:
    code: int
    type: int
    count: int
    value: bytes  # the value's bytes, little-endian, as in the source file


@dataclass(frozen=True)
class _Image:
    path: Path
    tags: tuple[_Tag, ...]
    offsets: tuple[int, ...]
    counts: tuple[int, ...]


def _read_image(path: Path, overview: bool) -> _Image:
    import tifffile

    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        if tif.byteorder != "<":
            raise LayoutError(f"{path}: big-endian TIFF")
        page = tif.pages[0]
        if not page.is_tiled:
            raise LayoutError(f"{path}: not tiled")
        tags = []
        for tag in page.tags.values():
            if tag.code in (TILE_OFFSETS, TILE_BYTE_COUNTS, NEW_SUBFILE_TYPE, 273, 279):
                continue
            if overview and tag.code not in _OVERVIEW_TAGS:
                continue
            size = _TYPE_SIZE.get(tag.dtype)
            if size is None:
                raise LayoutError(f"{path}: tag {tag.code} has TIFF type {tag.dtype}")
            fh.seek(tag.valueoffset)
            tags.append(_Tag(tag.code, int(tag.dtype), tag.count, fh.read(size * tag.count)))
        if overview:
            tags.append(_Tag(NEW_SUBFILE_TYPE, 4, 1, struct.pack("<I", 1)))
        return _Image(Path(path), tuple(sorted(tags, key=lambda t: t.code)),
                      tuple(int(o) for o in page.dataoffsets), tuple(int(c) for c in page.databytecounts))


def _codec(image: _Image) -> tuple:
    """The tags that must agree between levels for their tiles to be one image's."""
    return tuple(t.value for t in image.tags if t.code in (258, 259, 277, 284, 317, 322, 323, 339))


class _Layout:
    """Byte positions of a COG: header, IFDs with their out-of-line values, then tile data."""

    def __init__(self, images: list[_Image], big: bool) -> None:
        self.big = big
        self.entry, self.count_size, self.next_size = (20, 8, 8) if big else (12, 2, 4)
        self.inline = 8 if big else 4
        self.header = 16 if big else 8
        pos = self.header + len(_GHOST)
        self.ifd_at, self.ifd_size = [], []
        for image in images:
            size = self._ifd_size(image)
            self.ifd_at.append(pos)
            self.ifd_size.append(size)
            pos += size
        # tiles: the smallest overview first, the full resolution last
        self.tiles_at = [0] * len(images)
        for i in reversed(range(len(images))):
            self.tiles_at[i] = pos
            pos += sum(c + _LEADER + _TRAILER for c in images[i].counts if c)
        self.total = pos

    def _values(self, image: _Image) -> list[_Tag]:
        off_type = 16 if self.big else 4
        n = len(image.offsets)
        tags = list(image.tags) + [_Tag(TILE_OFFSETS, off_type, n, b""), _Tag(TILE_BYTE_COUNTS, 4, n, b"")]
        return sorted(tags, key=lambda t: t.code)

    def _ifd_size(self, image: _Image) -> int:
        tags = self._values(image)
        size = self.count_size + self.entry * len(tags) + self.next_size
        for t in tags:
            nbytes = _TYPE_SIZE[t.type] * t.count
            if nbytes > self.inline:
                size += nbytes + (nbytes & 1)
        return size

    def ifd_bytes(self, index: int, image: _Image, next_ifd: int) -> bytes:
        tags = self._values(image)
        start = self.ifd_at[index]
        extra_at = start + self.count_size + self.entry * len(tags) + self.next_size
        entries, extra = [], bytearray()
        offsets, pos = [], self.tiles_at[index]
        for c in image.counts:
            offsets.append(pos + _LEADER if c else 0)
            pos += c + _LEADER + _TRAILER if c else 0
        for t in tags:
            value = t.value
            if t.code == TILE_OFFSETS:
                value = struct.pack(f"<{len(offsets)}{'Q' if self.big else 'I'}", *offsets)
            elif t.code == TILE_BYTE_COUNTS:
                value = struct.pack(f"<{len(image.counts)}I", *image.counts)
            if len(value) > self.inline:
                field = struct.pack("<Q" if self.big else "<I", extra_at + len(extra))
                extra += value + (b"\0" if len(value) & 1 else b"")
            else:
                field = value.ljust(self.inline, b"\0")
            count = struct.pack("<Q" if self.big else "<I", t.count)
            entries.append(struct.pack("<HH", t.code, t.type) + count + field)
        head = struct.pack("<Q" if self.big else "<H", len(tags))
        tail = struct.pack("<Q" if self.big else "<I", next_ifd)
        out = head + b"".join(entries) + tail + bytes(extra)
        if len(out) != self.ifd_size[index]:
            raise LayoutError(f"IFD {index}: {len(out)} bytes written, {self.ifd_size[index]} laid out")
        return out


def assemble_cog(full: str | os.PathLike, overviews: list[str | os.PathLike], dst: str | os.PathLike,
                 tiles: list | None = None) -> Path:
    """Write ``dst``: a COG of the tiled GeoTIFF ``full`` with ``overviews`` (tiled GeoTIFFs,
    each half the size of the one before, same tiling and codec) as its internal overviews.

    Tile bytes are copied, never decoded. ``tiles``: for each of ``[full] + overviews``, None
    or a :class:`geodino.tilecodec.TileStore` holding that image's tiles (its GeoTIFF then only
    gives the structure). Raises :class:`LayoutError` when the sources do not fit together
    (the caller can then fall back to GDAL's COG driver).
    """
    images = [_read_image(Path(full), overview=False)] + [_read_image(Path(p), overview=True) for p in overviews]
    for i, store in enumerate(tiles or []):
        if store is not None:
            images[i] = _with_tiles(images[i], store)
    if any(0 < c < _TRAILER for im in images for c in im.counts):
        raise LayoutError(f"{full}: a tile shorter than its {_TRAILER}-byte trailer")
    codec = _codec(images[0])
    for image in images[1:]:
        if _codec(image) != codec:
            raise LayoutError(f"{image.path}: tiling or codec differs from {images[0].path}")
    big = any(t.type in _BIG_ONLY_TYPES for im in images for t in im.tags)
    layout = _Layout(images, big=big)
    if not big and layout.total > _CLASSIC_LIMIT:
        layout = _Layout(images, big=True)
    dst = Path(dst)
    with open(dst, "wb") as out:
        first_ifd = layout.ifd_at[0]
        out.write(b"II" + (struct.pack("<HHHQ", 43, 8, 0, first_ifd) if layout.big
                           else struct.pack("<HI", 42, first_ifd)))
        out.write(_GHOST)
        for i, image in enumerate(images):
            next_ifd = layout.ifd_at[i + 1] if i + 1 < len(images) else 0
            out.write(layout.ifd_bytes(i, image, next_ifd))
        for image in reversed(images):
            _copy_tiles(image, out)
        if out.tell() != layout.total:
            raise LayoutError(f"{dst}: wrote {out.tell()} bytes, laid out {layout.total}")
    return dst


def _with_tiles(image: _Image, store) -> _Image:
    """``image`` with its tiles taken from ``store``, which must be encoded as its tags say."""
    tags = {t.code: t.value for t in image.tags}

    def number(code: int, default: int) -> int:
        value = tags.get(code)
        return default if value is None else int.from_bytes(value, "little")  # one SHORT or LONG

    if (number(259, 1), number(317, 1)) != (8, store.predictor) or (number(322, 0), number(323, 0)) != (
            store.tile, store.tile) or len(store.offsets) != len(image.offsets):
        raise LayoutError(f"{image.path}: its tags do not describe the tiles of {store.path}")
    return _Image(store.path, image.tags, tuple(int(o) for o in store.offsets), tuple(int(c) for c in store.counts))


def _copy_tiles(image: _Image, out) -> None:
    """Append the image's tiles in index order, each between its leader and trailer."""
    with open(image.path, "rb") as src:
        for offset, count in zip(image.offsets, image.counts):
            if not count:
                continue
            src.seek(offset)
            data = src.read(count)
            if len(data) != count:
                raise LayoutError(f"{image.path}: ends inside a tile")
            out.write(struct.pack("<I", count))
            out.write(data)
            out.write(data[-_TRAILER:])
