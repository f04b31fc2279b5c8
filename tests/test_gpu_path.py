"""The GPU path, checked on a CPU: one compilation per run, safe batch sizes, reused host slots."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from geodino import batchsize, predict
from geodino.batchsize import INDEX_LIMIT, WindowCost, batch_size_for, chmv2_cost, model_cost
from geodino.errors import ConfigError
from geodino.feed import SlotPool
from geodino.predict import ModelBundle

GB = 10**9


def _windows(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture()
def bundle(tiny_models):
    return ModelBundle(backbone=tiny_models["backbone"], canopy_head=tiny_models["canopy"],
                       landcover_head=tiny_models["landcover"], embeddings=True)


# --------------------------------------------------------------------------------------
# torch.compile: one compilation whatever the batch sizes


def test_compiled_run_compiles_once_whatever_the_batch_sizes(tiny_models, small_scene, monkeypatch):
    """Batches of 4, a last batch of 2, and direct calls of 3 and 1 windows: no new compilation."""
    from torch._dynamo.testing import CompileCounter

    from geodino.pipeline import RunOptions, build_run

    counter = CompileCounter()  # a backend that counts the graphs dynamo hands it, then runs them eagerly
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": counter}))
    torch._dynamo.reset()
    try:
        opts = {"backbone": tiny_models["backbone"], "canopy_head": tiny_models["canopy"], "window": 128,
                "overlap": 32, "batch_size": 4, "polygons": False}
        run = build_run(str(small_scene.scene), RunOptions(**opts, compile=True))
        assert run.bundle.batch_size == 4 and len(run.tiles) % 4 == 2  # the last batch is short
        run.bundle(_windows(4))
        compiled = counter.frame_count
        assert compiled == 1  # one graph: no graph breaks either
        heights = run.dataset["canopy_height"].values
        for n in (3, 1):
            run.bundle(_windows(n, seed=n))
        assert counter.frame_count == compiled  # no recompilation for short batches
    finally:
        torch._dynamo.reset()
    eager = build_run(str(small_scene.scene), RunOptions(**opts)).dataset["canopy_height"].values
    np.testing.assert_allclose(heights, eager, rtol=0, atol=1e-5)
    assert np.isfinite(heights).all()


def test_padding_to_the_batch_size_leaves_results_unchanged(bundle):
    x = _windows(3)
    direct = predict._infer_direct(bundle.load(), x, bundle.outputs())
    padded = predict._infer_staged(bundle.load(), x, bundle.outputs(), SlotPool(pin=False), 5, pad=True)
    assert set(padded) == {"canopy_height", "landcover", "embeddings"}
    for name in direct:
        assert padded[name].shape == direct[name].shape
        np.testing.assert_allclose(padded[name], direct[name], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# host slots


def test_staged_calls_reuse_one_slot_and_hand_out_copies(bundle):
    pool = SlotPool(pin=False)
    models, want = bundle.load(), bundle.outputs()
    first = predict._infer_staged(models, _windows(4, seed=1), want, pool, 4)
    lc = (4, 7) + first["landcover"].shape[-2:]  # logits on the patch grid (stitch.OutputSpec.upsample)
    with pool.lease((4, 3, 128, 128)) as slot:
        buffers = (slot.inputs.data_ptr(), slot.output("landcover", lc).data_ptr())
    for seed in (2, 3):
        x = _windows(4, seed=seed)
        got = predict._infer_staged(models, x, want, pool, 4)
        np.testing.assert_allclose(got["landcover"], predict._infer_direct(models, x, want)["landcover"], atol=1e-6)
    assert pool.created == 1
    with pool.lease((4, 3, 128, 128)) as slot:
        assert (slot.inputs.data_ptr(), slot.output("landcover", lc).data_ptr()) == buffers
        assert not np.shares_memory(first["landcover"], slot.output("landcover", lc).numpy())
    assert first["landcover"].flags["OWNDATA"]


def test_slot_pool_is_bounded_and_replaces_slots_of_another_shape():
    pool = SlotPool(pin=False, max_slots=2)
    shape = (2, 3, 16, 16)
    held, release, third = threading.Event(), threading.Event(), threading.Event()

    def hold():
        with pool.lease(shape):
            held.set()
            release.wait(10)

    def wait_for_slot():
        with pool.lease(shape):
            third.set()

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
        held.wait(10)
        held.clear()
    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    assert not third.wait(0.3)  # both slots leased: the third caller waits
    release.set()
    waiter.join(10)
    assert third.is_set() and pool.created == 2
    with pool.lease((1, 3, 16, 16)) as other:  # another window size: a free slot is dropped for it
        assert other.shape == (1, 3, 16, 16)
    assert pool.created == 3 and len(pool._free) == 2


def test_cpu_calls_neither_stage_nor_pin(bundle, monkeypatch):
    """The plain CPU path: the numpy batch is the model's input; no slot, no copy."""
    def no_staging(*a, **k):
        raise AssertionError("a CPU call without compilation must not go through a slot")

    monkeypatch.setattr(predict, "_infer_staged", no_staging)
    out = bundle(_windows(3))
    assert out["landcover"].shape == (3, 7, 8, 8)  # logits on the 16-pixel patch grid
    assert out["canopy_height"].shape == (3, 1, 128, 128)
    assert predict.pool_for(torch.device("cpu")).pin is False


