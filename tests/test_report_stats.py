"""Report statistics accumulated from written blocks: the same histogram as one pass over all values."""

from __future__ import annotations

import numpy as np

from geodino.report import ClassCounts, HeightStats


def test_height_stats_bins_tenths_of_metres_block_by_block():
    rng = np.random.default_rng(0)
    blocks = [(rng.normal(15, 20, (1, 64, 80))).astype(np.float32) for _ in range(5)]  # negatives, > 100 m
    blocks[1][0, :5] = np.nan
    blocks[2][0, 3, 3] = np.inf  # not finite: not a height
    blocks[3][:] = np.nan  # a block without any height
    blocks[4][0, 0, :3] = (0.0, 99.95, 1e30)  # a valid 0 m, the top bin's edge, absurdly tall
    stats = HeightStats()
    for b in blocks:
        stats.update(b)
    values = np.concatenate([b.ravel() for b in blocks])
    values = values[np.isfinite(values)]
    expected = np.zeros(1000, np.int64)
    for v in values:  # one value at a time: tenths of a metre, truncated, into bins 0..999
        expected[min(max(int(np.float32(v) * np.float32(10)), 0), 999)] += 1
    np.testing.assert_array_equal(stats.hist, expected)
    assert stats.n == values.size and stats.hist[999] >= 1
    assert abs(stats.total - values.astype(np.float64).sum()) < 1e-6 * abs(values.astype(np.float64)).sum()
    assert stats.peak == float(values.max())


def test_class_counts():
    counts = ClassCounts()
    counts.update(np.array([[[10, 10, 20], [255, 0, 10]]], np.uint8))
    assert counts.counts[10] == 3 and counts.counts[20] == 1 and counts.counts[255] == 1 and counts.counts.sum() == 6
