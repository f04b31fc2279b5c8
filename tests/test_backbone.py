from __future__ import annotations

import re

import pytest
import torch
from transformers import DINOv3ViTModel

from geodino.backbone import (ALIASES, REGISTRY, load_backbone, load_meta_checkpoint, meta_to_hf_state_dict,
                              resolve_name, save_tiny_backbone, tiny_config)
from geodino.errors import ModelError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_backbone(tiny_dir)


def test_loaded_through_the_user_path_frozen_fp32(tiny, tiny_dir):
    assert not tiny.model.training
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    assert tiny.info.family == "sat" and tiny.layers == (0, 1, 2, 3) and tiny.embed_dim == 96
    assert tiny.model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="frozen"):
        tiny.train()


def test_token_layout_registers_never_leak(tiny):
    x = torch.randn(2, 3, 64, 96)
    out = tiny(x)
    assert out.cls.shape == (2, 96) and out.registers.shape == (2, 4, 96)
    assert out.patches.shape == (2, 96, 4, 6)  # non-square: (H/16, W/16)
    raw = tiny.model(pixel_values=x).last_hidden_state
    assert torch.equal(out.cls, raw[:, 0])
    assert torch.equal(out.registers, raw[:, 1:5])
    # patch (r, c) is token 5 + r * W/16 + c: row-major after CLS and 4 registers
    assert torch.equal(out.patches[:, :, 1, 2], raw[:, 5 + 1 * 6 + 2])
    assert torch.equal(out.patches[:, :, 3, 5], raw[:, -1])


def test_intermediate_layers_are_layernormed_hidden_states(tiny):
    x = torch.randn(1, 3, 48, 48)
    out = tiny(x)
    hidden = tiny.model(pixel_values=x, output_hidden_states=True).hidden_states
    for k, layer in zip(tiny.layers, out.layers):
        tokens = tiny.model.norm(hidden[k + 1])[:, 5:]
        torch.testing.assert_close(layer, tokens.transpose(1, 2).reshape(1, 96, 3, 3))
    # hidden_states are not normed in transformers 5: the raw one differs
    assert not torch.allclose(hidden[-1][:, 5:], tiny.model.norm(hidden[-1])[:, 5:])
    torch.testing.assert_close(out.layers[-1], out.patches)


def test_eval_mode_is_deterministic_even_after_train_mode(tiny):
    x = torch.randn(1, 3, 64, 64)
    a = tiny(x).patches
    tiny.model.train()  # someone flips the module: RoPE jitter would change features
    b = tiny(x).patches
    assert not tiny.model.training
    assert torch.equal(a, b)


def test_bf16_agrees_with_fp32_on_cpu(tiny):
    x = torch.randn(2, 3, 64, 64)
    ref = tiny(x).patches
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = tiny.model(pixel_values=x).last_hidden_state.float()[:, 5:]
    low = raw.transpose(1, 2).reshape_as(ref)
    rel = (low - ref).norm() / ref.norm()
    assert rel < 0.03, rel  # bf16 has 8 bits of mantissa; stated tolerance 3% relative


def test_fp16_is_refused(tiny_dir):
    with pytest.raises(ModelError, match="float16"):
        load_backbone(tiny_dir, dtype=torch.float16)


def _to_meta(hf_state: dict) -> dict:
    """The inverse of the conversion: a transformers state dict in Meta's original layout."""
    meta = {}
    for key, value in hf_state.items():
        m = re.fullmatch(r"model\.layer\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)", key)
        if m:
            continue
        key2 = (key.replace("embeddings.register_tokens", "storage_tokens")
                .replace("embeddings.cls_token", "cls_token").replace("embeddings.mask_token", "mask_token")
                .replace("embeddings.patch_embeddings", "patch_embed.proj").replace("model.layer.", "blocks.")
                .replace("attention.o_proj", "attn.proj").replace("layer_scale1.lambda1", "ls1.gamma")
                .replace("layer_scale2.lambda1", "ls2.gamma").replace("mlp.up_proj", "mlp.fc1")
                .replace("mlp.down_proj", "mlp.fc2"))
        meta[key2] = value.reshape(1, -1) if key2 == "mask_token" else value
    n = 1 + max(int(k.split(".")[2]) for k in hf_state if k.startswith("model.layer."))
    for i in range(n):
        p = f"model.layer.{i}.attention."
        meta[f"blocks.{i}.attn.qkv.weight"] = torch.cat([hf_state[p + "q_proj.weight"], hf_state[p + "k_proj.weight"],
                                                         hf_state[p + "v_proj.weight"]])
        zeros = torch.zeros_like(hf_state[p + "q_proj.bias"])
        meta[f"blocks.{i}.attn.qkv.bias"] = torch.cat([hf_state[p + "q_proj.bias"], zeros, hf_state[p + "v_proj.bias"]])
        meta[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(zeros), zeros, torch.ones_like(zeros)])
    meta["rope_embed.periods"] = torch.ones(8)
    return meta