def test_the_inference_lock_covers_only_the_device_work(bundle, monkeypatch):
    """Filling a slot and copying results out happen outside the lock (in parallel with the GPU)."""
    lock = threading.Lock()
    seen = []
    monkeypatch.setattr(predict, "_INFER_LOCK", lock)
    for name in ("_stage_in", "_queue", "_stage_out"):
        real = getattr(predict, name)

        def spy(*a, _real=real, _name=name, **k):
            seen.append((_name, lock.locked()))
            return _real(*a, **k)

        monkeypatch.setattr(predict, name, spy)
    predict._infer_staged(bundle.load(), _windows(2), bundle.outputs(), SlotPool(pin=False), 2)
    assert seen == [("_stage_in", False), ("_queue", True), ("_stage_out", False)]


# --------------------------------------------------------------------------------------
# batch size 0: from free memory, within kernel limits


def _vitl_config():
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           num_register_tokens=4, patch_size=16)


def _fake_bundle(token: str, *, heads=None, chm=None):
    """A bundle whose loaded 'models' are ViT-L facts on a CUDA device (no weights, no GPU)."""
    from geodino.backbone import REGISTRY

    info = REGISTRY["facebook/dinov3-vitl16-pretrain-sat493m"]
    backbone = SimpleNamespace(model=SimpleNamespace(config=_vitl_config()), info=info, patch_size=16,
                               embed_dim=1024, layers=info.layers, device=torch.device("cuda"))
    return SimpleNamespace(token=token, embeddings=False, load=lambda: (backbone, heads or {}, chm))


def _head(task: str, kind: str):
    from geodino.classes import WORLDCOVER
    from geodino.heads import HeadMeta, build_head

    return build_head(HeadMeta(task=task, head_type=kind, embed_dim=1024, num_layers=4, backbone="vitl16-sat",
                               backbone_layers=[4, 11, 17, 23],
                               classes=WORLDCOVER.to_dict() if task == "landcover" else None))


@pytest.fixture()
def gpu_140gb(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (140 * GB, 141 * GB))
    monkeypatch.setattr(predict, "_AUTO_BATCH", {})


