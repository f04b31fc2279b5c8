"""Class codes of an upsampled output straight from its blended patch grid.

:func:`geodino.stitch.assemble_upsampled` interpolates every channel's blended sums and
the blended weights to full resolution (``F.interpolate(bilinear, align_corners=False)``)
and divides; :func:`argmax_codes` then keeps the largest channel. When only the codes are
wanted, most of that work decides nothing: away from class borders every pixel takes the
class of the coarse nodes around it. :func:`assemble_codes` gives the same codes, bit for
bit, while interpolating only the cells where the nodes do not settle it.

Cells. A full-resolution row ``r`` is interpolated from coarse rows ``h0(r)`` and
``h0(r) + 1`` (torch's ``floor(max(0, (r + 0.5) / s - 0.5))``, the last row clamped to
itself); the same for columns. Pixels sharing (h0, w0) form a cell, whose value at a pixel
is ``x_k = sum_i a_i s_ik`` over its 4 corner nodes (blended sums ``s``, weights ``W`` as
channel ``C``), with coefficients ``a_i >= 0``, ``sum a_i = 1``, the same for every channel,
and the output is ``fl(x_k / x_W)``.

Why a sure cell needs no interpolation. A node is *sure* of class ``c`` when its values are
finite, ``2^-30 <= W <= 2^30``, ``|s_k| <= 2^60``, and for every ``k != c``
``s_c - s_k > delta (|s_c| + |s_k|) + tau W`` (``delta = 2^-16``, ``tau = 2^-40``; tested in
float64 with twice these, which covers the test's own rounding). When the 4 corners of a cell
are sure of the same ``c``, summing with weights ``a_i`` gives, exactly,
``X_c - X_k > delta E + tau X_W`` with ``E = sum a_i (|s_ic| + |s_ik|)``. However torch orders
and fuses the bilinear sum, each term sees at most a few roundings (say 8): the computed
``x_k`` is within ``gamma_8 E_k + 2^-146`` of ``X_k`` (``gamma_8 ~ 8u``, ``u = 2^-24``; the
absolute part covers underflow), so ``x_c - x_k > (delta - 2 gamma_8) E + tau X_W - 2^-145``,
and ``x_W >= X_W / 2 >= 2^-32 > 0``. Rounded division keeps ``fl(x_c / w) > fl(x_k / w)``
whenever ``x_c - x_k > u (|x_c| + |x_k|) + 2^-149 w``, which holds with a wide margin
(``delta`` is ~8000 u). So channel ``c`` is the strict, finite maximum at every pixel of the
cell, and the argmax is ``c`` whatever the tie-breaking. The bounds keep every value finite
and the quotients far from overflow. Validity is the full-resolution validity, as today.

Other cells (class borders, small margins, nodes without weight or with non-finite values)
are interpolated with the same torch kernel on 2 x 2 node patches, one batch per block: the
kernel's arithmetic for a pixel depends only on its 4 nodes and its offset from them (the
property block-wise upsampling already rests on), so those pixels get today's values; edge
rows and columns are padded with a copy of the last node, which is what torch's clamp reads.
"""

from __future__ import annotations

import numpy as np

from geodino.stitch import _accumulate, _valid_block, coarse_rect, upsample_block
from geodino.timing import stage

DELTA, TAU = 2.0 ** -16, 2.0 ** -40
# strips of cells are interpolated only when they cost less than this share of the block's region
# (they also pay for gathering nodes and pixels: at 0.5 the bench's blocks were no faster)
FULL_SHARE = 0.5
W_RANGE, S_MAX = (2.0 ** -30, 2.0 ** 30), 2.0 ** 60


def argmax_codes(logits: np.ndarray, codes: np.ndarray, nodata: int) -> np.ndarray:
    """Class codes of the largest logit (the first on ties); ``nodata`` where any logit is NaN.

    ``logits``: (C, ...) float; the result has the trailing shape, uint8.
    """
    best = np.zeros(logits.shape[1:], np.uint8)
    top = logits[0].copy()
    for k in range(1, logits.shape[0]):  # a running maximum reads each band once
        larger = logits[k] > top
        best[larger] = k
        np.maximum(top, logits[k], out=top)
    out = codes[best]
    out[np.isnan(top)] = nodata
    return out


