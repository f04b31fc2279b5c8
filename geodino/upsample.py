"""Full-resolution blocks of outputs blended on the patch grid: float values and class codes.

An upsampled output (e.g. land-cover logits) is blended on the patch grid; each
full-resolution block interpolates the blended sums and weights of the coarse pixels around
it and divides (:func:`assemble_upsampled`). When the output is a class map, one task per
block makes the codes directly (:func:`assemble_codes`): the interpolation stops at the
block's end, the division is fused with the running maximum (one channel's quotients at a
time, never the float block) and the argmax uses no masked stores. Same quotients, same
comparisons: the same codes, bit for bit, as the argmax of :func:`assemble_upsampled`'s block.

Tried first and dropped (commit a54a177 on the lccodes branch): filling the 16 x 16 cells
whose 4 corner nodes agree on a class with a rounding-safe margin and interpolating only the
border cells (in strips, torch's generic kernel). Bit-identical, but the bench's map has
class borders in ~47% of cells and gathering nodes and pixels for the strips cost more than
the interpolation it saved: no faster on the bench, nor on a map with blobs 4x as wide.
"""

from __future__ import annotations

import numpy as np

from geodino.stitch import _accumulate, _valid_block, coarse_rect
from geodino.timing import stage


def assemble_upsampled(name: str, channels: int, scale: int, coarse_shape: tuple[int, int],
                       r0: int, r1: int, c0: int, c1: int, *batches) -> np.ndarray:
    """Full-resolution block [r0:r1, c0:c1] of an output blended on the grid coarsened by ``scale``.

    The blended sums and weights of the coarse pixels around the block are interpolated
    bilinearly (half-pixel centres, as ``F.interpolate(align_corners=False)``) and divided.
    Each pixel's value depends only on its global position and the coarse values, never on
    where the block starts (the block is cut from an interpolation of a region that starts on
    a coarse pixel, with one coarse pixel of margin), so results do not depend on chunks.
    NaN where no valid input pixel lies.
    """
    with stage("blend"):
        pr0, pr1, pc0, pc1 = coarse_rect(r0, r1, c0, c1, scale, coarse_shape)
        acc, wsum = _accumulate(name, channels, pr0, pr1, pc0, pc1, batches)
        valid = _valid_block(r0, r1, c0, c1, batches)
    return upsample_block(acc, wsum, valid, scale, (pr0, pc0), (r0, c0))


