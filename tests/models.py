"""Picklable per-window predictors for stitching tests (they travel to dask workers)."""

from __future__ import annotations

import numpy as np
import torch


class PatchLinear:
    """Tiny DINOv3 + a fixed random linear map of the patch grid, upsampled to pixels.

    Position-dependent (RoPE, attention across the window), so stitching errors show.
    """

    token = "patch-linear"

    def __init__(self, backbone_dir: str, channels: int = 2, seed: int = 0) -> None:
        self.backbone_dir = backbone_dir
        self.channels = channels
        self.seed = seed
        self._state = None

    def __getstate__(self):
        return {"backbone_dir": self.backbone_dir, "channels": self.channels, "seed": self.seed, "_state": None}

    def _load(self):
        if self._state is None:
            from geodino.backbone import load_backbone

            bb = load_backbone(self.backbone_dir)
            g = torch.Generator().manual_seed(self.seed)
            w = torch.randn(self.channels, bb.embed_dim, generator=g) / bb.embed_dim ** 0.5
            self._state = (bb, w)
        return self._state

    def __call__(self, inputs: np.ndarray) -> dict:
        bb, w = self._load()
        with torch.inference_mode():
            grid = bb(torch.from_numpy(inputs)).patches
            y = torch.einsum("cd,bdhw->bchw", w, grid)
            y = torch.nn.functional.interpolate(y, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        return {"value": y.numpy(), "patch": grid.numpy()}


class CountingFailure:
    """Fails on the n-th call: an interrupted run."""

    token = "failing"

    def __init__(self, inner, fail_at: int) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise KeyboardInterrupt("simulated interrupt")
        return self.inner(inputs)
