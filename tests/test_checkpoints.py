"""Meta's original checkpoints: config inference for every released variant, and forwards
checked against the DINOv3 formulas written out here (not through transformers)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from geodino.backbone import load_backbone
from geodino.checkpoints import (
    config_from_meta_state_dict,
    load_meta_checkpoint,
    meta_to_hf_state_dict,
)
from geodino.errors import ModelError

# Meta's hub definitions (dinov3/hub/backbones.py), restated here independently of geodino:
# hub id -> dim, blocks, heads, head dim, activation, gated MLP, MLP hidden, qkv bias
RELEASED = {
    "facebook/dinov3-vits16-pretrain-lvd1689m": (384, 12, 6, 64, "gelu", False, 1536, True),
    "facebook/dinov3-vits16plus-pretrain-lvd1689m": (384, 12, 6, 64, "silu", True, 1536, True),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": (768, 12, 12, 64, "gelu", False, 3072, True),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": (1024, 24, 16, 64, "gelu", False, 4096, True),
    "facebook/dinov3-vitl16-pretrain-sat493m": (1024, 24, 16, 64, "gelu", False, 4096, True),
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": (1280, 32, 20, 64, "silu", True, 5120, True),
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": (4096, 40, 32, 128, "silu", True, 8192, False),
    "facebook/dinov3-vit7b16-pretrain-sat493m": (4096, 40, 32, 128, "silu", True, 8192, False),
}


def meta_vit_state(dim, depth, gated, hidden, qkv_bias=True, registers=4, device="meta", seed=0):
    """A state dict in Meta's layout with the given shapes (random values unless on ``meta``)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.05, offset=0.0):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * scale + offset

    head_dim_guess = 64
    s = {"cls_token": t(1, 1, dim, scale=1), "storage_tokens": t(1, registers, dim, scale=1),
         "mask_token": t(1, dim), "patch_embed.proj.weight": t(dim, 3, 16, 16, scale=0.02),
         "patch_embed.proj.bias": t(dim), "norm.weight": t(dim, scale=0.1, offset=1), "norm.bias": t(dim),
         "rope_embed.periods": t(head_dim_guess // 4)}
    for i in range(depth):
        p = f"blocks.{i}."
        s |= {p + "norm1.weight": t(dim, scale=0.1, offset=1), p + "norm1.bias": t(dim),
              p + "attn.qkv.weight": t(3 * dim, dim, scale=dim ** -0.5),
              p + "attn.proj.weight": t(dim, dim, scale=dim ** -0.5), p + "attn.proj.bias": t(dim),
              p + "ls1.gamma": t(dim, scale=0.1, offset=0.5), p + "ls2.gamma": t(dim, scale=0.1, offset=0.5),
              p + "norm2.weight": t(dim, scale=0.1, offset=1), p + "norm2.bias": t(dim)}
        if qkv_bias:
            s[p + "attn.qkv.bias"] = t(3 * dim, scale=0.1)  # the key third is masked in Meta's model
            mask = torch.ones(3 * dim, device=device)
            if device != "meta":
                mask[dim:2 * dim] = 0
            s[p + "attn.qkv.bias_mask"] = mask
        if gated:
            s |= {p + "mlp.w1.weight": t(hidden, dim, scale=dim ** -0.5), p + "mlp.w1.bias": t(hidden),
                  p + "mlp.w2.weight": t(hidden, dim, scale=dim ** -0.5), p + "mlp.w2.bias": t(hidden),
                  p + "mlp.w3.weight": t(dim, hidden, scale=hidden ** -0.5), p + "mlp.w3.bias": t(dim)}
        else:
            s |= {p + "mlp.fc1.weight": t(hidden, dim, scale=dim ** -0.5), p + "mlp.fc1.bias": t(hidden),
                  p + "mlp.fc2.weight": t(dim, hidden, scale=hidden ** -0.5), p + "mlp.fc2.bias": t(dim)}
    return s


@pytest.mark.parametrize("hub_id", sorted(RELEASED))
def test_config_inferred_for_every_released_variant(hub_id):
    from transformers import DINOv3ViTModel

    dim, depth, heads, head_dim, act, gated, hidden, qkv_bias = RELEASED[hub_id]
    state = meta_vit_state(dim, depth, gated, hidden, qkv_bias)  # shapes only: no memory
    config = config_from_meta_state_dict(state)
    assert config.num_attention_heads == heads
    assert config.hidden_size // config.num_attention_heads == head_dim
    assert config.hidden_act == act and config.use_gated_mlp is gated
    assert config.intermediate_size == hidden and config.num_hidden_layers == depth
    assert config.num_register_tokens == 4 and config.layerscale_value == 1.0
    assert (config.query_bias, config.value_bias, config.key_bias) == (qkv_bias, qkv_bias, False)
    assert config.rope_theta == 100.0 and config.patch_size == 16
    # every converted tensor lands on a parameter of the same shape, and nothing is left out
    with torch.device("meta"):
        model = DINOv3ViTModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in meta_to_hf_state_dict(state).items()}
    assert converted == expected
    assert any("layer_scale1" in k for k in converted)


def test_a_shape_of_no_released_variant_is_refused_with_its_shapes():
    state = meta_vit_state(512, 12, False, 2048)
    with pytest.raises(ModelError, match=r"dim 512, 12 blocks, plain MLP hidden 2048") as err:
        config_from_meta_state_dict(state)
    assert "ViT-7B/16 dim 4096" in str(err.value)  # the released shapes are listed beside it


# --------------------------------------------------------------------------------------
# reference forward written from Meta's formulas


def _rope(h, w, head_dim, base=100.0):
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    ch = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1
    cw = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).reshape(-1, 2)  # (hw, 2)
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (hw, 2, head_dim/4)
    angles = angles.reshape(h * w, -1).tile(2)  # (hw, head_dim)
    return angles.sin().float(), angles.cos().float()


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def reference_forward(s, x, heads, gated, eps=1e-5):
    """DINOv3 ViT last_hidden_state from Meta's state dict, written out by hand."""
    b = x.shape[0]
    dim = s["cls_token"].shape[-1]
    hd = dim // heads
    patches = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=16)
    gh, gw = patches.shape[-2:]
    tokens = torch.cat([s["cls_token"].expand(b, -1, -1), s["storage_tokens"].expand(b, -1, -1),
                        patches.flatten(2).transpose(1, 2)], dim=1)
    prefix = 1 + s["storage_tokens"].shape[1]
    sin, cos = _rope(gh, gw, hd)
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(tokens, (dim,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps)
        bias = s.get(p + "attn.qkv.bias")
        if bias is not None:
            bias = bias * s[p + "attn.qkv.bias_mask"]
        qkv = F.linear(y, s[p + "attn.qkv.weight"], bias).reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = torch.cat([q[:, :, :prefix], q[:, :, prefix:] * cos + _rotate_half(q[:, :, prefix:]) * sin], dim=2)
        k = torch.cat([k[:, :, :prefix], k[:, :, prefix:] * cos + _rotate_half(k[:, :, prefix:]) * sin], dim=2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, -1, dim)
        tokens = tokens + s[p + "ls1.gamma"] * F.linear(out, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        y = F.layer_norm(tokens, (dim,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps)
        if gated:  # SwiGLU: w3(silu(w1 y) * w2 y)
            y = F.linear(F.silu(F.linear(y, s[p + "mlp.w1.weight"], s[p + "mlp.w1.bias"]))
                         * F.linear(y, s[p + "mlp.w2.weight"], s[p + "mlp.w2.bias"]),
                         s[p + "mlp.w3.weight"], s[p + "mlp.w3.bias"])
        else:
            y = F.linear(F.gelu(F.linear(y, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                         s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
        tokens = tokens + s[p + "ls2.gamma"] * y
    return F.layer_norm(tokens, (dim,), s["norm.weight"], s["norm.bias"], eps)


@pytest.mark.parametrize("dim,heads,gated,hidden,qkv_bias", [
    (128, 2, True, 96, True),     # gated MLP (SiLU), as ViT-S+/H+/7B
    (256, 2, True, 128, False),   # 128-dim heads and no qkv bias, as ViT-7B
    (128, 2, False, 256, True),   # plain MLP (GELU), as ViT-S/B/L
])
def test_converted_checkpoint_matches_the_reference_forward(tmp_path, dim, heads, gated, hidden, qkv_bias):
    state = meta_vit_state(dim, 3, gated, hidden, qkv_bias, device="cpu", seed=dim + hidden)
    path = tmp_path / "custom.pth"
    torch.save(state, path)
    model = load_meta_checkpoint(path, num_heads=heads).eval()
    assert model.config.hidden_act == ("silu" if gated else "gelu")
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = model(pixel_values=x).last_hidden_state
    ref = reference_forward(state, x, heads, gated)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
    if dim == 256:  # the head count matters: 4 heads of 64 (the old assumption) give other features
        wrong = load_meta_checkpoint(path, num_heads=4).eval()
        with torch.inference_mode():
            off = wrong(pixel_values=x).last_hidden_state
        assert ((off - ref).norm() / ref.norm()).item() > 1e-3


# --------------------------------------------------------------------------------------
# ConvNeXt


def _convnext_to_meta(hf: dict) -> dict:
    """transformers DINOv3ConvNextModel keys -> Meta's layout (the inverse, written here)."""
    out = {}
    for k, v in hf.items():
        k2 = re.sub(r"^model\.stages\.(\d+)\.downsample_layers\.(\d+)\.", r"downsample_layers.\1.\2.", k)
        k2 = re.sub(r"^model\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.\2.", k2)
        k2 = (k2.replace("depthwise_conv", "dwconv").replace("pointwise_conv", "pwconv")
              .replace(".layer_norm.", ".norm."))
        k2 = "norm." + k2.split(".")[-1] if k2.startswith("layer_norm.") else k2
        out[k2] = v
    return out


def test_convnext_checkpoint_round_trip(tmp_path):
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    torch.manual_seed(0)
    ref = DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[16, 24, 32, 40], depths=[1, 2, 3, 1])).eval()
    meta = _convnext_to_meta(ref.state_dict())
    assert "stages.2.2.dwconv.weight" in meta and "downsample_layers.1.1.weight" in meta
    meta["norms.3.weight"], meta["norms.3.bias"] = torch.ones(40), torch.zeros(40)  # Meta's extra norm
    path = tmp_path / "dinov3_convnext_custom.pth"
    torch.save(meta, path)
    bb = load_backbone(path)
    assert bb.info.arch == "convnext" and bb.patch_size == 32 and bb.embed_dim == 40
    assert list(bb.model.config.hidden_sizes) == [16, 24, 32, 40] and list(bb.model.config.depths) == [1, 2, 3, 1]
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(bb.model(pixel_values=x).last_hidden_state,
                                   ref(pixel_values=x).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert bb(x).patches.shape == (1, 40, 2, 3)


# --------------------------------------------------------------------------------------
# CHMv2: Meta's head .pth + the SAT ViT-L -> transformers CHMv2ForDepthEstimation

_HEAD_TO_META = [  # transformers key -> Meta's DPT head key (the inverse, written here)
    (r"head\.reassemble_stage\.layers\.(\d+)\.projection\.", r"reassemble_blocks.projects.\1.conv."),
    (r"head\.reassemble_stage\.layers\.(\d+)\.resize\.", r"reassemble_blocks.resize_layers.\1."),
    (r"head\.reassemble_stage\.readout_projects\.", r"reassemble_blocks.readout_projects."),
    (r"head\.convs\.(\d+)\.weight", r"convs.\1.conv.weight"),
    (r"head\.fusion_layers\.(\d+)\.residual_layer(\d)\.convolution(\d)\.", r"fusion_blocks.\1.res_conv_unit\2.conv\3.conv."),
    (r"head\.fusion_layers\.(\d+)\.projection\.", r"fusion_blocks.\1.project.conv."),
    (r"head\.conv_depth\.", r"conv_depth."),
]


@pytest.fixture(scope="module")
def small_chmv2():
    """A CHMv2 with the released layout (24 blocks read at 6/12/18/24, no key bias), narrow and random."""
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, DINOv3ViTConfig

    torch.manual_seed(0)
    bb = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=24, num_attention_heads=1, intermediate_size=128,
                         num_register_tokens=4, key_bias=False, layer_norm_eps=1e-5, out_indices=[6, 12, 18, 24],
                         apply_layernorm=True, reshape_hidden_states=True)
    bb.return_class_token = True
    config = CHMv2Config(backbone_config=bb, post_process_channels=[16, 32, 64, 64], fusion_hidden_size=32,
                         head_hidden_size=16, number_output_channels=64)
    return CHMv2ForDepthEstimation(config).eval()


def test_chmv2_head_pth_with_sat_backbone_loads_into_transformers(small_chmv2, tmp_path):
    from transformers import DINOv3ViTModel

    from geodino.predict import load_chmv2

    state = small_chmv2.state_dict()
    # the backbone as a user's transformers folder of the SAT ViT-L (Meta's .pth goes the same way)
    vit = DINOv3ViTModel(small_chmv2.config.backbone_config)
    vit.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    vit.save_pretrained(tmp_path / "vitl16-sat")
    head = {}
    for key, value in state.items():
        if key.startswith("head."):
            for pattern, template in _HEAD_TO_META:
                if re.match(pattern, key):
                    head[re.sub(pattern, template, key)] = value
                    break
            else:
                raise AssertionError(key)
    assert "fusion_blocks.1.res_conv_unit1.conv1.conv.weight" in head
    torch.save(head, tmp_path / "dinov3_vitl16_chmv2_dpt_head.pth")

    model = load_chmv2(str(tmp_path / "dinov3_vitl16_chmv2_dpt_head.pth"), "cpu", backbone=str(tmp_path / "vitl16-sat"))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values=x).predicted_depth, small_chmv2(pixel_values=x).predicted_depth,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match=r"needs its backbone.*dinov3_vitl16_pretrain_sat493m.*--backbone"):
        load_chmv2(str(tmp_path / "dinov3_vitl16_chmv2_dpt_head.pth"), "cpu")
    with pytest.raises(ModelError, match="CHMv2 canopy-height head, not a backbone"):
        load_backbone(tmp_path / "dinov3_vitl16_chmv2_dpt_head.pth")


def test_chmv2_input_uses_its_own_normalisation():
    from geodino.predict import CanopyModel
    from geodino.sensor import CHMV2_STATS, FAMILY_STATS

    assert CHMV2_STATS == ((0.420, 0.411, 0.296), (0.213, 0.156, 0.143))
    value = torch.tensor([0.7, 0.2, 0.5])[:, None, None]  # one pixel after scaling to [0, 1]
    for family, (mean, std) in FAMILY_STATS.items():
        fed = (value - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        want = (value - torch.tensor(CHMV2_STATS[0])[:, None, None]) / torch.tensor(CHMV2_STATS[1])[:, None, None]
        got = CanopyModel(torch.nn.Identity(), family).restandardise(fed[None])[0]
        torch.testing.assert_close(got, want)


def test_legacy_format_checkpoint_is_read_too(tmp_path):
    from geodino.checkpoints import load_state_dict

    path = tmp_path / "old.pth"
    torch.save({"model": {"w": torch.arange(3.0)}}, path, _use_new_zipfile_serialization=False)  # no mmap possible
    assert torch.equal(load_state_dict(path)["w"], torch.arange(3.0))
