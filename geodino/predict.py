"""The per-window model: frozen backbone + heads, as one picklable callable for the stitcher.

A :class:`ModelBundle` holds only paths and options; models are loaded on first use in each
process and cached, so the bundle can travel to dask.distributed workers. Inference is
serialised per process by a lock: the model uses every core (or the GPU) itself, while the
scheduler's other threads read, normalise, blend and write around it. On CUDA the lock
covers only queueing the device work (upload from a reused pinned slot, model, download into
pinned memory, see :mod:`geodino.feed`); each thread then waits for its own batch outside
it, so the next batch is queued while this one's copies run, and host-side copies never
hold the GPU up. Batch sizes are bounded by :mod:`geodino.batchsize`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodino.batchsize import batch_size_for, index_limit, model_cost
from geodino.feed import BatchSlot, SlotPool, pool_for
from geodino.stitch import OutputSpec

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_INFER_LOCK = threading.Lock()
_AUTO_BATCH: dict = {}


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
    # windows per model call (set by the pipeline); not part of the token: same models
    batch_size: int | None = dataclasses.field(default=None, repr=False, compare=False)

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
                                 compile=self.compile, precision=self.precision)
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

    def with_batch_size(self, batch_size: int) -> ModelBundle:
        """This bundle, told the batch size the stitcher uses (a compiled model pads to it)."""
        return dataclasses.replace(self, batch_size=int(batch_size))

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Predictions for a batch of normalised windows (N, C, S, S), as float32 numpy arrays.

        Calls take at most :meth:`call_size` windows (larger inputs are split), so no
        intermediate tensor exceeds what GPU kernels index. A compiled model always gets
        exactly that many (short batches are padded, results sliced): one compilation, not
        one per batch shape. On CUDA windows go through reused pinned slots (geodino.feed).
        """
        models = self.load()
        backbone = models[0]
        want = self.outputs()
        n, window = len(inputs), inputs.shape[-1]
        if n == 0:
            return {k: np.empty((0, spec.channels, window // spec.scale, window // spec.scale), np.float32)
                    for k, spec in want.items()}
        step = self.call_size(n, window)
        parts = []
        for i in range(0, n, step):
            part = inputs[i:i + step]
            if backbone.device.type == "cuda" or (self.compile and len(part) < step):
                parts.append(_infer_staged(models, part, want, pool_for(backbone.device), step,
                                           pad=self.compile))
            else:
                parts.append(_infer_direct(models, part, want))
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def call_size(self, n: int, window: int) -> int:
        """Windows per model call: the bundle's batch size (else ``n``), within kernel limits."""
        backbone, heads, chm = self.load()
        cost = model_cost(backbone, heads, chm, window, self.embeddings)
        return max(1, min(self.batch_size or n, index_limit(cost, window)))


def _autocast(backbone):
    """The heads' autocast: bf16 on CUDA at bf16, else none (heads stay fp32 on a CPU and at int8)."""
    from geodino.precision import head_autocast

    return head_autocast(backbone)


def _forward(models, x: torch.Tensor, want) -> dict[str, torch.Tensor]:
    """The device part of a call: backbone, heads, CHMv2 on ``x`` already on the device."""
    backbone, heads, chm = models
    size = tuple(x.shape[-2:])
    result: dict[str, torch.Tensor] = {}
    # CHMv2 alone has its own backbone: geodino's runs only for heads or embeddings
    feats = backbone(x) if heads or "embeddings" in want else None
    with _autocast(backbone):
        if "canopy" in heads:
            result["canopy_height"] = heads["canopy"](feats.layers, size)
        elif chm is not None:
            result["canopy_height"] = run_chmv2(chm, x, size)
        if "landcover" in heads:  # logits, blended then argmaxed (softmax for probabilities) per block
            if want["landcover"].upsample:  # on the patch grid, upsampled once per output block
                result["landcover"] = heads["landcover"].patch_logits(feats.layers)
            else:
                result["landcover"] = heads["landcover"](feats.layers, size)
    if "embeddings" in want:
        result["embeddings"] = feats.patches
    return {k: v.float() for k, v in result.items()}


def _infer_direct(models, inputs: np.ndarray, want) -> dict[str, np.ndarray]:
    """CPU, no padding: the numpy batch is the model's input (no copy), results are views."""
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    with _INFER_LOCK, torch.inference_mode():
        result = _forward(models, x, want)
    return {k: v.numpy() for k, v in result.items()}


def _infer_staged(models, inputs: np.ndarray, want, pool: SlotPool, capacity: int,
                  pad: bool = False) -> dict[str, np.ndarray]:
    """Through a reused host slot of ``capacity`` windows: copy in, run, copy the results out.

    Only :func:`_queue` holds the inference lock. On CUDA the input goes up and the results
    come down as asynchronous copies from and to pinned memory; the lock is released once
    they are queued, and this thread waits for its own batch's event while the next one
    queues. Filling the slot before and copying out of it after run outside the lock, in
    parallel with the device. ``pad``: the model always sees all ``capacity`` windows (rows
    past the input's hold earlier windows or zeros; their results are dropped), so a
    compiled model sees one shape.
    """
    n = len(inputs)
    with pool.lease((capacity,) + tuple(inputs.shape[1:])) as slot:
        _stage_in(slot, inputs)
        with _INFER_LOCK:
            host, done = _queue(models, slot, n, want, pad)
        return _stage_out(host, n, done)


def _stage_in(slot: BatchSlot, inputs: np.ndarray) -> None:
    slot.inputs[:len(inputs)].copy_(torch.from_numpy(np.ascontiguousarray(inputs)))


def _queue(models, slot: BatchSlot, n: int, want, pad: bool):
    """Queue upload, model and download of one slot: (host result buffers, CUDA event or None)."""
    device = models[0].device
    host = {}
    with torch.inference_mode():
        x = (slot.inputs if pad else slot.inputs[:n]).to(device, non_blocking=True)
        for name, value in _forward(models, x, want).items():
            host[name] = slot.output(name, (slot.capacity,) + tuple(value.shape[1:]))  # slot-sized: reused
            host[name][:n].copy_(value[:n], non_blocking=True)
    if device.type != "cuda":
        return host, None
    done = torch.cuda.Event(blocking=True)  # the waiting thread sleeps: the CPU is the pipeline's
    done.record()
    return host, done  # device tensors are freed here; the allocator reuses them in stream order


def _stage_out(host: dict[str, torch.Tensor], n: int, done) -> dict[str, np.ndarray]:
    """Wait for this batch's copies, then hand out numpy copies (the slot is reused next)."""
    if done is not None:
        done.synchronize()
    return {name: buf[:n].numpy().copy() for name, buf in host.items()}


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

    @property
    def config(self):
        """The CHMv2 configuration (what batch sizing reads)."""
        return self.model.config

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

    Bounded by kernel index limits and a ceiling (:func:`geodino.batchsize.batch_size_for`).
    Chosen once per process for a bundle and window, so the scenes of one run share a batch
    shape (a compiled model would otherwise compile again when free memory moved).
    """
    backbone, heads, chm = bundle.load()
    cost = model_cost(backbone, heads, chm, window, bundle.embeddings)
    if backbone.device.type != "cuda":
        return min(8, batch_size_for(cost, window, free_bytes=None))
    key = (bundle.token, window, fraction)
    with _CACHE_LOCK:
        if key not in _AUTO_BATCH:
            _AUTO_BATCH[key] = batch_size_for(cost, window, free_device_bytes(backbone.device), fraction)
        return _AUTO_BATCH[key]


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, counting what torch's caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    if torch.cuda.is_initialized():
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free)
