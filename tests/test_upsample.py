from __future__ import annotations

import numpy as np
import pytest
import torch

from geodino.upsample import interpolate_block


@pytest.mark.parametrize("scale", [14, 16, 12])
def test_a_pixel_interpolates_to_the_same_bits_from_any_region(scale):
    """DESIGN invariant 2 for upsampled outputs: a block's pixels do not depend on where the
    region it was cut from begins. torch counts positions from the region's origin, exact for
    power-of-two strides only; a 14-pixel stride gave values up to 7e-6 apart between chunkings."""
    rng = np.random.default_rng(scale)
    acc = rng.standard_normal((3, 60, 60)).astype(np.float32)
    wsum = (rng.random((60, 60)) + 0.5).astype(np.float32)
    full = interpolate_block(acc, wsum, scale, (0, 0), (0, 0), (60 * scale, 60 * scale))
    torch_full = torch.nn.functional.interpolate(torch.from_numpy(np.concatenate([acc, wsum[None]])[None]),
                                                 scale_factor=scale, mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(full, torch_full.numpy(), atol=1e-4)  # the same interpolation
    cuts = 0
    for r0 in range(3 * scale, 60 * scale - 300, 173):
        for c0 in range(5 * scale, 60 * scale - 300, 191):
            pr0, pc0 = r0 // scale - 2, c0 // scale - 2
            block = interpolate_block(acc[:, pr0:, pc0:], wsum[pr0:, pc0:], scale, (pr0, pc0), (r0, c0), (200, 200))
            np.testing.assert_array_equal(block, full[:, r0:r0 + 200, c0:c0 + 200])
            cuts += 1
    assert cuts >= 4
