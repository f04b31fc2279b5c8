"""The per-window model: frozen backbone + heads, as one picklable callable for the stitcher.

A :class:`ModelBundle` holds only paths and options; models are loaded on first use in each
process and cached, so the bundle can travel to dask.distributed workers. Inference is
serialised per process by a lock: the model uses every core (or the GPU) itself, while the
scheduler's other threads read, normalise, blend and write around it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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

    @functools.cached_property
    def token(self) -> str:
        """Identifies the models by their options and files (size, mtime); computed once."""
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
        # a hub or folder canopy model loads first, so that its own message (and flag) comes first
        meta_head = bool(self.canopy_model) and Path(self.canopy_model).is_file()
        chm_model = None
        if self.canopy_model and not meta_head:
            from geodino.backbone import pick_device

            chm_model = load_chmv2(self.canopy_model, pick_device(self.device))
        backbone = load_backbone(self.backbone, self.device, layers=self.layers, family=self.family,
                                 compile=self.compile)
        heads = {}
        for task, path in (("canopy", self.canopy_head), ("landcover", self.landcover_head)):
            if path:
                heads[task] = load_head(path, backbone=backbone).to(backbone.device)
        chm = None
        if self.canopy_model:
            if meta_head:
                chm_model = load_chmv2(self.canopy_model, backbone.device, self.backbone)
            chm = CanopyModel(chm_model, backbone.info.family,
                              CHMV2_CUDA_PRECISION if backbone.device.type == "cuda" else "float32")
        return backbone, heads, chm

    def outputs(self) -> dict[str, OutputSpec]:
        backbone, heads, chm = self.load()
        out: dict[str, OutputSpec] = {}
        if "canopy" in heads or chm is not None:
            out["canopy_height"] = OutputSpec(1, 1, ("canopy height",))
        if "landcover" in heads:
            classes = heads["landcover"].classes
            scale = _landcover_scale(backbone)
            out["landcover"] = OutputSpec(len(classes), scale, tuple(classes.names), upsample=scale > 1)
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
            amp = torch.autocast(backbone.device.type, dtype=torch.bfloat16,
                                 enabled=backbone.device.type == "cuda")
            with amp:
                if "canopy" in heads:
                    result["canopy_height"] = heads["canopy"](feats.layers, size).float()
                elif chm is not None:
                    result["canopy_height"] = run_chmv2(chm, x.to(backbone.device), size)
                if "landcover" in heads:
                    if want["landcover"].upsample:  # blended on the patch grid, upsampled per block
                        result["landcover"] = heads["landcover"].patch_logits(feats.layers).float()
                    else:
                        result["landcover"] = heads["landcover"](feats.layers, size).float()
            if "embeddings" in want:
                result["embeddings"] = feats.patches
            return {k: v.float().cpu().numpy() for k, v in result.items()}


def _landcover_scale(backbone) -> int:
    """Grid of land-cover logits: the patch grid (16) where windows start on it, else pixels (1).

    Land-cover heads are linear on the patch grid, so their logits are blended there and
    upsampled once per output block (:class:`geodino.stitch.OutputSpec`); upsampling every
    window's logits to full resolution first made and moved 16^2 times more data. A backbone
    whose output stride is not the window grid's (ConvNeXt, 32) is upsampled per window.
    """
    from geodino.tiling import PATCH

    return PATCH if backbone.patch_size == PATCH else 1


def load_chmv2(name: str, device, backbone: str | None = None):
    """Meta's canopy-height model (SAT ViT-L + DPT head) as a transformers CHMv2ForDepthEstimation.

    ``name``: a transformers folder, the hub id, or Meta's CHMv2 head ``.pth``; the latter
    needs the SAT ViT-L as ``backbone`` (Meta's ``.pth`` or a transformers folder).
    """
    from transformers import CHMv2ForDepthEstimation
    from transformers.utils import logging as hf_logging

    from geodino.checkpoints import CHMV2_FILES, chmv2_from_meta
    from geodino.errors import ModelError
    from geodino.hub import load_from_hub

    hf_logging.disable_progress_bar()
    path = Path(name).expanduser()
    if path.is_file():
        if not backbone:
            raise ModelError(f"{name}: a CHMv2 head checkpoint needs its backbone; geodino needs {CHMV2_FILES}")
        from geodino.backbone import load_backbone

        model = chmv2_from_meta(path, load_backbone(backbone, "cpu").model)
    else:
        def load(offline: bool):
            return CHMv2ForDepthEstimation.from_pretrained(str(path) if path.exists() else name,
                                                           local_files_only=offline)

        if path.exists():
            try:
                model = load(True)
            except (OSError, ValueError) as e:
                raise ModelError(f"{name}: cannot load the canopy model folder ({str(e).splitlines()[0]}); "
                                 f"geodino needs {CHMV2_FILES}") from None
        elif "/" in name and not name.startswith((".", "/")):
            model = load_from_hub(name, load, flag="canopy-model", what="canopy model")
        else:
            raise ModelError(f"{name}: no such file or folder, and not a hub id; geodino needs {CHMV2_FILES}")
    if getattr(model.config, "model_type", "") != "chmv2":
        raise ModelError(f"{name} is not a CHMv2 canopy model (model_type {model.config.model_type!r})")
    model.to(device).eval().requires_grad_(False)
    return model


@dataclass
class CanopyModel:
    """A loaded CHMv2 with what it needs to see its own input normalisation.

    The window arrives standardised with the backbone family's statistics (``input_family``);
    CHMv2 was trained with its own mean and std, so the input is re-standardised exactly
    (both are affine in the [0, 1] value) before the model runs.
    """

    model: torch.nn.Module
    input_family: str = "sat"
    precision: str = "float32"  # on CUDA: chosen by measurement, see CHMV2_CUDA_PRECISION

    def restandardise(self, x: torch.Tensor) -> torch.Tensor:
        from geodino.sensor import CHMV2_STATS, FAMILY_STATS

        (m0, s0), (m1, s1) = FAMILY_STATS[self.input_family], CHMV2_STATS
        scale = torch.tensor([a / b for a, b in zip(s0, s1)], dtype=torch.float32, device=x.device)[:, None, None]
        shift = torch.tensor([(a - b) / c for a, b, c in zip(m0, m1, s1)], dtype=torch.float32,
                             device=x.device)[:, None, None]
        return x.float() * scale + shift


# CHMv2 on CUDA runs in float32: measured on a random-weight CHMv2 under CPU bf16 autocast
# (bench/chmv2_precision.py), heights differ from fp32 by a median ~1e-2 relative and up to
# metres at the tallest pixels, well above the 1e-5 that fp32 keeps (see BENCHMARKS.md).
CHMV2_CUDA_PRECISION = "float32"


def run_chmv2(model, x: torch.Tensor, size) -> torch.Tensor:
    """Canopy height (B, 1, H, W) in metres from a CHMv2 model (or a :class:`CanopyModel`)."""
    import torch.nn.functional as F

    if isinstance(model, CanopyModel):
        x = model.restandardise(x)
        bf16 = model.precision == "bfloat16" and x.device.type == "cuda"
        model = model.model
    else:
        bf16 = False
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(pixel_values=x.float()).predicted_depth
    if out.ndim == 3:
        out = out[:, None]
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
    return out.float().clamp_min(0)


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
