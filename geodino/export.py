"""Writing outputs: atomic file placement, streamed COG export (codecs: :mod:`geodino.cogcodec`), class polygons."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import rasterio
from rasterio.windows import Window

from geodino import cogcodec
from geodino.classes import ClassTable
from geodino.cogcodec import COG_BLOCK, stream_tile_size, to_cog  # noqa: F401 - also geodino.export's API
from geodino.errors import OutputExistsError
from geodino.timing import stage


def partial_path(final: Path) -> Path:
    """Where an output is built before it is renamed into place (same folder, same suffix)."""
    return final.with_name(f".{final.stem}.partial-{uuid.uuid4().hex[:8]}{final.suffix}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    An exception (or an interrupt) removes the temporary file, so nothing half-written ever
    appears at the final path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".aux.xml"), tmp.with_name(tmp.name + ".ovr")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def check_writable(paths, overwrite: bool) -> None:
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace")


def polygonize(raster: str | os.PathLike, out: str | os.PathLike, classes: ClassTable, *,
               min_area: float = 0.0, overwrite: bool = False, strip_rows: int = 2048, pixels=None) -> Path:
    """Vectorise a class raster into a GeoPackage of polygons (see :func:`geodino.vectorize.polygonize`)."""
    from geodino.vectorize import polygonize

    return polygonize(raster, out, classes, min_area=min_area, overwrite=overwrite, strip_rows=strip_rows,
                      pixels=pixels)


# --------------------------------------------------------------------------------------
# GeoTIFF / COG export from lazy arrays

class RasterOutput:
    """One raster to export: a lazy (band, y, x) DataArray plus how to describe it."""

    def __init__(self, path, data, *, dtype: str, nodata, descriptions=None, units=None, tags=None,
                 classes: ClassTable | None = None, overview_resampling: str = "average", grid=None,
                 after=None, observers=(), trace_pixels: bool = False) -> None:
        self.path = Path(path)
        # after(cog_path): work on the finished COG (still at its temporary path) that runs
        # beside the other outputs' afters, e.g. polygons from a class raster
        self.after = after
        # trace_pixels: also keep a flat copy of the pixels while they stream (geodino.rawpixels);
        # where one could be made, after(raster, pixels=copy) is called as soon as the stream
        # ends, with ``raster`` the streamed file: its structure (georeferencing, nodata, CRS)
        # is the COG's, its pixels are only in the copy
        self.trace_pixels = trace_pixels
        # observer(block): called with each (band, rows, cols) block as it is written, e.g. to
        # build a report's statistics without reading the output back
        self.observers = list(observers)
        self.grid = grid  # geodino.scene.Grid; None: taken from the DataArray's rio accessor
        self.data = data
        self.dtype = dtype
        self.nodata = nodata
        self.descriptions = list(descriptions) if descriptions else None
        self.units = units
        self.tags = dict(tags or {})
        self.classes = classes
        self.overview_resampling = overview_resampling

    def creation_profile(self, compress: str, block: int = COG_BLOCK) -> dict:
        if self.grid is not None:
            crs, transform = self.grid.crs, self.grid.transform
        else:
            crs, transform = self.data.rio.crs, self.data.rio.transform()
        count, height, width = self.data.shape
        predictor = 3 if self.dtype.startswith("float") else 1  # differencing class codes does not pay
        return dict(driver="GTiff", width=width, height=height, count=count, dtype=self.dtype, crs=crs,
                    transform=transform, nodata=self.nodata, tiled=True, blockxsize=block,
                    blockysize=block, compress=compress, predictor=predictor, BIGTIFF="IF_SAFER")


def _describe(dst, out: RasterOutput) -> None:
    if out.descriptions:
        for i, d in enumerate(out.descriptions, start=1):
            dst.set_band_description(i, d)
    if out.units:
        dst.units = tuple([out.units] * dst.count)
        for i in range(1, dst.count + 1):
            dst.update_tags(i, units=out.units)
    if out.tags:
        dst.update_tags(**{k: str(v) for k, v in out.tags.items()})
    if out.classes is not None:
        dst.write_colormap(1, out.classes.colormap())
        dst.update_tags(1, class_codes=",".join(map(str, out.classes.codes)),
                        class_names=",".join(out.classes.names))
        # GDAL's raster attribute-style category names: index = pixel value
        cats = [""] * (max(out.classes.codes) + 1)
        for c in out.classes.classes:
            cats[c.code] = c.name
        dst.update_tags(1, CATEGORY_NAMES=";".join(cats))


def write_rasters(outputs: list[RasterOutput], *, overwrite: bool = False, compress: str = "DEFLATE",
                  intermediate_compress: str = "ZSTD", beside=None) -> list[Path]:
    """Compute the lazy outputs together (each window inferred once) and export each as a COG.

    Blocks stream, row of blocks by row of blocks (:func:`geodino.stream.stream_blocks`), into
    overview levels pooled on the way (:class:`geodino.overviews.Pyramid`) and into a tiled
    GeoTIFF beside each target. Where the rows of tiles fit in memory (every raster output of
    a run but multi-band embeddings of very wide scenes), that file already has the COG's
    512 tiles and codec, written a whole row of tiles at a time, and the COG is assembled by
    moving its tiles (:func:`geodino.cog.assemble_cog`): each tile is encoded once. Otherwise
    the file is a fast intermediate that GDAL's COG driver re-encodes. Outputs are finished
    side by side on threads and renamed into place when all are done. Any failure or
    interrupt leaves nothing at the final paths. Each output's ``after`` and ``beside`` (called
    with {final path: finished file at its temporary path} for all outputs) run side by side
    once every COG is finished, before anything is renamed into place; an ``after`` that has
    a flat copy of its output's pixels (``trace_pixels``) starts as soon as the stream ends.
    Single-band DEFLATE tiles are encoded by :mod:`geodino.tilecodec`, not GDAL.
    """
    from concurrent.futures import ThreadPoolExecutor

    from geodino.overviews import Pyramid
    from geodino.rawpixels import RawPixels
    from geodino.stream import stream_blocks
    from geodino.tilecodec import TileStore
    from geodino.tilerows import TileRows

    check_writable([o.path for o in outputs], overwrite)
    threads = max(1, (os.cpu_count() or 1) // max(1, len(outputs)))
    with contextlib.ExitStack() as stack:
        staged, pyramids, direct, flat, stores = [], [], [], [], []
        for out in outputs:
            final_tmp = stack.enter_context(atomic_path(out.path))
            stream_tmp = stack.enter_context(_removed_after(partial_path(out.path)))
            staged.append((out, stream_tmp, final_tmp))
        with contextlib.ExitStack() as open_files:
            writers = []
            for out, stream_tmp, _ in staged:
                is_float = out.dtype.startswith("float")
                if cogcodec.writes_direct(out.data.shape, out.dtype, compress):
                    direct.append(True)
                    codec = cogcodec.codec_options(compress, is_float)
                    profile = out.creation_profile(compress, COG_BLOCK) | codec
                    level_codec = codec
                else:
                    direct.append(False)
                    profile = out.creation_profile(intermediate_compress, stream_tile_size(out.data.chunks))
                    if intermediate_compress.upper() == "ZSTD":
                        profile.update(ZSTD_LEVEL=1)
                    level_codec = dict(compress="ZSTD", ZSTD_LEVEL=1)
                store = None
                if direct[-1] and cogcodec.encodes_here(out.data.shape[0], profile) \
                        and Pyramid.streams(profile, out.data.chunks):
                    # GDAL writes the structure, tiles are encoded here (geodino.tilecodec)
                    encode = dict(predictor=profile["predictor"], level=profile["ZLEVEL"],
                                  fill=cogcodec.fill_value(out.dtype, out.nodata))
                    store = TileStore(stream_tmp.with_suffix(".tiles"), profile["height"], profile["width"],
                                      COG_BLOCK, out.dtype, **encode)
                    stack.callback(store.remove)
                stores.append(store)
                dst = open_files.enter_context(rasterio.open(stream_tmp, "w", **profile,
                                                             **({"SPARSE_OK": True} if store is not None else {})))
                _describe(dst, out)
                raw = None
                if out.trace_pixels and direct[-1] and RawPixels.supports(out.dtype, dst.count):
                    raw = RawPixels(stream_tmp.with_suffix(".pixels"), dst.height, dst.width, out.dtype)
                    stack.callback(raw.remove)
                flat.append(raw)
                writers.append(TileRows(dst, COG_BLOCK, on_row=None if raw is None else raw.write_rows, store=store)
                               if direct[-1] else _Plain(dst))
                pyramid = Pyramid(stream_tmp, profile, out.data.chunks, classes=out.classes is not None,
                                  codec=level_codec, encode=encode if store is not None else None)
                stack.callback(pyramid.cleanup)
                if not pyramid.usable:
                    direct[-1] = False  # GDAL makes the overviews from the file: it re-encodes anyway
                pyramids.append((pyramid if pyramid.usable else None, profile))
            sources = [o.data.data.astype(o.dtype) if o.data.dtype != o.dtype else o.data.data for o in outputs]
            sinks = [_Sink(_block_steps(w, p, o.observers), name=o.path.stem)
                     for w, (p, _), o in zip(writers, pyramids, outputs)]
            try:
                for index, (rows, cols), block in stream_blocks(sources):
                    sinks[index].put(block, rows, cols)
                for sink in sinks:
                    sink.close()
            finally:
                for sink in sinks:
                    sink.abort()
            for writer in writers:
                writer.close()
            for closing in flat + stores:
                if closing is not None:
                    closing.close()

        def convert(item, pyramid_profile, moved: bool, store) -> None:
            from geodino.cog import LayoutError, assemble_cog

            out, stream_tmp, final_tmp = item
            pyramid, profile = pyramid_profile
            if pyramid is not None:
                pyramid.finish()
            with stage("cog"):
                if moved:
                    try:
                        assemble_cog(stream_tmp, pyramid.paths if pyramid is not None else [], final_tmp,
                                     tiles=[store] + (pyramid.stores if pyramid is not None else []))
                    except LayoutError:  # sources that do not fit one COG: GDAL's driver re-encodes them
                        if store is not None:  # its files hold no tiles: nothing to re-encode from
                            raise
                        moved = False
                if not moved:
                    source = stream_tmp
                    if pyramid is not None:
                        source = pyramid.vrt(stream_tmp, profile)
                        with rasterio.open(source, "r+") as vrt:
                            _describe(vrt, out)
                    to_cog(source, final_tmp, resampling=out.overview_resampling, compress=compress, threads=threads)

        with ThreadPoolExecutor(max(2, len(staged)), thread_name_prefix="geodino-cog") as pool:
            # an output with a flat copy of its pixels needs no COG: its after starts now, from
            # the copy and the structure of the streamed file (georeferencing, nodata, CRS)
            early = {i for i, ((out, _, _), raw) in enumerate(zip(staged, flat))
                     if out.after is not None and raw is not None and raw.complete}
            jobs = [pool.submit(staged[i][0].after, staged[i][1], pixels=flat[i].path) for i in sorted(early)]
            for done in [pool.submit(convert, *args) for args in zip(staged, pyramids, direct, stores)]:
                done.result()
            # work on the finished files (still at their temporary paths), side by side:
            # e.g. polygons from the class COG while the quicklook draws from all of them
            jobs += [pool.submit(out.after, final_tmp) for i, (out, _, final_tmp) in enumerate(staged)
                     if out.after is not None and i not in early]
            if beside is not None:
                jobs.append(pool.submit(beside, {out.path: final_tmp for out, _, final_tmp in staged}))
            for done in jobs:
                done.result()
    return [o.path for o in outputs]


def _block_steps(writer, pyramid, observers) -> list:
    """What happens to each block of one output, in order: file, overview levels, observers."""
    def write(block, rows, cols):
        with stage("write"):
            writer.write(block, rows, cols)

    def pool(block, rows, cols):
        with stage("overviews"):
            pyramid.write(block, rows, cols)

    steps = [write] + ([pool] if pyramid is not None else [])
    return steps + [lambda block, rows, cols, observe=observe: observe(block) for observe in observers]


class _Sink:
    """One output's blocks handled on a thread of its own, fed through a short queue.

    The outputs' writers then run side by side and beside the next wave's computation, where
    one consumer thread used to write every output in turn while the workers waited on it
    (GDAL's encoding and numpy's pooling release the GIL). The queue holds a few blocks, so
    memory stays bounded; an error on the thread is raised to the caller at its next block.
    """

    def __init__(self, steps: list, name: str, depth: int = 4) -> None:
        import queue
        import threading

        self.steps, self.error = steps, None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name=f"geodino-write-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    for step in self.steps:
                        step(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def put(self, block, rows: slice, cols: slice) -> None:
        self._raise()
        self._queue.put((block, rows, cols))

    def close(self) -> None:
        """Wait until every block is handled; raise what went wrong on the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop the thread without handling what is queued (after an error or an interrupt)."""
        if not self._thread.is_alive():
            return
        self.error = self.error or RuntimeError("stopped")
        while True:
            try:
                self._queue.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                break
        self._queue.put(None)
        self._thread.join()


class _Plain:
    """Blocks straight to a dataset whose tiles divide the block grid (the staged path)."""

    def __init__(self, dst) -> None:
        self.dst = dst

    def write(self, block, rows: slice, cols: slice) -> None:
        self.dst.write(block, window=Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start))

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _removed_after(path: Path):
    try:
        yield path
    finally:
        for leftover in (path, path.with_name(path.name + ".aux.xml"), path.with_name(path.name + ".ovr")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
