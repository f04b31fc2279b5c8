"""Meta's original DINOv3 checkpoints (``.pth``) -> transformers models.

Meta distributes DINOv3 as plain state dicts in its own layout (``storage_tokens``, fused
``qkv``, ``ls1.gamma``, ``w1/w2/w3`` for the gated MLP, ConvNeXt ``dwconv``/``pwconv``). The
key mapping follows transformers' DINOv3 conversion scripts; what the weights cannot tell
(head count, activation, qkv bias) comes from the released architectures below, so a
checkpoint of a released variant is rebuilt exactly and any other shape is refused with its
shapes named. Everything is loaded with ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from geodino.errors import ModelError


@dataclass(frozen=True)
class ViTVariant:
    """A released DINOv3 ViT architecture (Meta's hub definitions)."""

    name: str
    dim: int
    depth: int
    heads: int
    gated: bool  # SwiGLU MLP (w1, w2, w3) with SiLU; otherwise fc1/fc2 with GELU
    mlp_hidden: int
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def activation(self) -> str:
        return "silu" if self.gated else "gelu"


# Head count cannot be read from weight shapes; ViT-7B is the one with 128-dim heads.
RELEASED_VITS: tuple[ViTVariant, ...] = (
    ViTVariant("ViT-S/16", 384, 12, 6, False, 1536),
    ViTVariant("ViT-S+/16", 384, 12, 6, True, 1536),
    ViTVariant("ViT-B/16", 768, 12, 12, False, 3072),
    ViTVariant("ViT-L/16", 1024, 24, 16, False, 4096),
    ViTVariant("ViT-H+/16", 1280, 32, 20, True, 5120),
    ViTVariant("ViT-7B/16", 4096, 40, 32, True, 8192, qkv_bias=False),
)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a ``.pth`` file, refusing pickled code."""
    try:
        try:  # memory-mapped: a 7B checkpoint is not read into RAM twice
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 (a pickle with code, or not a checkpoint at all: many types)
        raise ModelError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({e})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def checkpoint_kind(state: dict[str, torch.Tensor]) -> str:
    """"vit", "convnext" or "chmv2-head" (Meta's DPT head without its backbone)."""
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        return "vit"
    if any(k.startswith("downsample_layers.") for k in state) and any(k.startswith("stages.") for k in state):
        return "convnext"
    if any(re.match(r"(head\.)?reassemble_blocks\.", k) for k in state):
        return "chmv2-head"
    raise ModelError("not a DINOv3 checkpoint: expected Meta's ViT keys (cls_token, patch_embed, blocks), "
                     f"ConvNeXt keys (downsample_layers, stages) or a CHMv2 head; found {', '.join(list(state)[:6])}")


# --------------------------------------------------------------------------------------
# ViT

# (Meta key pattern, transformers key template); qkv is split separately.
_VIT_KEYS = [
    (r"cls_token", "embeddings.cls_token"),
    (r"storage_tokens", "embeddings.register_tokens"),
    (r"mask_token", "embeddings.mask_token"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"model.layer.\1.norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"model.layer.\1.norm2.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"model.layer.\1.attention.o_proj.\2"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"model.layer.\1.layer_scale1.lambda1"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"model.layer.\1.layer_scale2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"model.layer.\1.mlp.gate_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]
# Meta keys without a transformers counterpart: RoPE periods are recomputed, the key bias is
# masked to zero in Meta's code and absent in transformers, local_cls_norm only serves
# training crops, heads belong to other tasks.
_VIT_DROP = re.compile(r"rope_embed\.periods|.*\.qkv\.bias_mask|local_cls_norm\..*|head\..*|dino_head\..*")


def meta_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original DINOv3 ViT state dict to the transformers DINOv3ViTModel layout."""
    out: dict[str, torch.Tensor] = {}
    rest = {}
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if m:
            i, kind = m.groups()
            q, k, v = value.chunk(3, dim=0)
            out[f"model.layer.{i}.attention.q_proj.{kind}"] = q
            out[f"model.layer.{i}.attention.v_proj.{kind}"] = v
            if kind == "weight":  # the key bias is masked to zero in Meta's model
                out[f"model.layer.{i}.attention.k_proj.weight"] = k
        elif not _VIT_DROP.fullmatch(key):
            rest[key] = value.reshape(1, 1, -1) if key == "mask_token" else value
    return out | _rename(rest, _VIT_KEYS, "the Meta checkpoint")


def _rename(state: dict[str, torch.Tensor], patterns, what: str) -> dict[str, torch.Tensor]:
    """Keys renamed by the first (pattern, template) that matches; an unknown key is an error."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, template in patterns:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ModelError(f"unrecognised keys in {what}: {', '.join(unknown[:8])}")
    return out


def vit_shapes(state: dict[str, torch.Tensor]) -> dict:
    """What the weights say about a Meta ViT: dim, depth, gated MLP, MLP hidden size, biases."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ModelError("not a DINOv3 ViT checkpoint (no cls_token / patch_embed)")
    blocks = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not blocks:
        raise ModelError("not a DINOv3 ViT checkpoint (no transformer blocks)")
    gated = "blocks.0.mlp.w1.weight" in state
    return {
        "dim": int(state["cls_token"].shape[-1]), "depth": 1 + max(blocks), "gated": gated,
        "mlp_hidden": int(state["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]),
        "patch": int(state["patch_embed.proj.weight"].shape[-1]),
        "registers": int(state["storage_tokens"].shape[1]) if "storage_tokens" in state else 0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "proj_bias": "blocks.0.attn.proj.bias" in state,
        "mlp_bias": ("blocks.0.mlp.w1.bias" if gated else "blocks.0.mlp.fc1.bias") in state,
        "layer_scale": "blocks.0.ls1.gamma" in state,
    }


def released_variant(shapes: dict) -> ViTVariant | None:
    for v in RELEASED_VITS:
        if (v.dim, v.depth, v.gated, v.mlp_hidden) == (shapes["dim"], shapes["depth"], shapes["gated"],
                                                        shapes["mlp_hidden"]):
            return v
    return None


def config_from_meta_state_dict(state: dict[str, torch.Tensor], *, num_heads: int | None = None):
    """The DINOv3ViTConfig of an original Meta ViT state dict.

    Shapes give dim, depth, MLP kind and size, registers and biases; the released variant
    they match gives the head count (7B: 32 x 128, all others 64-dim heads). The gated MLP
    uses SiLU (Meta's SwiGLUFFN), the plain one GELU. A shape matching no released variant
    is refused unless ``num_heads`` says how to split attention (a custom architecture).
    """
    from transformers import DINOv3ViTConfig

    s = vit_shapes(state)
    variant = released_variant(s)
    if variant is None and num_heads is None:
        known = "; ".join(f"{v.name} dim {v.dim}, {v.depth} blocks, {'gated' if v.gated else 'plain'} MLP "
                          f"{v.mlp_hidden}" for v in RELEASED_VITS)
        raise ModelError(f"checkpoint shapes fit no released DINOv3 ViT: dim {s['dim']}, {s['depth']} blocks, "
                         f"{'gated' if s['gated'] else 'plain'} MLP hidden {s['mlp_hidden']} (released: {known}). "
                         "For a custom architecture call geodino.checkpoints.load_meta_checkpoint(path, "
                         "num_heads=N) and save_pretrained the result")
    heads = num_heads or variant.heads
    if s["dim"] % heads:
        raise ModelError(f"num_heads {heads} does not divide the embedding dim {s['dim']}")
    if s["patch"] != 16 or (s["dim"] // heads) % 4:
        raise ModelError(f"unsupported ViT: patch {s['patch']} px, head dim {s['dim'] // heads} "
                         "(DINOv3 uses 16 px patches and a head dim divisible by 4 for 2-D RoPE)")
    return DINOv3ViTConfig(
        hidden_size=s["dim"], num_hidden_layers=s["depth"], num_attention_heads=heads,
        intermediate_size=s["mlp_hidden"], patch_size=s["patch"], num_register_tokens=s["registers"],
        use_gated_mlp=s["gated"], hidden_act="silu" if s["gated"] else "gelu", layerscale_value=1.0,
        layer_norm_eps=1e-5, rope_theta=100.0,
        query_bias=s["qkv_bias"], value_bias=s["qkv_bias"], key_bias=False, proj_bias=s["proj_bias"],
        mlp_bias=s["mlp_bias"],
    )


def _load_into(model, converted: dict, path, allow_missing=()) -> None:
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not any(k.endswith(a) for a in allow_missing)]
    if unexpected or missing:
        raise ModelError(f"{path}: checkpoint does not fit the inferred architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def vit_from_state(state: dict[str, torch.Tensor], path="checkpoint", *, num_heads: int | None = None):
    from transformers import DINOv3ViTModel

    config = config_from_meta_state_dict(state, num_heads=num_heads)
    model = DINOv3ViTModel(config)
    _load_into(model, meta_to_hf_state_dict(state), path, allow_missing=("k_proj.bias",))
    return model


# --------------------------------------------------------------------------------------
# ConvNeXt

_CONVNEXT_KEYS = [
    (r"downsample_layers\.(\d+)\.(\d+)\.(weight|bias)", r"model.stages.\1.downsample_layers.\2.\3"),
    (r"stages\.(\d+)\.(\d+)\.gamma", r"model.stages.\1.layers.\2.gamma"),
    (r"stages\.(\d+)\.(\d+)\.dwconv\.(weight|bias)", r"model.stages.\1.layers.\2.depthwise_conv.\3"),
    (r"stages\.(\d+)\.(\d+)\.norm\.(weight|bias)", r"model.stages.\1.layers.\2.layer_norm.\3"),
    (r"stages\.(\d+)\.(\d+)\.pwconv(1|2)\.(weight|bias)", r"model.stages.\1.layers.\2.pointwise_conv\3.\4"),
    (r"norm\.(weight|bias)", r"layer_norm.\1"),
]
# norms.3 is a second final norm of Meta's dense-feature path; transformers keeps one
_CONVNEXT_DROP = re.compile(r"norms\.\d+\.(weight|bias)|head\..*")


def convnext_config_from_state(state: dict[str, torch.Tensor]):
    """Stage widths and depths of a Meta ConvNeXt state dict (all other settings as released)."""
    from transformers import DINOv3ConvNextConfig

    widths, depths = [], []
    for i in range(4):
        key = "downsample_layers.0.0.weight" if i == 0 else f"downsample_layers.{i}.1.weight"
        if key not in state:
            raise ModelError(f"not a DINOv3 ConvNeXt checkpoint (no {key})")
        widths.append(int(state[key].shape[0]))
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}
        if not blocks:
            raise ModelError(f"not a DINOv3 ConvNeXt checkpoint (stage {i} has no blocks)")
        depths.append(1 + max(blocks))
    return DINOv3ConvNextConfig(hidden_sizes=widths, depths=depths)


def convnext_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kept = {k: v for k, v in state.items() if not _CONVNEXT_DROP.fullmatch(k)}
    return _rename(kept, _CONVNEXT_KEYS, "the Meta ConvNeXt checkpoint")


def convnext_from_state(state: dict[str, torch.Tensor], path="checkpoint"):
    from transformers import DINOv3ConvNextModel

    model = DINOv3ConvNextModel(convnext_config_from_state(state))
    _load_into(model, convnext_to_hf_state_dict(state), path)
    return model


def load_meta_checkpoint(path: str | Path, *, num_heads: int | None = None):
    """A transformers DINOv3ViTModel or DINOv3ConvNextModel from an original Meta ``.pth``."""
    state = load_state_dict(path)
    kind = checkpoint_kind(state)
    if kind == "vit":
        return vit_from_state(state, path, num_heads=num_heads)
    if kind == "convnext":
        return convnext_from_state(state, path)
    raise ModelError(f"{path}: this is Meta's CHMv2 canopy-height head, not a backbone; pass it as "
                     "--canopy-model with the SAT ViT-L checkpoint as --backbone "
                     "(dinov3_vitl16_pretrain_sat493m-*.pth)")


# --------------------------------------------------------------------------------------
# CHMv2: Meta's DPT canopy-height head + the SAT ViT-L backbone -> CHMv2ForDepthEstimation

_CHMV2_HEAD_KEYS = [
    (r"reassemble_blocks\.projects\.(\d+)\.conv\.(weight|bias)", r"head.reassemble_stage.layers.\1.projection.\2"),
    (r"reassemble_blocks\.resize_layers\.(\d+)\.(weight|bias)", r"head.reassemble_stage.layers.\1.resize.\2"),
    (r"reassemble_blocks\.batchnorm_layers\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)",
     r"head.reassemble_stage.layers.\1.batchnorm.\2"),
    (r"reassemble_blocks\.readout_projects\.(\d+)\.0\.(weight|bias)", r"head.reassemble_stage.readout_projects.\1.0.\2"),
    (r"convs\.(\d+)\.conv\.weight", r"head.convs.\1.weight"),
    (r"fusion_blocks\.(\d+)\.res_conv_unit(1|2)\.conv(1|2)\.conv\.(weight|bias)",
     r"head.fusion_layers.\1.residual_layer\2.convolution\3.\4"),
    (r"fusion_blocks\.(\d+)\.project\.conv\.(weight|bias)", r"head.fusion_layers.\1.projection.\2"),
    (r"conv_depth\.head\.(0|2|4)\.(weight|bias)", r"head.conv_depth.head.\1.\2"),
]
CHMV2_OUT_INDICES = [6, 12, 18, 24]  # the ViT-L blocks Meta's CHMv2 head reads (1-based hidden states)
CHMV2_FILES = ("the CHMv2 head checkpoint (dinov3_vitl16_chmv2_dpt_head-*.pth) as --canopy-model and the "
               "SAT ViT-L backbone checkpoint (dinov3_vitl16_pretrain_sat493m-*.pth, or its transformers folder) "
               "as --backbone; or one transformers folder of facebook/dinov3-vitl16-chmv2-dpt-head "
               "(hf download facebook/dinov3-vitl16-chmv2-dpt-head --local-dir ./chmv2) as --canopy-model")


def chmv2_head_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # full-model checkpoints prefix the head's keys with "head.", head-only ones do not
    return _rename({k.removeprefix("head."): v for k, v in state.items()}, _CHMV2_HEAD_KEYS,
                   "the CHMv2 head checkpoint")


def chmv2_config(backbone_config, head: dict[str, torch.Tensor]):
    """A CHMv2Config for a DINOv3 ViT config and a converted head (sizes read from its shapes)."""
    from transformers import CHMv2Config

    bb = copy.deepcopy(backbone_config)
    bb.set_output_features_output_indices(out_indices=CHMV2_OUT_INDICES, out_features=None)
    bb.apply_layernorm, bb.reshape_hidden_states = True, True
    bb.return_class_token = True  # the head's readout projection reads each layer's CLS token
    try:
        post = [int(head[f"head.reassemble_stage.layers.{i}.projection.weight"].shape[0]) for i in range(4)]
        fusion = int(head["head.convs.0.weight"].shape[0])
        hidden = int(head["head.conv_depth.head.2.weight"].shape[0])
        bins = int(head["head.conv_depth.head.4.weight"].shape[0])
    except KeyError as e:
        raise ModelError(f"the CHMv2 head checkpoint lacks {e}; expected Meta's DPT head") from None
    readout = "project" if "head.reassemble_stage.readout_projects.0.0.weight" in head else "ignore"
    return CHMv2Config(backbone_config=bb, post_process_channels=post, fusion_hidden_size=fusion,
                       head_hidden_size=hidden, number_output_channels=bins, readout_type=readout,
                       min_depth=0.001, max_depth=96.0, bins_strategy="chmv2_mixlog", norm_strategy="chmv2_mixlog")


def chmv2_from_meta(head_path: str | Path, backbone_model):
    """CHMv2ForDepthEstimation from Meta's head ``.pth`` and a loaded DINOv3ViTModel (the SAT ViT-L)."""
    from transformers import CHMv2ForDepthEstimation

    state = load_state_dict(head_path)
    if checkpoint_kind(state) != "chmv2-head":
        raise ModelError(f"{head_path}: not a CHMv2 head checkpoint. geodino needs {CHMV2_FILES}")
    if getattr(backbone_model.config, "model_type", "") != "dinov3_vit" or backbone_model.config.num_hidden_layers < 24:
        raise ModelError(f"{head_path}: the CHMv2 head reads blocks {CHMV2_OUT_INDICES} of the SAT ViT-L; the "
                         f"backbone given is not a ViT-L. geodino needs {CHMV2_FILES}")
    head = chmv2_head_to_hf(state)
    config = chmv2_config(backbone_model.config, head)
    model = CHMv2ForDepthEstimation(config)
    converted = {f"backbone.{k}": v for k, v in backbone_model.state_dict().items()} | head
    _load_into(model, converted, head_path, allow_missing=("k_proj.bias", "inv_freq"))
    return model
