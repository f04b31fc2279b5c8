"""The frozen DINOv3 backbone, loaded through Hugging Face transformers.

``load_backbone`` takes a released hub id (or its short name), a local Hugging Face
directory, or an original Meta ``.pth`` checkpoint (converted to the transformers layout,
loaded with ``weights_only=True``). The result is always in eval mode with gradients off:
by default fp32 on CPU, bf16 autocast on CUDA, never fp16 (DINOv3 activations overflow in
fp16); ``precision`` chooses bf16 or int8 instead (:mod:`geodino.precision`).

Its forward returns the CLS token, the register tokens, the patch grid and chosen
intermediate layers as grids, each passed through the final LayerNorm (transformers returns
``hidden_states`` un-normed, as Meta's ``get_intermediate_layers(norm=True)`` would not).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Meta checkpoint conversion lives in geodino.checkpoints; these names stay importable here.
from geodino.checkpoints import (  # noqa: F401
    config_from_meta_state_dict,
    load_meta_checkpoint,
    meta_to_hf_state_dict,
)
from geodino.errors import ModelError


@dataclass(frozen=True)
class BackboneInfo:
    """What geodino needs to know about a backbone."""

    name: str  # hub id or local path
    arch: str  # "vit" or "convnext"
    family: str  # "web" (LVD-1689M) or "sat" (SAT-493M): sets the input normalisation
    patch_size: int  # output stride of the patch grid
    embed_dim: int
    depth: int
    layers: tuple[int, ...]  # default intermediate layers (0-based blocks)


def _vit(name: str, family: str, dim: int, depth: int, layers: Sequence[int]) -> BackboneInfo:
    return BackboneInfo(name, "vit", family, 16, dim, depth, tuple(layers))


_LAYERS_12 = (2, 5, 8, 11)
REGISTRY: dict[str, BackboneInfo] = {
    info.name: info
    for info in (
        _vit("facebook/dinov3-vits16-pretrain-lvd1689m", "web", 384, 12, _LAYERS_12),
        _vit("facebook/dinov3-vits16plus-pretrain-lvd1689m", "web", 384, 12, _LAYERS_12),
        _vit("facebook/dinov3-vitb16-pretrain-lvd1689m", "web", 768, 12, _LAYERS_12),
        _vit("facebook/dinov3-vitl16-pretrain-lvd1689m", "web", 1024, 24, (4, 11, 17, 23)),
        _vit("facebook/dinov3-vith16plus-pretrain-lvd1689m", "web", 1280, 32, (7, 15, 23, 31)),
        _vit("facebook/dinov3-vit7b16-pretrain-lvd1689m", "web", 4096, 40, (9, 19, 29, 39)),
        _vit("facebook/dinov3-vitl16-pretrain-sat493m", "sat", 1024, 24, (4, 11, 17, 23)),
        _vit("facebook/dinov3-vit7b16-pretrain-sat493m", "sat", 4096, 40, (9, 19, 29, 39)),
        BackboneInfo("facebook/dinov3-convnext-tiny-pretrain-lvd1689m", "convnext", "web", 32, 768, 4, (3,)),
        BackboneInfo("facebook/dinov3-convnext-small-pretrain-lvd1689m", "convnext", "web", 32, 768, 4, (3,)),
        BackboneInfo("facebook/dinov3-convnext-base-pretrain-lvd1689m", "convnext", "web", 32, 1024, 4, (3,)),
        BackboneInfo("facebook/dinov3-convnext-large-pretrain-lvd1689m", "convnext", "web", 32, 1536, 4, (3,)),
    )
}
# short names: "vitl16-sat", "vits16", "convnext-tiny", ...
ALIASES = {
    re.sub(r"^facebook/dinov3-|-pretrain-lvd1689m$", "", k).replace("-pretrain-sat493m", "-sat"): k
    for k in REGISTRY
}


def resolve_name(name: str) -> str:
    return ALIASES.get(name, name)


def default_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spread blocks ending at the last one (S/B: 2,5,8,11; L: 5,11,17,23 -> registry)."""
    if depth < 4:
        return tuple(range(depth))
    step = depth / 4
    return tuple(int(round(step * (i + 1))) - 1 for i in range(4))