@pytest.mark.parametrize("case", ["vitl-landcover", "vitl-dpt-canopy", "chmv2"])
def test_batch_size_0_on_140_gb_keeps_every_tensor_indexable(gpu_140gb, case):
    from transformers import CHMv2Config

    heads = {"vitl-landcover": {"landcover": _head("landcover", "linear")},
             "vitl-dpt-canopy": {"canopy": _head("canopy", "dpt")}}.get(case, {})
    chm = SimpleNamespace(config=CHMv2Config()) if case == "chmv2" else None  # the released architecture
    bundle = _fake_bundle(case, heads=heads, chm=chm)
    batch = predict.auto_batch_size(bundle, 512)
    cost = model_cost(*bundle.load(), 512)
    assert 1 <= batch <= 64  # the ceiling: 64 windows of 512^2
    assert batch * cost.largest <= INDEX_LIMIT
    assert batch * cost.bytes <= 0.6 * 140 * GB
    if case == "chmv2":
        # 256 depth bins at 512^2 per window: 31 windows, not the 164 that crashed
        assert cost.largest == 256 * 512 * 512 and batch == 31
        assert batch * 256 * 256 * 256 < 2**31  # the fusion map that failed at [164, 256, 256, 256]
    else:
        assert batch == 64
    assert predict.auto_batch_size(bundle, 512) == batch  # one choice per process: one shape to compile


def test_free_memory_counts_what_the_allocator_caches_and_bounds_the_batch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GB, 141 * GB))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GB)
    assert predict.free_device_bytes(torch.device("cuda")) == 7 * GB
    cost = WindowCost(largest=1000, bytes=GB // 10)
    assert batch_size_for(cost, 512, 7 * GB) == 42  # memory binds: 0.6 x 7 GB / 0.1 GB


def test_a_window_too_large_for_the_kernels_is_a_clear_error():
    from transformers import CHMv2Config

    with pytest.raises(ConfigError, match="use a smaller --window"):
        batch_size_for(chmv2_cost(CHMv2Config(), 4096), 4096, 140 * GB)


def test_calls_larger_than_the_index_limit_allows_are_split(bundle, monkeypatch):
    largest = model_cost(*bundle.load(), 128, embeddings=True).largest
    monkeypatch.setattr(batchsize, "INDEX_LIMIT", 3 * largest)  # room for 3 windows per call
    sizes = []
    real = predict._forward

    def spy(models, x, want):
        sizes.append(len(x))
        return real(models, x, want)

    monkeypatch.setattr(predict, "_forward", spy)
    x = _windows(8)
    whole = bundle.with_batch_size(8)(x)
    assert sizes == [3, 3, 2]
    parts = [bundle(x[i:i + 1]) for i in range(8)]
    for name in whole:
        np.testing.assert_allclose(whole[name], np.concatenate([p[name] for p in parts]), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# the estimates against the tensors the real modules make


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements any operator output had."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_per_window(fn, window: int) -> int:
    x = torch.from_numpy(_windows(1, window))
    with torch.inference_mode(), _LargestTensor() as mode:
        fn(x)
    return mode.largest


def test_estimates_bound_the_largest_tensor_of_the_real_modules(bundle, tmp_path):
    from geodino.backbone import save_tiny_chmv2
    from geodino.predict import load_chmv2, run_chmv2

    window = 128
    backbone, heads, _ = bundle.load()
    measured = _largest_per_window(lambda x: bundle(x.numpy()), window)
    assert measured <= model_cost(backbone, heads, None, window, embeddings=True).largest
    feats = backbone(torch.from_numpy(_windows(1, window)))
    canopy = _largest_per_window(lambda x: heads["canopy"](feats.layers, (window, window)), window)
    assert canopy <= batchsize.dpt_head_cost(hidden=heads["canopy"].meta.hidden, grid=64, window=window).largest
    chm = load_chmv2(str(save_tiny_chmv2(tmp_path / "chm")), torch.device("cpu"))
    measured = _largest_per_window(lambda x: run_chmv2(chm, x, (window, window)), window)
    # the depth bins at full resolution: the estimate is exact where it matters most
    assert measured == chmv2_cost(chm.config, window).largest == chm.config.number_output_channels * window ** 2
