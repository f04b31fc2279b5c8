"""The per-window model: frozen backbone + heads, as one picklable callable for the stitcher.

A :class:`ModelBundle` holds only paths and options; models are loaded on first use in each
process and cached, so the bundle can travel to dask.distributed workers. Inference is
serialised per process by a lock: the model uses every core (or the GPU) itself, while the
scheduler's other threads read, normalise, blend and write around it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodino.precision import head_autocast
from geodino.stitch import OutputSpec

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_INFER_LOCK = threading.Lock()


def _stamp(path: str | None) -> str:
    if not path:
        return ""
    p = Path(path)
    if p.exists():
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())
    return str(path)


@dataclass(frozen=True)
class ModelBundle:
    backbone: str
    device: str = "cpu"
    canopy_head: str | None = None
    landcover_head: str | None = None
    canopy_model: str | None = None  # transformers CHMv2ForDepthEstimation (folder or hub id)
    embeddings: bool = False
    landcover_probabilities: bool = True
    compile: bool = False
    family: str | None = None
    layers: tuple[int, ...] | None = None
    precision: str | None = None  # fp32 | bf16 | int8; None: the device default

    @property
    def token(self) -> str:
        parts = [repr(self)] + [_stamp(p) for p in (self.backbone, self.canopy_head, self.landcover_head,
                                                    self.canopy_model)]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()

    def load(self):
        """(backbone, {task: head}, chm_model) for this process, loaded once."""
        key = self.token
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = self._load()
            return _CACHE[key]

    def _load(self):
        from geodino.backbone import load_backbone
        from geodino.heads import load_head

        # The same number of CPU threads in every process (dask.distributed workers start with
        # OMP_NUM_THREADS=1): float reductions then split the same way, so a cluster run gives
        # the same bytes as a local one.
        if self.device in (None, "auto") or torch.device(self.device).type == "cpu":
            torch.set_num_threads(int(os.environ.get("GEODINO_TORCH_THREADS", os.cpu_count() or 1)))
        backbone = load_backbone(self.backbone, self.device, layers=self.layers, family=self.family,
                                 compile=self.compile, precision=self.precision)
        heads = {}
        for task, path in (("canopy", self.canopy_head), ("landcover", self.landcover_head)):
            if path:
                heads[task] = load_head(path, backbone=backbone).to(backbone.device)
        chm = load_chmv2(self.canopy_model, backbone.device) if self.canopy_model else None
        return backbone, heads, chm

    def outputs(self) -> dict[str, OutputSpec]:
        backbone, heads, chm = self.load()
        out: dict[str, OutputSpec] = {}
        if "canopy" in heads or chm is not None:
            out["canopy_height"] = OutputSpec(1, 1, ("canopy height",))
        if "landcover" in heads:
            classes = heads["landcover"].classes
            out["landcover"] = OutputSpec(len(classes), 1, tuple(classes.names))
        if self.embeddings:
            d = backbone.embed_dim
            out["embeddings"] = OutputSpec(d, backbone.patch_size, tuple(f"embedding {i}" for i in range(d)))
        return out

    @property
    def patch_size(self) -> int:
        return self.load()[0].patch_size

    @property
    def family_name(self) -> str:
        return self.load()[0].info.family

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        backbone, heads, chm = self.load()
        want = self.outputs()
        x = torch.from_numpy(inputs)
        if backbone.device.type == "cuda":
            x = x.pin_memory()
        size = tuple(inputs.shape[-2:])
        result: dict[str, np.ndarray] = {}
        with _INFER_LOCK, torch.inference_mode():
            feats = backbone(x)
            with head_autocast(backbone):
                if "canopy" in heads:
                    result["canopy_height"] = heads["canopy"](feats.layers, size).float()
                elif chm is not None:
                    result["canopy_height"] = run_chmv2(chm, x.to(backbone.device), size)
                if "landcover" in heads:
                    logits = heads["landcover"](feats.layers, size).float()
                    result["landcover"] = torch.softmax(logits, dim=1)
            if "embeddings" in want:
                result["embeddings"] = feats.patches
            return {k: v.float().cpu().numpy() for k, v in result.items()}


def load_chmv2(name: str, device):
    """Meta's canopy-height model (SAT ViT-L + DPT head) through transformers."""
    from transformers import CHMv2ForDepthEstimation

    from geodino.errors import ModelError

    local = Path(name).exists()
    try:
        model = CHMv2ForDepthEstimation.from_pretrained(name, local_files_only=True if local else None)
    except (OSError, ValueError) as e:
        from geodino.backbone import GATED_HELP

        raise ModelError(f"cannot load canopy model {name} ({str(e).splitlines()[0]}). "
                         + GATED_HELP.format(hub_id=name, short=name.split('/')[-1])) from None
    model.to(device).eval().requires_grad_(False)
    return model


def run_chmv2(model, x: torch.Tensor, size) -> torch.Tensor:
    """Canopy height (B, 1, H, W) in metres from a CHMv2 model."""
    import torch.nn.functional as F

    out = model(pixel_values=x).predicted_depth
    if out.ndim == 3:
        out = out[:, None]
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
    return out.clamp_min(0)


def auto_batch_size(bundle: ModelBundle, window: int, fraction: float = 0.6) -> int:
    """Windows per model call that fit in ``fraction`` of the free GPU memory (8 on a CPU).

    Per window (bf16): the hidden states of every block are kept (intermediate layers),
    plus the MLP expansion and the heads' full-resolution outputs.
    """
    backbone, heads, chm = bundle.load()
    if backbone.device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(backbone.device)
    tokens = (window // backbone.patch_size) ** 2 + 5
    per_window = tokens * backbone.embed_dim * 2 * (backbone.info.depth + 1 + 8)
    per_window += window * window * 4 * (16 + sum(len(getattr(h, "classes", ())) or 1 for h in heads.values()))
    if chm is not None:
        per_window *= 3  # the DPT decoder's multi-scale maps
    return int(max(1, min(256, free * fraction // per_window)))