@dataclass
class BackboneOutput:
    """Tokens of one batch: cls (B, D), registers (B, R, D), patches (B, D, h, w), layers [(B, D, h, w)]."""

    cls: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)


class Backbone:
    """A frozen DINOv3 model with its metadata. Not an nn.Module on purpose: it never trains."""

    def __init__(self, model: torch.nn.Module, info: BackboneInfo, device: torch.device,
                 layers: Sequence[int] | None = None, precision: str | None = None) -> None:
        from geodino.precision import autocast_dtype, resolve_precision

        self.model = model
        self.info = info
        self.device = device
        self.layers = tuple(layers) if layers is not None else info.layers
        if any(not 0 <= i < info.depth for i in self.layers):
            raise ModelError(f"intermediate layers {self.layers} out of range for a {info.depth}-block backbone")
        self.precision = resolve_precision(precision, device)  # fp32 | bf16 | int8, recorded in outputs
        self.precision_detail = self.precision  # int8: which library and kernels (set when quantised)
        self.autocast_dtype = autocast_dtype(self.precision, device)
        self.model.to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        config = model.config
        self.num_registers = int(getattr(config, "num_register_tokens", 0) or 0)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def patch_size(self) -> int:
        return self.info.patch_size

    def __call__(self, pixel_values: torch.Tensor) -> BackboneOutput:
        return self.forward(pixel_values)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """Run the frozen model on normalised input (B, 3, H, W), H and W multiples of the patch."""
        if self.model.training:  # .train() turns on RoPE jitter and changes features
            self.model.eval()
        b, _, h, w = pixel_values.shape
        p = self.patch_size
        if h % 16 or w % 16:
            raise ModelError(f"input {h}x{w} is not a multiple of 16 pixels")
        x = pixel_values.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(pixel_values=x, output_hidden_states=True)
        if self.info.arch == "convnext":
            tokens = out.last_hidden_state.float()
            grid = tokens[:, 1:].transpose(1, 2).reshape(b, -1, h // p, w // p)
            return BackboneOutput(cls=out.pooler_output.float(), registers=tokens[:, :0],
                                  patches=grid, layers=[grid])
        prefix = 1 + self.num_registers
        gh, gw = h // p, w // p
        last = out.last_hidden_state.float()
        norm = self.model.norm

        def as_grid(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, prefix:].transpose(1, 2).reshape(b, -1, gh, gw)

        with torch.autocast(self.device.type, enabled=False):
            layers = [as_grid(norm(out.hidden_states[i + 1].float())) for i in self.layers]
        return BackboneOutput(cls=last[:, 0], registers=last[:, 1:prefix], patches=as_grid(last), layers=layers)

    def train(self, mode: bool = True):
        raise RuntimeError("the backbone is frozen; geodino never trains it")


# --------------------------------------------------------------------------------------
# loading


def _info_for(name: str, config, family: str | None, path: Path | None) -> BackboneInfo:
    meta = {}
    if path is not None and path.is_dir() and (path / "geodino_backbone.json").exists():
        meta = json.loads((path / "geodino_backbone.json").read_text())
    registered = REGISTRY.get(name) or REGISTRY.get(meta.get("hub_id", "")) or REGISTRY.get(
        getattr(config, "_name_or_path", "") or "")
    is_convnext = getattr(config, "model_type", "") == "dinov3_convnext"
    if is_convnext:
        dim = config.hidden_sizes[-1]
        depth = len(config.hidden_sizes)
        patch = 32
    else:
        dim = config.hidden_size
        depth = config.num_hidden_layers
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    fam = family or meta.get("family") or (registered.family if registered else None)
    if fam is None:
        fam = "sat" if "sat493m" in name.lower() else "web"
    layers = tuple(meta["layers"]) if "layers" in meta else (
        registered.layers if registered and registered.depth == depth else default_layers(depth))
    if is_convnext:
        layers = (depth - 1,)
    return BackboneInfo(name, "convnext" if is_convnext else "vit", fam, patch, dim, depth, layers)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return dev


def load_backbone(name_or_path: str | os.PathLike, device: str | torch.device | None = "cpu",
                  dtype: torch.dtype | str | None = None, *, layers: Sequence[int] | None = None,
                  family: str | None = None, compile: bool = False, precision: str | None = None) -> Backbone:
    """Load a frozen DINOv3 backbone from a hub id, a local directory or a Meta checkpoint.

    ``precision`` is fp32, bf16 (autocast; weights stay fp32) or int8 (CPU: linear layers
    quantised, see :mod:`geodino.int8`); None is the device's default, fp32 on a CPU and bf16
    on CUDA. ``dtype`` (float32 or bfloat16) is the older spelling of the same choice.
    float16 is refused. Offline first: a local directory or the Hugging Face cache is used
    without network access. ``compile``: :func:`compile_model` (feed it one batch shape).
    """
    if dtype is not None and str(dtype).replace("torch.", "") in ("float16", "half", "fp16"):
        raise ModelError("DINOv3 overflows in float16; use bfloat16 (CUDA) or float32")
    if precision is None and dtype is not None:
        precision = str(dtype).replace("torch.", "")
    dev = pick_device(device)
    if precision is not None:  # a wrong precision fails before any weights are read
        from geodino.precision import resolve_precision

        resolve_precision(precision, dev)
        if compile and resolve_precision(precision, dev) == "int8":
            raise ModelError("--compile applies to fp32 and bf16; the int8 backbone is already a compiled graph")
    name = resolve_name(str(name_or_path))
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix not in (".pth", ".pt", ".bin"):
                raise ModelError(f"{path}: expected a Meta checkpoint (.pth) or a Hugging Face model folder")
            model = load_meta_checkpoint(path)
        else:
            if not (path / "config.json").exists():
                raise ModelError(f"{path}: no config.json; expected a Hugging Face model folder "
                                 "(save_pretrained / hf download) or a Meta .pth checkpoint")
            model = _from_pretrained(str(path), local_only=True)
        info = _info_for(str(path), model.config, family, path)
    elif "/" in name and not name.startswith((".", "/")):
        model = _from_pretrained(name, local_only=False)
        info = _info_for(name, model.config, family, None)
    else:
        raise ModelError(f"{name_or_path}: not a local path, and not a DINOv3 hub id or short name "
                         f"(known: {', '.join(sorted(ALIASES))})")
    backbone = Backbone(model, info, dev, layers, precision=precision)
    if backbone.precision == "int8":
        from geodino.int8 import quantise_backbone

        quantise_backbone(backbone)
    if backbone.precision != "fp32":
        from geodino.precision import warn_if_lossy

        warn_if_lossy(backbone.precision)
    if compile:
        backbone.model = compile_model(backbone.model, info.patch_size)
    return backbone


DINOV3_TYPES = ("dinov3_vit", "dinov3_convnext")


def _not_dinov3(name: str, found: str) -> ModelError:
    return ModelError(f"{name} is not a DINOv3 model ({found}); geodino needs a DINOv3 backbone: a hub id such "
                      f"as facebook/dinov3-vitl16-pretrain-sat493m, a short name ({', '.join(sorted(ALIASES)[:4])}, "
                      "...), a local copy of one, or Meta's .pth checkpoint")


def compile_model(model: torch.nn.Module, size: int = 16) -> torch.nn.Module:
    """``torch.compile`` for fixed shapes: geodino calls it with one batch shape per run.

    ``dynamic=False`` because the caller pads every batch to its batch size
    (:class:`geodino.predict.ModelBundle`): shape-specialised kernels are the fastest, and
    torch's default would, on the first different shape, compile a second, dynamic graph.
    One tiny eager call first: transformers installs its hidden-state hooks on the first
    call, under a threading lock that dynamo cannot trace (two graph breaks, three graphs).
    """
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(pixel_values=torch.zeros(1, 3, size, size, device=device), output_hidden_states=True)
    return torch.compile(model, dynamic=False)


def _from_pretrained(name: str, local_only: bool):
    from transformers import AutoConfig, DINOv3ConvNextModel, DINOv3ViTModel
    from transformers.utils import logging as hf_logging

    from geodino.hub import load_from_hub

    hf_logging.disable_progress_bar()

    def load(offline: bool):
        config = AutoConfig.from_pretrained(name, local_files_only=offline)
        if config.model_type not in DINOV3_TYPES:
            raise _not_dinov3(name, f"its config says model_type {config.model_type!r}")
        if config.model_type == "dinov3_convnext":  # no attention to choose
            return DINOv3ConvNextModel.from_pretrained(name, config=config, local_files_only=offline)
        return DINOv3ViTModel.from_pretrained(name, config=config, local_files_only=offline,
                                              attn_implementation="sdpa")

    if local_only:
        try:
            return load(True)
        except (OSError, ValueError) as e:
            raise ModelError(f"{name}: cannot load the model folder ({str(e).splitlines()[0]})") from None
    if name not in REGISTRY and "dinov3" not in name.lower():
        try:  # a copy in the cache says what it is; otherwise the name must
            return load(True)
        except (OSError, ValueError):
            raise _not_dinov3(name, "its name does not say DINOv3 and it is not in the local cache") from None
    return load_from_hub(name, load, flag="backbone", what="backbone")


# --------------------------------------------------------------------------------------
# a tiny DINOv3 for tests and the demo


def tiny_config(hidden_size: int = 96, layers: int = 4, heads: int = 3, registers: int = 4):
    """A DINOv3 ViT with the real architecture (RoPE, 4 registers, patch 16, layer scale), tiny."""
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden_size, patch_size=16, num_register_tokens=registers,
                           image_size=224, layerscale_value=1.0)