def test_meta_checkpoint_converts_to_the_same_model(tmp_path):
    torch.manual_seed(3)
    config = tiny_config(hidden_size=128, heads=2)  # head dim 64, as the released checkpoints
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.2, 1.0)
    path = tmp_path / "dinov3_tiny_pretrain.pth"
    torch.save(_to_meta(model.state_dict()), path)
    converted = meta_to_hf_state_dict(torch.load(path, weights_only=True))
    assert "model.layer.0.attention.k_proj.bias" not in converted
    # not a released shape: load_backbone refuses it and names its shapes ...
    with pytest.raises(ModelError, match=r"fit no released DINOv3 ViT: dim 128, 4 blocks, plain MLP hidden 512"):
        load_backbone(path)
    # ... and the Python API takes it with an explicit head count
    loaded = load_meta_checkpoint(path, num_heads=2).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        ref = model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(loaded(pixel_values=x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    assert loaded.config.num_hidden_layers == 4 and loaded.config.num_register_tokens == 4


def test_pickled_code_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "fn": print}, path)
    with pytest.raises(ModelError, match="weights-only"):
        load_backbone(path)


def test_gated_weights_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        load_backbone("vitl16-sat")
    msg = str(err.value)
    assert "facebook/dinov3-vitl16-pretrain-sat493m" in msg and "gated" in msg
    assert "hf download" in msg and "--backbone ./" in msg


def test_unknown_name_and_bad_folder(tmp_path):
    with pytest.raises(ModelError, match="not a local path"):
        load_backbone("dinov9-huge")
    with pytest.raises(ModelError, match="no config.json"):
        load_backbone(tmp_path)


def test_registry_families_and_layers():
    assert len(REGISTRY) == 12
    assert REGISTRY[resolve_name("vitl16-sat")].family == "sat"
    assert REGISTRY[resolve_name("vit7b16-sat")].family == "sat"
    assert REGISTRY[resolve_name("vitb16")].family == "web"
    assert REGISTRY[resolve_name("convnext-large")].family == "web"
    assert REGISTRY[resolve_name("vits16")].layers == (2, 5, 8, 11)
    assert REGISTRY[resolve_name("vitl16")].layers == (4, 11, 17, 23)
    assert REGISTRY[resolve_name("vit7b16")].layers == (9, 19, 29, 39)
    assert set(ALIASES.values()) == set(REGISTRY)


def test_hub_id_family_follows_registry_for_a_local_copy(tmp_path):
    """A local copy named like the hub id keeps the satellite normalisation."""
    from transformers import DINOv3ViTModel

    local = tmp_path / "dinov3-vitl16-pretrain-sat493m"
    DINOv3ViTModel(tiny_config()).save_pretrained(local)
    assert load_backbone(local).info.family == "sat"
    other = tmp_path / "my-model"
    DINOv3ViTModel(tiny_config()).save_pretrained(other)
    assert load_backbone(other).info.family == "web"
    assert load_backbone(other, family="sat").info.family == "sat"


def test_convnext_grid_through_the_same_interface(tmp_path):
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])).save_pretrained(
        tmp_path / "cnx")
    bb = load_backbone(tmp_path / "cnx")
    out = bb(torch.randn(1, 3, 64, 96))
    assert bb.patch_size == 32 and out.patches.shape == (1, 64, 2, 3)
    assert out.registers.shape == (1, 0, 64) and len(out.layers) == 1
