"""An instant stand-in for the model: the pipeline's own ceiling (not part of the package).

``InstantBundle`` is a :class:`geodino.predict.ModelBundle` (same outputs, same loading of
the demo model's heads to learn their shapes) whose call returns precomputed arrays instead
of running the network. The arrays are not constant: they hold a smooth random pattern (land
cover as blobs of several classes), so compression, class argmax and polygons see maps that
look like real ones. ``constant=True`` returns flat arrays instead (the issue's first figure).
Importable on dask.distributed workers when bench/ is on their PYTHONPATH.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from geodino.predict import ModelBundle

_PATTERNS: dict = {}
_LOCK = threading.Lock()


def _smooth(rng, shape, cells: int) -> np.ndarray:
    """Bilinearly upsampled random field: blobs ``shape[-1] / cells`` pixels wide."""
    *lead, h, w = shape
    coarse = rng.standard_normal((*lead, cells + 1, cells + 1)).astype(np.float32)
    y = np.linspace(0, cells, h, dtype=np.float32)
    x = np.linspace(0, cells, w, dtype=np.float32)
    y0, x0 = np.minimum(y.astype(int), cells - 1), np.minimum(x.astype(int), cells - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    a = coarse[..., y0, :][..., :, x0]
    b = coarse[..., y0, :][..., :, x0 + 1]
    c = coarse[..., y0 + 1, :][..., :, x0]
    d = coarse[..., y0 + 1, :][..., :, x0 + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx).astype(np.float32)


@dataclass(frozen=True)
class InstantBundle(ModelBundle):
    constant: bool = False

    def _pattern(self, batch: int, size: int) -> dict[str, np.ndarray]:
        key = (self.token, self.constant, batch, size)
        with _LOCK:
            if key not in _PATTERNS:
                rng = np.random.default_rng(0)
                out = {}
                for name, spec in self.outputs().items():
                    s = size // spec.scale
                    shape = (batch, spec.channels, s, s)
                    if self.constant:
                        arr = np.full(shape, 0.5, np.float32)
                        if name == "landcover":
                            arr[:, 1] = 2.0
                    else:
                        arr = _smooth(rng, shape, cells=8) * 3.0
                        if name == "canopy_height":
                            arr = np.maximum(arr * 5 + 8, 0)
                    out[name] = np.ascontiguousarray(arr, np.float32)
                _PATTERNS[key] = out
            return _PATTERNS[key]

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        b, _, size, _ = inputs.shape
        return {k: v[:b] for k, v in self._pattern(b, size).items()}