def upsample_block(acc: np.ndarray, wsum: np.ndarray, valid: np.ndarray, scale: int, origin: tuple[int, int],
                   block: tuple[int, int]) -> np.ndarray:
    """Normalised bilinear upsampling of blended sums ``acc`` (C, h, w) and weights ``wsum``.

    ``origin``: the global coarse (row, col) of ``acc[:, 0, 0]``; ``block``: the global
    full-resolution (row, col) where the result starts; ``valid``: its validity and shape.
    """
    channels = acc.shape[0]
    with stage("upsample"):
        up = interpolate_block(acc, wsum, scale, origin, block, valid.shape)
        # one pass from the interpolated region into the block; dividing everywhere and
        # then blanking is half the cost of a masked divide (same values)
        out = np.empty((channels,) + valid.shape, np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(up[:channels], up[channels], out=out)
        if not valid.all():
            out[:, ~valid] = np.nan
        return out


def interpolate_block(acc: np.ndarray, wsum: np.ndarray, scale: int, origin: tuple[int, int],
                      block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(C + 1, h, w) view: sums and weight bilinearly interpolated over the block (not divided).

    As ``F.interpolate(scale_factor=scale, align_corners=False)`` of the region, whose output
    the block is cut from; torch's operator is called with that scale but an output that
    stops at the block's end (the rows and columns after it are not computed). Each pixel's
    source position and weights come from its offset and the scale alone, and torch's
    generic kernel (output height + width > 128, input not channels-last) computes a pixel
    from those alone, so the values are the same bits; a region whose cut output would fall
    under that threshold is interpolated whole, as before.
    """
    import torch

    if scale & (scale - 1):
        return _interpolate_global(acc, wsum, scale, origin, block, shape)
    (pr0, pc0), (r0, c0), (h, w) = origin, block, shape
    top, left = r0 - pr0 * scale, c0 - pc0 * scale
    size = [top + h, left + w]
    if sum(size) <= 128:
        size = [acc.shape[1] * scale, acc.shape[2] * scale]
    # contiguous (C, h, w) memory: torch's generic kernel, the one blocks have always used
    stack = torch.from_numpy(np.concatenate([acc, wsum[None]])[None])
    up = torch.ops.aten.upsample_bilinear2d(stack, size, False, float(scale), float(scale))[0]
    return up.numpy()[:, top:top + h, left:left + w]


def _axis(start: int, n: int, scale: int, origin: int, size: int):
    """Source rows (or columns) and weights of full-resolution pixels start..start+n, from
    their global position: (g + 0.5) / scale - 0.5 in float64, clamped at the grid's start;
    indexes relative to the region that begins at coarse ``origin`` and has ``size`` pixels."""
    src = np.maximum((np.arange(start, start + n, dtype=np.float64) + 0.5) / scale - 0.5, 0.0)
    first = np.floor(src)
    weight = (src - first).astype(np.float32)
    i0 = first.astype(np.int64) - origin
    return np.minimum(i0, size - 1), np.minimum(i0 + 1, size - 1), weight


def _interpolate_global(acc: np.ndarray, wsum: np.ndarray, scale: int, origin: tuple[int, int],
                        block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation (``align_corners=False``) for a scale that is not a power of two.

    torch places a pixel at ``(local + 0.5) * (1 / scale) - 0.5``, counted from the region's
    origin; with 1/14 inexact, the same pixel cut from two regions (two chunkings) got
    weights a few ulps apart (up to 7e-6 apart in value, enough to flip a near-tied class).
    Here positions come from global pixel indexes, so a pixel's value depends on nothing but
    the coarse values around it. Rows, then columns, in float32. Written here because torch
    and scipy both compute positions relative to their input. Powers of two (every released
    DINOv3 stride: 16 and 32) are exact in torch and keep its kernel.
    """
    (pr0, pc0), (r0, c0), (h, w) = origin, block, shape
    stack = np.concatenate([acc, wsum[None]])
    y0, y1, ly = _axis(r0, h, scale, pr0, stack.shape[1])
    x0, x1, lx = _axis(c0, w, scale, pc0, stack.shape[2])
    rows = stack[:, y0] * (np.float32(1) - ly)[:, None] + stack[:, y1] * ly[:, None]
    return rows[:, :, x0] * (np.float32(1) - lx) + rows[:, :, x1] * lx


def argmax_codes(logits: np.ndarray, codes: np.ndarray, nodata: int, weight: np.ndarray | None = None,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Class codes of the largest logit (the first on ties); ``nodata`` where any logit is NaN
    (or where ``valid`` is False).

    ``logits``: (C, ...) float. With ``weight``, the logits are ``logits / weight`` (float32
    division, as :func:`geodino.stitch.upsample_block` divides), made one channel at a time.
    Written with whole-array arithmetic, no masked stores (``a[mask] = k`` costs up to 40x a
    comparison on scattered masks; on the bench's blocks this argmax took 0.67 ms instead of
    0.9): channel ``k`` is only compared after the channels below it, so "the index becomes
    k where k is larger" is ``best = max(best, k * larger)``; nodata is index C of the table.
    """
    channels = logits.shape[0]
    table = np.append(np.asarray(codes, np.uint8), np.uint8(nodata))
    best = np.zeros(logits.shape[1:], np.uint8)
    step = np.empty(logits.shape[1:], np.uint8)
    larger = np.empty(logits.shape[1:], bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        top = logits[0].copy() if weight is None else np.divide(logits[0], weight, dtype=np.float32)
        value = None if weight is None else np.empty_like(top)
        for k in range(1, channels):  # a running maximum reads each band once
            value = logits[k] if weight is None else np.divide(logits[k], weight, out=value)
            np.greater(value, top, out=larger)  # False against NaN, either side
            np.maximum(best, np.multiply(larger, np.uint8(k), out=step), out=best)
            np.maximum(top, value, out=top)  # NaN, once any band is NaN
    bad = np.isnan(top, out=larger)
    if valid is not None:
        bad |= ~valid
    np.maximum(best, np.multiply(bad, np.uint8(channels), out=step), out=best)
    return np.take(table, best)


def assemble_codes(name: str, channels: int, scale: int, coarse_shape: tuple[int, int], codes: np.ndarray,
                   nodata: int, r0: int, r1: int, c0: int, c1: int, *batches) -> np.ndarray:
    """(1, h, w) uint8 codes of block [r0:r1, c0:c1]: :func:`argmax_codes` of the block of
    :func:`geodino.stitch.assemble_upsampled`, without making that block."""
    with stage("blend"):
        pr0, pr1, pc0, pc1 = coarse_rect(r0, r1, c0, c1, scale, coarse_shape)
        acc, wsum = _accumulate(name, channels, pr0, pr1, pc0, pc1, batches)
        valid = _valid_block(r0, r1, c0, c1, batches)
    with stage("upsample"):
        up = interpolate_block(acc, wsum, scale, (pr0, pc0), (r0, c0), valid.shape)
    with stage("argmax"):
        return argmax_codes(up[:channels], codes, nodata, weight=up[channels], valid=valid)[None]