def sure_nodes(acc: np.ndarray, wsum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each node's leading channel and whether it is sure of it (see the module docstring)."""
    s = acc.astype(np.float64)
    w = wsum.astype(np.float64)
    best = np.argmax(s, axis=0)
    top = np.take_along_axis(s, best[None], 0)
    with np.errstate(invalid="ignore", over="ignore"):
        gap = (top - s) - 2 * DELTA * (np.abs(top) + np.abs(s))
        np.put_along_axis(gap, best[None], np.inf, 0)
        sure = (gap.min(axis=0) > 2 * TAU * w) & (w >= W_RANGE[0]) & (w <= W_RANGE[1])
        sure &= (np.abs(s) <= S_MAX).all(axis=0)  # False for NaN and inf
    return best, sure


def _node_of(start: int, stop: int, scale: int) -> np.ndarray:
    """torch's lower source row ``floor(max(0, (r + 0.5) / scale - 0.5))`` for rows [start, stop)."""
    r = np.arange(start, stop)
    return np.maximum(0, (2 * r + 1 - scale) // (2 * scale))


def _pad_last(a: np.ndarray, rows: bool, cols: bool) -> np.ndarray:
    """Repeat the last row and/or column (axes -2, -1): the node torch's edge clamp reads again."""
    width = [(0, 0)] * (a.ndim - 2) + [(0, int(rows)), (0, int(cols))]
    return np.pad(a, width, mode="edge") if rows or cols else a


def codes_from_nodes(acc: np.ndarray, wsum: np.ndarray, valid: np.ndarray, scale: int, origin: tuple[int, int],
                     at_end: tuple[bool, bool], block: tuple[int, int], codes: np.ndarray, nodata: int
                     ) -> np.ndarray:
    """Codes of a full-resolution block from the blended sums ``acc`` (C, h, w) and weights.

    ``origin``: the global coarse (row, col) of ``acc[:, 0, 0]``; ``at_end``: whether its last
    row / column is the grid's last; ``block``: the block's first global (row, col);
    ``valid``: the block's full-resolution validity (its shape is the block's).
    """
    channels = acc.shape[0]
    (pr0, pc0), (r0, c0), (bh, bw) = origin, block, valid.shape
    settled = None
    if _replicable(channels, scale, acc.shape[1:]):
        with stage("argmax"):
            best, sure = sure_nodes(acc, wsum)
            best, sure = _pad_last(best, *at_end), _pad_last(sure, *at_end)
            # a cell (i, j) is settled when its 4 corners are sure of the same class
            corner = best[:-1, :-1]
            settled = (corner == best[1:, :-1]) & (corner == best[:-1, 1:]) & (corner == best[1:, 1:])
            settled &= sure[:-1, :-1] & sure[1:, :-1] & sure[:-1, 1:] & sure[1:, 1:]
            ri = _node_of(r0, r0 + bh, scale) - pr0  # each row's cell row
            cj = _node_of(c0, c0 + bw, scale) - pc0
    if settled is None or _strip_pixels(~settled[ri[0]:ri[-1] + 1, cj[0]:cj[-1] + 1], scale) > \
            FULL_SHARE * scale * scale * acc.shape[1] * acc.shape[2]:
        # class borders everywhere: interpolating strips of cells would cost more than the block
        up = upsample_block(acc, wsum, valid, scale, origin, block)
        with stage("argmax"):
            return argmax_codes(up, codes, nodata)
    with stage("argmax"):
        cell_codes = np.where(settled, codes[best[:-1, :-1]], nodata).astype(np.uint8)
        out = cell_codes[ri][:, cj]
        todo = ~settled[ri][:, cj]
        todo &= valid
    if todo.any():
        rr, cc = np.nonzero(todo)
        ci, cj_ = ri[rr], cj[cc]
        cells, which = np.unique(ci * settled.shape[1] + cj_, return_inverse=True)
        with stage("upsample"):
            (si, sj), (strip, first) = _strips(*np.divmod(cells, settled.shape[1]), left_edge=pc0 == 0)
            nodes = _pad_last(np.concatenate([acc, wsum[None]]), *at_end)
            x = nodes[:, si[:, None, :] + np.arange(2)[None, :, None], sj[:, None, :]]  # (C + 1, B, 2, L)
            dr = r0 + rr - scale * (pr0 + ci)  # offset of each pixel from its cell's first node
            dc = c0 + cc - scale * (pc0 + cj_) + scale * first[which]  # ... and from its strip's start
            up = _interpolate(x.transpose(1, 0, 2, 3), scale, (int(dr.max()) + 1, int(dc.max()) + 1))
            values = up[strip[which], :, dr, dc]  # (M, C + 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                quotient = values[:, :channels] / values[:, channels:]
        with stage("argmax"):
            out[rr, cc] = argmax_codes(quotient.T, codes, nodata)
    with stage("argmax"):
        out[~valid] = nodata
    return out


def _replicable(channels: int, scale: int, shape: tuple[int, int]) -> bool:
    """Whether interpolating cells alone gives the whole region's values bit for bit.

    torch's generic bilinear kernel computes each pixel from its nodes and weights alone;
    its small-image kernel (output height + width <= 128; with one thread also 3 channels)
    differs, so such regions are left to it. Weights are exact only for power-of-two scales
    (1 / scale * (d + 0.5) rounds otherwise, differently at each offset ``d``).
    """
    return scale & (scale - 1) == 0 and channels + 1 != 3 and scale * (shape[0] + shape[1]) > 128


def _strip_pixels(unsettled: np.ndarray, scale: int) -> int:
    """About how many pixels :func:`_strips` makes torch interpolate for these unsettled cells."""
    runs = int(unsettled[:, 0].sum() + (unsettled[:, 1:] & ~unsettled[:, :-1]).sum())
    return (3 * scale // 2) * scale * (int(unsettled.sum()) + runs)


def _strips(ci: np.ndarray, cj: np.ndarray, left_edge: bool):
    """Lay cells (i, j) (row-major, distinct) out as strips of node columns for one interpolation.

    A run of k cells side by side in a row needs its k + 1 node columns; runs follow each
    other in a strip (the pixels between two runs mix them and are not used). A cell on the
    grid's first column reads the clamped columns left of its first node, so with
    ``left_edge`` each such cell starts a new strip. Returns the (B, L) row and column of
    each strip position's upper node (strips padded with their last one) and, per cell, its
    strip and the position of its first node there.
    """
    n = len(ci)
    start = np.ones(n, bool)
    start[1:] = (ci[1:] != ci[:-1]) | (cj[1:] != cj[:-1] + 1)
    col = np.arange(n) + np.cumsum(start) - 1  # each earlier run added one closing column
    last = np.flatnonzero(np.append(start[1:], True))
    seq_i, seq_j = np.empty(n + len(last), np.int64), np.empty(n + len(last), np.int64)
    seq_i[col], seq_j[col] = ci, cj
    seq_i[col[last] + 1], seq_j[col[last] + 1] = ci[last], cj[last] + 1
    breaks = np.union1d([0], col[(cj == 0) & start]) if left_edge else np.array([0])
    ends = np.append(breaks[1:], len(seq_i))
    strip = np.searchsorted(breaks, col, side="right") - 1
    idx = np.minimum(breaks[:, None] + np.arange(int((ends - breaks).max()))[None, :], ends[:, None] - 1)
    return (seq_i[idx], seq_j[idx]), (strip, col - breaks[strip])


def _interpolate(x: np.ndarray, scale: int, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (N, C, h, w) ``x`` to ``size``, as ``F.interpolate(scale_factor=scale)``.

    F.interpolate calls this operator with the output size ``scale`` times the input's and
    these scales; here the output stops at ``size`` (as far as the cells reach), with the same
    scales, so every pixel's source position and weights are the same. The output is kept
    above torch's threshold for its small-image kernel (height + width <= 128), whose
    arithmetic differs: blocks as interpolated today are larger and use the generic kernel.
    """
    import torch

    size = (size[0], max(size[1], 129 - size[0]))
    x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    return torch.ops.aten.upsample_bilinear2d(x, list(size), False, float(scale), float(scale)).numpy()


def assemble_codes(name: str, channels: int, scale: int, coarse_shape: tuple[int, int], codes: np.ndarray,
                   nodata: int, r0: int, r1: int, c0: int, c1: int, *batches) -> np.ndarray:
    """(1, h, w) uint8 class codes of block [r0:r1, c0:c1]: the same as :func:`argmax_codes` of
    :func:`geodino.stitch.assemble_upsampled`'s block, without interpolating settled cells."""
    with stage("blend"):
        pr0, pr1, pc0, pc1 = coarse_rect(r0, r1, c0, c1, scale, coarse_shape)
        acc, wsum = _accumulate(name, channels, pr0, pr1, pc0, pc1, batches)
        valid = _valid_block(r0, r1, c0, c1, batches)
    at_end = (pr1 == coarse_shape[0], pc1 == coarse_shape[1])
    return codes_from_nodes(acc, wsum, valid, scale, (pr0, pc0), at_end, (r0, c0), codes, nodata)[None]
