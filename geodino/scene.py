"""Opening scenes: one raster, a mosaic of several, or single-band files stacked as bands
(the files themselves: :mod:`geodino.sources`).

A :class:`Scene` is a small picklable description (paths, selected bands, processing grid);
pixels are read lazily, window by window, through per-thread rasterio handles, so a scene
of any size is never held in memory and the same object can travel to dask workers.
Several files are combined through a GDAL VRT (GDAL does the merging); a scene in a
geographic CRS, or one resampled to a target ground sampling distance, is read through a
rasterio ``WarpedVRT`` onto an explicit processing grid, which is the grid outputs are
written on.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geodino.errors import InputError
from geodino.sources import (
    _check_georeferenced,
    _first_line,
    _open_checked,
    build_vrt,
    resolve_bands,
)
from geodino.tiles import TiledReader, all_valid

# the decimated whole-scene read behind statistics, the all-nodata check and the quicklook
OVERVIEW_SIZE = 1024


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform and size. Outputs are written on one of these."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north)."""
        return _bounds(self)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def window_transform(self, window: Window) -> Affine:
        return rasterio.windows.transform(window, self.transform)

    def coarsen(self, factor: int) -> "Grid":
        """The grid with pixels ``factor`` times larger (e.g. the 16 px patch grid)."""
        return Grid(self.crs, self.transform * Affine.scale(factor),
                    math.ceil(self.width / factor), math.ceil(self.height / factor))


def _bounds(grid: Grid) -> tuple[float, float, float, float]:
    west, south, east, north = rasterio.transform.array_bounds(grid.height, grid.width, grid.transform)
    return west, south, east, north