def save_tiny_backbone(out_dir: str | os.PathLike, *, seed: int = 0, family: str = "sat", **kwargs) -> Path:
    """Create a randomly initialised tiny DINOv3 and save it as a user would (save_pretrained)."""
    from transformers import DINOv3ViTModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    config = tiny_config(**kwargs)
    model = DINOv3ViTModel(config)
    # random layer scale as in a trained model, so every block matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.2, 1.0)
    model.save_pretrained(out)
    meta = {"family": family, "layers": list(default_layers(config.num_hidden_layers)),
            "note": "randomly initialised tiny DINOv3 architecture for tests and the demo; not DINOv3 weights",
            "random_weights": True}
    (out / "geodino_backbone.json").write_text(json.dumps(meta, indent=2))
    return out


def save_tiny_chmv2(out_dir: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64, layers: int = 4) -> Path:
    """A randomly initialised CHMv2ForDepthEstimation (DINOv3 ViT + DPT head), tiny, for tests."""
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, DINOv3ViTConfig

    torch.manual_seed(seed)
    backbone = DINOv3ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                               intermediate_size=2 * hidden_size, num_register_tokens=4,
                               out_indices=[1, 2, 3, 4] if layers == 4 else default_layers(layers),
                               apply_layernorm=True, reshape_hidden_states=True)
    backbone.return_class_token = True  # the CHMv2 head reads the CLS token of each layer
    d = hidden_size
    config = CHMv2Config(backbone_config=backbone, post_process_channels=[d // 4, d // 2, d, d],
                         reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=32, head_hidden_size=16,
                         number_output_channels=32)
    out = Path(out_dir)
    CHMv2ForDepthEstimation(config).save_pretrained(out)
    return out
