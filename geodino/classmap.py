"""Land-cover class codes of an upsampled output, made in the task that interpolates it.

Before, each full-resolution block of blended logits was interpolated, divided into a
(C, h, w) float block (NaN where invalid), and a second dask task took its argmax. Here one
task does both (:func:`assemble_codes`): the interpolation stops at the block's end, the
division is fused with the running maximum (one channel's quotients at a time, never the
float block), and the argmax uses no masked stores. Same quotients, same comparisons, so the
same codes bit for bit; the probabilities output still gets the float block.

Tried first and dropped (commit a54a177 on the lccodes branch): filling the 16 x 16 cells
whose 4 corner nodes agree on a class with a rounding-safe margin and interpolating only the
border cells (in strips, torch's generic kernel). Bit-identical, but the bench's map has
class borders in ~47% of cells and gathering nodes and pixels for the strips cost more than
the interpolation it saved: no faster on the bench, nor on a map with blobs 4x as wide.
"""

from __future__ import annotations

import numpy as np

from geodino.stitch import _accumulate, _valid_block, coarse_rect, interpolate_block
from geodino.timing import stage


def argmax_codes(logits: np.ndarray, codes: np.ndarray, nodata: int, weight: np.ndarray | None = None,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Class codes of the largest logit (the first on ties); ``nodata`` where any logit is NaN
    (or where ``valid`` is False).

    ``logits``: (C, ...) float. With ``weight``, the logits are ``logits / weight`` (float32
    division, as :func:`geodino.stitch.upsample_block` divides), made one channel at a time.
    Written with whole-array arithmetic, no masked stores (numpy's ``a[mask] = k`` cost 40x a
    comparison, measured): channel ``k`` is only ever compared after channels below it, so
    "the index becomes k where k is larger" is ``best = max(best, k * larger)``, and nodata
    is index C of the code table.
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