@dataclass(frozen=True)
class Scene:
    """A lazily read scene on its processing grid.

    ``source`` is a path or a VRT document; ``bands`` are 1-based indexes into it.
    """

    paths: tuple[str, ...]
    source: str
    bands: tuple[int, ...]
    band_names: tuple[str, ...]
    dtype: str
    nodata: float | None
    source_grid: Grid
    grid: Grid
    resampling: str = "bilinear"

    @property
    def warped(self) -> bool:
        return self.grid != self.source_grid

    @property
    def name(self) -> str:
        return Path(self.paths[0]).stem if len(self.paths) == 1 else f"{Path(self.paths[0]).stem}+{len(self.paths) - 1}"

    @property
    def count(self) -> int:
        return len(self.bands)

    # -- reading ------------------------------------------------------------------

    @functools.cached_property
    def _handle_key(self) -> tuple:
        # hashing the grid hashes its CRS through WKT: once per scene, not once per window read
        return self.source, self.grid.crs.to_wkt(), self.grid.transform, self.grid.shape, self.resampling

    def _dataset(self):
        """A rasterio dataset for this thread (rasterio handles are not thread-safe)."""
        cache = _HANDLES.__dict__.setdefault("datasets", {})
        key = self._handle_key
        ds = cache.get(key)
        if ds is None or ds.closed:
            src = rasterio.open(self.source)
            if self.warped:
                # without a nodata value, an alpha band marks where the source lies
                ds = WarpedVRT(src, crs=self.grid.crs, transform=self.grid.transform,
                               width=self.grid.width, height=self.grid.height,
                               resampling=Resampling[self.resampling], add_alpha=src.nodata is None)
            else:
                ds = src
            cache[key] = ds
        return ds

    def read(self, window: Window, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw values (bands, h, w) as float32 and the validity mask (h, w) of a window.

        The window may reach past the scene; pixels outside are returned invalid (zeros).
        A pixel is valid when any selected band is valid by the file's own mask (nodata,
        internal mask or alpha, as GDAL combines them) and all its values are finite.
        ``out``: a C-contiguous float32 (bands, h, w) array to read into (no new buffer).
        Tiled files are read a whole tile at a time and tiles are kept for the windows that
        overlap them (:mod:`geodino.tiles`); the values are those GDAL reads.
        """
        return self._read(window, out)

    def _tiled_reader(self, ds):
        """This Scene's :class:`geodino.tiles.TiledReader` (None where the file does not qualify)."""
        reader = self.__dict__.get("_tiles", False)
        if reader is False:
            with _MEMO_LOCK:
                reader = self.__dict__.get("_tiles", False)
                if reader is False:
                    qualifies = not self.warped and self.source == self.paths[0]
                    reader = TiledReader.for_dataset(ds, self.bands, self._valid) if qualifies else None
                    grid = self._sample_grid(OVERVIEW_SIZE)
                    if reader is not None and grid is not None and not ds.overviews(self.bands[0]) \
                            and OVERVIEW_SIZE not in self.__dict__.get("_overview_memo", {}):
                        # the decimated read of the quicklook and statistics, gathered as the
                        # run's windows decode the tiles (no second decoding of the scene)
                        self.__dict__["_sample"] = (OVERVIEW_SIZE, reader.sample_every(*grid))
                    self.__dict__["_tiles"] = reader
        return reader

    def _read(self, window: Window, out: np.ndarray | None = None, keep_tiles: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
        ds = self._dataset()
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        ir0, ic0 = max(r0, 0), max(c0, 0)
        ir1, ic1 = min(r0 + h, self.grid.height), min(c0 + w, self.grid.width)
        shape = (len(self.bands), h, w)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        inside = (ir0, ic0, ir1, ic1) == (r0, c0, r0 + h, c0 + w)
        if not inside:
            out.fill(0.0)
        valid = np.zeros((h, w), bool)
        if ir1 <= ir0 or ic1 <= ic0:
            return out, valid
        inner = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
        part = out if inside else np.empty((len(self.bands), ir1 - ir0, ic1 - ic0), np.float32)
        tiled = self._tiled_reader(ds)
        with self._read_errors(f"window col {ic0}-{ic1}, row {ir0}-{ir1}"):
            if tiled is not None and tiled.fits(h, w):
                ok = tiled.read(ds, inner, part, keep=keep_tiles)
                if keep_tiles:
                    tiled.window_done(r0, c0, h, w)
            else:
                ds.read(self.bands, window=inner, out=part)
                ok = self._valid(ds, window=inner)
        if any(np.issubdtype(np.dtype(ds.dtypes[b - 1]), np.floating) for b in self.bands):
            finite = np.isfinite(part).all(axis=0)
            if not finite.all():
                ok &= finite
                np.copyto(part, 0.0, where=~finite[None])
        if not inside:
            out[:, ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = part
        valid[ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = ok
        return out, valid

    @contextlib.contextmanager
    def _read_errors(self, where: str):
        """A damaged tile or strip becomes an InputError that says where, so the user can
        check or replace the file (GDAL's own message names only the block)."""
        try:
            yield
        except RasterioIOError as e:
            cause = e.__cause__ or e.__context__ or e
            raise InputError(f"{self.paths[0]}: cannot read the pixels of {where} (the file may be damaged "
                             f"there: {_first_line(cause)})") from None

    def block_cache_bytes(self, window: int) -> int:
        """GDAL block cache that the source blocks of two neighbouring windows take.

        Tiled sources need a few tiles; striped ones (blocks as wide as the scene) need every
        strip of a window's rows, or each window of a row decodes them all again.
        """
        ds = self._dataset()
        sizes = [_blocks_bytes(ds, window)]
        if self.paths[0] != self.source:  # a VRT: the files' own blocks are cached too
            with rasterio.open(self.paths[0]) as src:
                sizes.append(_blocks_bytes(src, window))
        return max(sizes)

    def _valid(self, ds, **kwargs) -> np.ndarray:
        """Valid where any selected band's own mask says so, and the alpha band (if any) too."""
        shape = kwargs.pop("out_shape", None)
        if shape is not None:
            kwargs.update(out_shape=(len(self.bands),) + tuple(shape), resampling=Resampling.nearest)
        if all_valid(ds, self.bands):  # GDAL's mask would be all 255: skip reading it
            return np.ones(tuple(shape) if shape is not None else _window_shape(kwargs["window"]), bool)
        valid = ds.read_masks(self.bands, **kwargs).max(axis=0) > 0
        alpha = [i + 1 for i, c in enumerate(ds.colorinterp) if c == ColorInterp.alpha]
        if alpha and alpha[0] not in self.bands:
            if shape is not None:
                kwargs["out_shape"] = tuple(shape)
            valid &= ds.read(alpha[0], **kwargs) > 0
        return valid

    def __getstate__(self) -> dict:
        # the memo of decimated reads stays in this process: it would put megabytes of
        # pixels into every dask graph and pickled task that carries the scene
        state = dict(self.__dict__)
        state.pop("_overview_memo", None)
        state.pop("_tiles", None)  # decoded tiles, likewise
        state.pop("_sample", None)
        return state

    def __reduce__(self):
        return _shared_scene, (type(self), self.__getstate__())

    def read_overview(self, max_size: int = OVERVIEW_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """A decimated read of the whole scene (from overviews where present) for statistics.

        Without overviews, every ``f``-th pixel is taken from one source block (tile or strip)
        at a time: each block is decoded once, in bounded memory. (GDAL's own decimated read
        sweeps every block of a block row for each output row, and re-decodes them all
        whenever a block row is larger than the block cache.)

        The result is kept with this Scene object (at most two sizes; integer pixels in their
        own type, a quarter of the bytes), so the all-nodata check, scene statistics and the
        quicklook of one run decode the scene once between them rather than once each. The
        values come back as a new float32 array each time; the validity is shared, read-only.
        """
        memo = self.__dict__.setdefault("_overview_memo", {})
        size, sample = self.__dict__.get("_sample", (None, None))
        if max_size not in memo:
            if size == max_size and sample.complete:  # gathered while the run decoded the tiles
                data, valid = sample.data, sample.valid.copy()
                if data.dtype.kind == "f":  # as a read: non-finite values are invalid, 0
                    finite = np.isfinite(data).all(axis=0)
                    data, valid = np.where(finite[None], data, 0).astype(np.float32), valid & finite
            else:
                data, valid = self._read_overview(max_size)
            if self.dtype in ("uint8", "int8", "uint16", "int16"):
                compact = data.astype(self.dtype)
                data = compact if np.array_equal(compact, data) else data
            valid.setflags(write=False)
            while len(memo) >= 2:  # a third size evicts the oldest
                memo.pop(next(iter(memo)))
            memo[max_size] = data, valid
        data, valid = memo[max_size]
        return data.astype(np.float32), valid

    def expect_windows(self, size: int, rows, cols) -> None:
        """Windows of ``size`` px starting at ``rows`` x ``cols`` will be read row by row:
        decoded tiles keep only what later windows read
        (:meth:`geodino.tiles.TiledReader.window_done`)."""
        reader = self._tiled_reader(self._dataset())
        if reader is not None:
            reader.windows = (int(size), sorted({int(r) for r in rows}), sorted({int(c) for c in cols}))

    def release_tiles(self) -> None:
        """Drop the decoded source tiles kept for overlapping windows (at the end of a run's
        reading; a later read decodes what it needs again)."""
        reader = self.__dict__.get("_tiles")
        if reader:
            reader.release()

    def _sample_grid(self, max_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Rows and columns of a decimated read to ``max_size`` without overviews (every f-th
        pixel from f // 2 on); None when the scene is no larger than that."""
        scale = max(self.grid.width, self.grid.height) / max_size
        if scale <= 1:
            return None
        f = math.ceil(scale)
        return np.arange(f // 2, self.grid.height, f), np.arange(f // 2, self.grid.width, f)

    def _read_overview(self, max_size: int) -> tuple[np.ndarray, np.ndarray]:
        ds = self._dataset()
        scale = max(self.grid.width, self.grid.height) / max_size
        if scale <= 1:
            return self.read(Window(0, 0, self.grid.width, self.grid.height))
        if ds.overviews(self.bands[0]):
            shape = (max(1, round(self.grid.height / scale)), max(1, round(self.grid.width / scale)))
            with self._read_errors(f"the overview ({shape[1]} x {shape[0]} px) of the whole scene"):
                data = ds.read(self.bands, out_shape=(len(self.bands),) + shape, out_dtype="float32",
                               resampling=Resampling.nearest)
                valid = self._valid(ds, out_shape=shape)
            finite = np.isfinite(data).all(axis=0)
            return np.where(finite[None], data, 0.0), valid & finite
        rows, cols = self._sample_grid(max_size)
        data = np.zeros((len(self.bands), len(rows), len(cols)), np.float32)
        valid = np.zeros((len(rows), len(cols)), bool)
        bh, bw = ds.block_shapes[self.bands[0] - 1]
        if bw >= self.grid.width:  # strips: read the sampled rows only
            spans = [(r, r + 1) for r in rows]
        else:  # tiles: whole block rows at most 512 pixels high, a block column range at a time
            step = bh * max(1, 512 // bh)
            spans = [(r, min(r + step, self.grid.height)) for r in range(0, self.grid.height, step)]
        col_step = self.grid.width if bw >= self.grid.width else bw * max(1, 512 // bw)
        from geodino.progress import Progress

        # a warped scene is warped block by block here, which takes long on a big target grid
        with Progress(f"{self.name}: warping for statistics", total=len(spans), unit="block rows",
                      enabled=None if self.warped else False) as bar:
            for r0, r1 in spans:
                bar.advance()
                ri = np.flatnonzero((rows >= r0) & (rows < r1))
                if not len(ri):
                    continue
                for c0 in range(0, self.grid.width, col_step):
                    c1 = min(c0 + col_step, self.grid.width)
                    ci = np.flatnonzero((cols >= c0) & (cols < c1))
                    if not len(ci):
                        continue
                    block, ok = self._read(Window(c0, r0, c1 - c0, r1 - r0), keep_tiles=False)
                    sel = np.ix_(rows[ri] - r0, cols[ci] - c0)
                    data[:, ri[0]:ri[-1] + 1, ci[0]:ci[-1] + 1] = block[(slice(None),) + sel]
                    valid[ri[0]:ri[-1] + 1, ci[0]:ci[-1] + 1] = ok[sel]
        return data, valid

    def to_xarray(self, chunks: int | str = 512):
        """The scene as a lazy dask-backed DataArray (band, y, x) with CRS and transform."""
        import rioxarray  # noqa: F401  (registers .rio)

        ds = self._dataset()
        da = rioxarray.open_rasterio(ds, chunks={"band": -1, "x": chunks, "y": chunks}, lock=False)
        da = da.sel(band=list(self.bands))
        da = da.assign_coords(band_name=("band", list(self.band_names)))
        da.attrs["scene"] = self.name
        return da


_HANDLES = threading.local()
_MEMO_LOCK = threading.Lock()
_SHARED: dict = {}  # pickled state -> Scene, most recently used last (see _shared_scene)
SHARED_SCENES = 4


def _shared_scene(cls, state: dict):
    """The Scene a pickle holds, one object per process for equal scenes.

    A dask.distributed worker unpickles every task on its own, so each window batch would get
    a Scene of its own, with an empty cache of decoded source tiles: every window decoded
    its tiles again (the read path's sharing of tiles between overlapping windows,
    :mod:`geodino.tiles`, lost). Equal scenes unpickled in one process are one object, as in
    a threaded run; the few most recent are kept (a change run reads two dates at once).
    """
    import pickle

    key = (cls, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    with _MEMO_LOCK:
        scene = _SHARED.pop(key, None)
        if scene is None:
            scene = cls.__new__(cls)
            scene.__dict__.update(state)
        _SHARED[key] = scene
        while len(_SHARED) > SHARED_SCENES:
            _SHARED.pop(next(iter(_SHARED)))
    return scene


def _window_shape(window: Window) -> tuple[int, int]:
    return int(window.height), int(window.width)


def _blocks_bytes(ds, window: int) -> int:
    bh, bw = ds.block_shapes[0]
    itemsize = max(np.dtype(d).itemsize for d in ds.dtypes)
    rows = min(ds.height, (math.ceil(window / bh) + 1) * bh)
    cols = min(ds.width, (math.ceil(window / bw) + 2) * bw)
    return rows * cols * ds.count * itemsize


def _cache_max_bytes(value) -> int | None:
    """GDAL_CACHEMAX as bytes: GDAL reads numbers below 100000 as megabytes."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return None  # "5%" and the like: leave GDAL's choice alone
    return int(n * 2**20) if n < 100000 else int(n)


def ensure_block_cache(nbytes: int) -> None:
    """Raise GDAL's block cache to ``nbytes`` if it is smaller (never lowers a user's setting).

    geodino keeps the cache small by default (16 MB: a few source tiles are all that windows
    on one row share, and a cache that fills with a whole scene grows memory with its size).
    """
    from rasterio.env import get_gdal_config, set_gdal_config

    current = _cache_max_bytes(get_gdal_config("GDAL_CACHEMAX"))
    if current is not None and nbytes > current:
        set_gdal_config("GDAL_CACHEMAX", int(nbytes))


# --------------------------------------------------------------------------------------
# opening (source files, bands and mosaics: geodino.sources)


def utm_crs_for(lon: float, lat: float) -> CRS:
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def open_scene(paths: str | os.PathLike | Sequence[str | os.PathLike], *, bands: Sequence[int | str] | None = None,
               stack: bool = False, target_gsd: float | None = None, crs: str | CRS | None = None,
               resampling: str = "bilinear", grid: Grid | None = None) -> Scene:
    """Open one raster, a mosaic (several files) or a band stack (``stack=True``) as a Scene.

    ``paths`` may also be an in-memory rioxarray DataArray (band, y, x) or (y, x), lazy or not
    (see :func:`array_source`). ``bands`` selects bands by 1-based index or by description. Scenes in a geographic CRS
    are warped to their local UTM zone; ``target_gsd`` resamples to that pixel size (metres);
    ``crs`` forces a processing CRS. ``grid`` reads the scene onto that exact grid instead
    (warped with ``resampling`` wherever it differs from the file's own; pixels the file does
    not cover are invalid), e.g. a later date onto an earlier one's grid.
    """
    from geodino.scene_array import array_source, is_dataarray

    if is_dataarray(paths):
        paths = array_source(paths)
    target = grid
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [str(p) for p in paths]
    if not paths:
        raise InputError("no scene given")
    if resampling not in Resampling.__members__:
        raise InputError(f"unknown resampling {resampling!r}; use one of nearest, bilinear, cubic, average")
    if len(paths) == 1 and not stack:
        source = paths[0]
        ds = _open_checked(source)
    else:
        source = build_vrt(paths, separate=stack)
        ds = rasterio.open(source)
    label = paths[0] if len(paths) == 1 else f"mosaic of {len(paths)} files"
    with ds:
        _check_georeferenced(ds, label)
        band_idx = resolve_bands(ds, bands, label)
        names = tuple((ds.descriptions[b - 1] or f"band {b}") for b in band_idx)
        src_grid = Grid(ds.crs, ds.transform, ds.width, ds.height)
        dtype = ds.dtypes[band_idx[0] - 1]
        nodata = ds.nodata
        grid = src_grid
        if target is not None:
            _require_overlap(ds, target, label)
            crs, target_gsd = None, None
        dst_crs = CRS.from_user_input(crs) if crs is not None else None
        if dst_crs is None and ds.crs.is_geographic:
            west, south, east, north = ds.bounds
            dst_crs = utm_crs_for((west + east) / 2, (south + north) / 2)
        if dst_crs is not None or target_gsd is not None:
            from rasterio.warp import calculate_default_transform

            dst_crs = dst_crs or ds.crs
            kwargs = {"resolution": target_gsd} if target_gsd else {}
            transform, width, height = calculate_default_transform(
                ds.crs, dst_crs, ds.width, ds.height, *ds.bounds, **kwargs)
            if target_gsd:
                # keep pixel edges on multiples of the target GSD
                left = math.floor(transform.c / target_gsd + 1e-9) * target_gsd
                top = math.ceil(transform.f / target_gsd - 1e-9) * target_gsd
                transform = Affine(target_gsd, 0, left, 0, -target_gsd, top)
            grid = Grid(CRS.from_user_input(dst_crs), transform, width, height)
        if target is not None:
            grid = target
    scene = Scene(paths=tuple(paths), source=source, bands=band_idx, band_names=names, dtype=dtype,
                  nodata=nodata, source_grid=src_grid, grid=grid, resampling=resampling)
    return scene


def _require_overlap(ds, grid: Grid, label: str) -> None:
    """An error unless the raster's footprint overlaps ``grid`` (compared in the grid's CRS)."""
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(ds.crs, grid.crs, *ds.bounds, densify_pts=21)
    gw, gs, ge, gn = grid.bounds
    if west >= ge or east <= gw or south >= gn or north <= gs:
        raise InputError(f"{label}: does not overlap the processing grid (its bounds in {grid.crs.to_string()} "
                         f"are {west:.1f}, {south:.1f}, {east:.1f}, {north:.1f}; the grid's are "
                         f"{gw:.1f}, {gs:.1f}, {ge:.1f}, {gn:.1f})")


def require_valid_pixels(scene: Scene) -> float:
    """The valid fraction of the scene (from a decimated read); an error if there is none.

    A single integer file read on its own grid with no nodata, mask or alpha has only valid
    pixels: that needs no read (the decimated one decodes every tile of the scene, alone
    before any window can start).
    """
    if not scene.warped and scene.source == scene.paths[0] and np.issubdtype(np.dtype(scene.dtype), np.integer):
        with rasterio.open(scene.source) as ds:
            if all_valid(ds, scene.bands):
                return 1.0
    _, valid = scene.read_overview(OVERVIEW_SIZE)
    if not valid.any():
        # a decimated read can miss slivers: confirm at full resolution, strip by strip
        for row in range(0, scene.grid.height, 512):
            _, v = scene.read(Window(0, row, scene.grid.width, min(512, scene.grid.height - row)))
            if v.any():
                return 1.0 / (scene.grid.width * scene.grid.height)
        raise InputError(f"{scene.paths[0]}: every pixel is nodata; nothing to process")
    return float(valid.mean())


def with_bands(scene: Scene, bands: Sequence[int | str]) -> Scene:
    """The same scene with another band selection."""
    with rasterio.open(scene.source) as ds:
        idx = resolve_bands(ds, bands, scene.paths[0])
        names = tuple((ds.descriptions[b - 1] or f"band {b}") for b in idx)
    return replace(scene, bands=idx, band_names=names)
