"""Individual trees over a whole canopy-height raster, block by block in bounded memory.

Two passes over blocks of ``params.block`` pixels, each read with a halo:

1. tree tops. A block sees ``Halos.tops`` pixels around its core, enough for every top in
   the core to be exact (smoothing kernel, search window, uphill move). A tree belongs to
   the block whose core holds its top, so it is found once. Tops are written to a scratch
   file band by band (a band is a row of blocks) in raster order; a tree's id is its rank
   in that order, which does not depend on the block size.
2. crowns. A block sees ``Halos.crowns`` pixels around its core (three crown radii): every
   crown that reaches into the core, every top that competes with one, and their
   neighbours are inside. Tops
   come from pass 1, not found again. The block writes its core's crown ids into the id
   raster and its own trees (whole crowns, never cut at the core's edge) to the GeoPackage.

Memory is a few block-sized arrays plus one band of tops, whatever the scene's area.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely

from geodino.errors import InputError
from geodino.export import atomic_path, check_writable, partial_path, to_cog
from geodino.progress import Progress
from geodino.trees.outputs import (
    Summary,
    TreeLayers,
    crown_polygons,
    describe_id_raster,
    id_raster_profile,
    provenance,
    write_ids,
)
from geodino.trees.params import CrownParams, halos
from geodino.trees.segment import crown_pixel_counts, segment_crowns
from geodino.trees.source import CanopyRaster, open_canopy
from geodino.trees.tops import find_tops, surface

TREES_GPKG, CROWNS_TIF, REPORT = "trees.gpkg", "crowns.tif", "report.json"
_TOP = np.dtype([("row", "<i8"), ("col", "<i8")])


@dataclass
class CrownResult:
    """What :func:`crowns` wrote, and its summary (the content of report.json)."""

    trees: int
    outputs: dict[str, Path]
    report: dict = field(default_factory=dict)


def crowns(canopy: str | os.PathLike, out: str | os.PathLike, params: CrownParams | None = None, *,
           band: int = 1, overwrite: bool = False, write_report: bool = True, progress: bool | None = None,
           **options) -> CrownResult:
    """Find individual trees in a canopy-height raster: tops, crowns, and a summary.

    Writes ``trees.gpkg`` (layers ``treetops``: points, and ``crowns``: polygons, both with
    id, height_m, crown_area_m2, crown_diameter_m), ``crowns.tif`` (uint32 crown ids, COG,
    0 = no crown) and ``report.json`` (tree count, density per ha, height and crown-size
    distributions) into ``out``. ``options`` are :class:`CrownParams` fields (metres), e.g.
    ``geodino.crowns("chm.tif", "trees", min_height=3, smoothing_m=0.5)``. Diameters are
    those of the circle of the crown's area.

    Method: optional Gaussian smoothing; tops as local maxima in a window growing with
    height (Popescu & Wynne 2004, Photogramm. Eng. Remote Sens. 70(5), as lidR's ``lmf``);
    crowns by marker-controlled watershed (Meyer & Beucher 1990, J. Vis. Commun. Image
    Represent. 1(1)) bounded by a maximum crown radius and a fraction of the top height
    like the region growing of Dalponte & Coomes 2016 (Methods Ecol. Evol. 7(10), lidR's
    ``dalponte2016``). See :mod:`geodino.trees.tops` and :mod:`geodino.trees.segment`.
    """
    params = params if params is not None else CrownParams()
    if options:
        from dataclasses import replace

        params = replace(params, **options)
    raster = open_canopy(canopy, band)
    out = Path(out)
    paths = {"trees": out / TREES_GPKG, "crowns": out / CROWNS_TIF}
    if write_report:
        paths["report"] = out / REPORT
    if any(p.resolve() == raster.path.resolve() for p in paths.values()):
        raise InputError(f"{raster.path}: the input would be overwritten by an output; choose another --out")
    check_writable(paths.values(), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(raster, params.block)
    start = time.perf_counter()
    tops_file = partial_path(out / "treetops.bin")
    try:
        with Progress("trees", total=2 * len(blocks), unit="blocks", enabled=progress) as bar:
            bands = _find_all_tops(raster, params, blocks, tops_file, bar)
            summary = _write_crowns(raster, params, blocks, tops_file, bands, paths, bar)
    finally:
        tops_file.unlink(missing_ok=True)
    report = {"canopy_height": str(raster.path), "crs": raster.crs.to_string(), "width": raster.width,
              "height": raster.height, "pixel_size_m": [round(raster.pixel.y, 6), round(raster.pixel.x, 6)],
              **summary.report(raster), "parameters": provenance(raster, params),
              "outputs": {k: p.name for k, p in paths.items() if k != "report"},
              "seconds": round(time.perf_counter() - start, 3)}
    if write_report:
        with atomic_path(paths["report"]) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    return CrownResult(summary.trees, paths, report)


def _blocks(raster: CanopyRaster, size: int) -> list[tuple[int, int, int, int]]:
    return [(r, c, min(size, raster.height - r), min(size, raster.width - c))
            for r in range(0, raster.height, size) for c in range(0, raster.width, size)]


def _find_all_tops(raster, params, blocks, tops_file: Path, bar) -> list[int]:
    """Pass 1: tops of every block, in raster order, to ``tops_file``; returns each band's
    first record index (plus the total at the end)."""
    halo = halos(params, raster.pixel).tops
    starts, band_tops, current = [0], [], 0
    with rasterio.open(raster.path) as src, open(tops_file, "wb") as f:
        for i, (r, c, h, w) in enumerate(blocks):
            raw = raster.read(r - halo, c - halo, h + 2 * halo, w + 2 * halo, src)
            rows, cols, _ = find_tops(raw, surface(raw, params, raster.pixel), params, raster.pixel,
                                      (slice(halo, halo + h), slice(halo, halo + w)))
            rec = np.empty(rows.size, _TOP)
            rec["row"], rec["col"] = rows + r - halo, cols + c - halo
            band_tops.append(rec)
            bar.advance()
            last_in_band = i + 1 == len(blocks) or blocks[i + 1][0] != r
            if last_in_band:
                tops = np.concatenate(band_tops)
                tops = tops[np.lexsort((tops["col"], tops["row"]))]
                tops.tofile(f)
                current += tops.size
                starts.append(current)
                band_tops = []
    return starts


def _tops_near(tops_file: Path, starts: list[int], block: int, r0: int, r1: int, c0: int, c1: int):
    """Global rows, cols and ids (1-based rank in raster order) of the tops in a rectangle."""
    b0, b1 = max(r0 // block, 0), min((r1 - 1) // block + 1, len(starts) - 1)
    if b1 <= b0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    first, count = starts[b0], starts[b1] - starts[b0]
    rec = np.fromfile(tops_file, _TOP, count=count, offset=first * _TOP.itemsize)
    ids = np.arange(first + 1, first + count + 1, dtype=np.int64)
    inside = (rec["row"] >= r0) & (rec["row"] < r1) & (rec["col"] >= c0) & (rec["col"] < c1)
    return rec["row"][inside], rec["col"][inside], ids[inside]


def _write_crowns(raster, params, blocks, tops_file: Path, starts: list[int], paths: dict, bar) -> Summary:
    """Pass 2: crowns of every block into the id raster and the GeoPackage."""
    halo = halos(params, raster.pixel).crowns
    summary = Summary()
    tags = provenance(raster, params)
    with contextlib.ExitStack() as stack:
        gpkg_tmp = stack.enter_context(atomic_path(paths["trees"]))
        tif_tmp = stack.enter_context(atomic_path(paths["crowns"]))
        stream_tmp = partial_path(paths["crowns"])
        stack.callback(_remove, stream_tmp)
        layers = TreeLayers(gpkg_tmp, raster.crs)
        with rasterio.open(raster.path) as src, rasterio.open(stream_tmp, "w", **id_raster_profile(
                raster, params.block)) as dst:
            describe_id_raster(dst, tags)
            for r, c, h, w in blocks:
                er, ec = r - halo, c - halo
                raw = raster.read(er, ec, h + 2 * halo, w + 2 * halo, src)
                rows, cols, ids = _tops_near(tops_file, starts, params.block, er, er + raw.shape[0], ec,
                                             ec + raw.shape[1])
                labels = segment_crowns(raw, surface(raw, params, raster.pixel), rows - er, cols - ec,
                                        params, raster.pixel, origin=(er, ec))
                lookup = np.concatenate([[0], ids]).astype(np.uint32)
                core = (slice(halo, halo + h), slice(halo, halo + w))
                write_ids(dst, lookup[labels[core]], r, c)
                summary.add_pixels(raw[core], params.min_height)
                own = (rows >= r) & (rows < r + h) & (cols >= c) & (cols < c + w)
                table, points, polygons = _tree_table(raster, raw, labels, rows, cols, ids, own, er, ec)
                layers.append(table, points, polygons)
                summary.add_trees(table["height_m"], table["crown_area_m2"])
                bar.advance()
        layers.flush()
        to_cog(stream_tmp, tif_tmp, resampling="nearest")
    return summary


def _tree_table(raster, raw, labels, rows, cols, ids, own, er, ec):
    """Attributes, top points and crown polygons of the trees a block owns."""
    k = np.nonzero(own)[0]
    counts = crown_pixel_counts(labels, rows.size)[k]
    area = counts * raster.pixel.area_m2
    heights = raw[rows[k] - er, cols[k] - ec].astype(np.float64) if k.size else np.zeros(0)
    x, y = raster.xy(rows[k], cols[k])
    keep = np.zeros(rows.size + 1, bool)
    keep[k + 1] = True
    polys = {}
    if k.size:
        traced, shapes_ = crown_polygons(labels, keep, er, ec, raster.transform)
        polys = dict(zip(traced.tolist(), shapes_))
    table = {"id": ids[k].astype(np.int64), "height_m": np.round(heights, 3),
             "crown_area_m2": np.round(area, 3), "crown_diameter_m": np.round(2 * np.sqrt(area / math.pi), 3)}
    polygons = [polys.get(int(i) + 1, shapely.Polygon()) for i in k]
    return table, shapely.points(x, y) if k.size else [], polygons


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".aux.xml")):
        p.unlink(missing_ok=True)
