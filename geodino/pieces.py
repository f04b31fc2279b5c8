"""Regions traced in pieces (strips of rows, or the halves of a raster traced at once) joined
into the regions of the whole raster, as one trace of it would give them.

Pieces are traced in whole pixel coordinates of the raster, so the parts of a region that a
cut separates meet exactly; they are joined by a union per class, which also drops the
edges along the cut, and lose the vertices the cut left on straight edges (``simplify`` with
tolerance 0): the polygons GDAL's polygoniser gives for the whole raster, up to where their
rings start. Pixel corners are then mapped with GDAL's own arithmetic, so every vertex has
the coordinates GDAL would give it, to the bit.

Tracing a class raster in two halves on two threads (GDAL's polygoniser releases the GIL, as
do shapely's array functions) halves the longest step at the end of a run on a machine with
two cores or more (:func:`trace_halves`).
"""

from __future__ import annotations

import numpy as np


def to_map(pixel_geoms: np.ndarray, t) -> np.ndarray:
    """Geometries in pixel coordinates mapped by the Affine ``t`` as GDAL's polygoniser maps
    vertices: (x0 + col * dx) + row * rx, in this order."""
    import shapely

    return shapely.transform(pixel_geoms, lambda p: np.column_stack(
        [t.c + p[:, 0] * t.a + p[:, 1] * t.b, t.f + p[:, 0] * t.d + p[:, 1] * t.e]))


def join(codes: np.ndarray, geoms: np.ndarray, border: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, polygons): the pieces where ``border`` is false as they are, the others (pieces
    that reach a cut) united with the pieces of their class they touch. Pixel coordinates."""
    import shapely

    if not border.any():
        return codes, geoms
    merged_codes, merged = [], []
    cut_codes, cut = codes[border], geoms[border]
    for code in np.unique(cut_codes):
        parts = shapely.get_parts(shapely.union_all(cut[cut_codes == code]))
        merged_codes.append(np.full(len(parts), code, np.int64))
        merged.append(parts)
    joined = shapely.simplify(np.concatenate(merged), 0)
    return np.concatenate([codes[~border], *merged_codes]), np.concatenate([geoms[~border], joined])


def trace_halves(trace, halves: list[tuple[object, int]], height: int, t
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, polygons, WKB) of a raster held in two row ranges ``halves`` = [(source, first
    row), ...], each traced by ``trace(source)`` -> (codes, WKB in the source's own pixel
    coordinates) on a thread of its own; polygons are mapped by the Affine ``t``."""
    from concurrent.futures import ThreadPoolExecutor

    import shapely

    (first, _), (second, cut) = halves

    def half(source, top: int):
        codes, wkb = trace(source)
        geoms = shapely.from_wkb(wkb)
        if top:
            geoms = shapely.transform(geoms, lambda p: p + np.array([0.0, top]))  # exact: whole numbers
        bounds = shapely.bounds(geoms)
        border = bounds[:, 3] == cut if top == 0 else bounds[:, 1] == cut
        if cut >= height:
            border[:] = False
        # what reaches no cut is final: mapped and encoded here, on this half's thread
        inner = to_map(geoms[~border], t)
        return codes[~border], inner, shapely.to_wkb(inner), codes[border], geoms[border]

    with ThreadPoolExecutor(2, thread_name_prefix="geodino-trace") as pool:
        done = [job.result() for job in [pool.submit(half, first, 0), pool.submit(half, second, cut)]]
    edge_codes = np.concatenate([d[3] for d in done])
    joined_codes, joined = join(edge_codes, np.concatenate([d[4] for d in done]), np.ones(len(edge_codes), bool))
    joined = to_map(joined, t)
    return (np.concatenate([done[0][0], done[1][0], joined_codes]),
            np.concatenate([done[0][1], done[1][1], joined]),
            np.concatenate([done[0][2], done[1][2], shapely.to_wkb(joined)]))


__all__ = ["join", "to_map", "trace_halves"]
