"""How many windows one model call may take: kernel limits, free memory and a sane ceiling.

A window's cost to a model call is two numbers (:class:`WindowCost`): the largest single
tensor any step makes for it (elements) and the memory everything alive at the worst moment
takes (bytes). Both are estimated from the models' configurations, never measured on the
device, so the choice is a pure function of model facts and free bytes that tests check for
released models (ViT-L, CHMv2) without their weights.

Three limits bound a batch:

- **Kernel indexing.** Several CUDA kernels index with 32-bit integers and refuse outputs of
  more than ``2**31 - 1`` elements (``upsample_bilinear2d_nhwc`` failed at CHMv2's
  ``[164, 256, 256, 256]`` fusion map). A batch keeps ``batch x largest`` below that.
- **Memory.** ``batch x bytes`` fits in a fraction of the free device memory.
- **A ceiling** of :data:`MAX_BATCH_PIXELS` input pixels (64 windows of 512^2): the backbone
  ceilings in DESIGN.md were reached at batch 64, and bigger batches only grow the pinned
  host buffers and the results waiting to be blended.

The estimates are deliberately generous (float32 activations although CUDA runs bf16;
attention scores counted in memory as if SDPA fell back to its math kernel); tests compare
them with the tensors the real transformers and geodino modules make.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

INDEX_LIMIT = 2**31 - 1  # elements a 32-bit-indexed kernel accepts
MAX_BATCH_PIXELS = 64 * 512 * 512
FLOAT = 4  # bytes per activation (float32: an upper bound for bf16 autocast too)


@dataclass(frozen=True)
class WindowCost:
    """One window's cost in a model call: largest single tensor (elements), peak memory (bytes)."""

    largest: int
    bytes: int

    def then(self, other: WindowCost) -> WindowCost:
        """A model that runs while this one's results are still held (a head after the backbone)."""
        return WindowCost(max(self.largest, other.largest), self.bytes + other.bytes)


def vit_cost(*, dim: int, depth: int, heads: int, mlp_hidden: int, registers: int, patch: int,
             window: int, gated: bool = False) -> WindowCost:
    """A DINOv3 ViT called with ``output_hidden_states`` (every block's output is kept)."""
    grid = (window // patch) ** 2
    tokens = grid + 1 + registers
    attention = heads * tokens * tokens  # scores, were SDPA to run its math kernel
    mlp = tokens * mlp_hidden
    kept = (depth + 1) * tokens * dim
    transient = max(2 * attention, (3 if gated else 2) * mlp) + 4 * tokens * dim  # + q, k, v, output
    # Attention scores count as memory but not as a tensor to index: geodino loads ViTs with
    # SDPA, whose flash and memory-efficient kernels (CUDA, and CPU) never make them.
    return WindowCost(max(mlp, tokens * dim), FLOAT * (kept + transient + 3 * window * window))


def convnext_cost(*, dims: Sequence[int], window: int) -> WindowCost:
    """A DINOv3 ConvNeXt: stage i runs at window / 2**(i + 2) with a 4x pointwise expansion."""
    maps = [(window // 2 ** (i + 2)) ** 2 * d for i, d in enumerate(dims)]
    return WindowCost(4 * maps[0], FLOAT * (sum(maps) + 6 * maps[0] + 3 * window * window))


def layer_grids_cost(*, dim: int, layers: int, grid: int) -> WindowCost:
    """geodino's normed intermediate layers as float32 (dim, h, w) grids (and their norm)."""
    n = layers * dim * grid
    return WindowCost(dim * grid, FLOAT * 2 * n)


def linear_head_cost(*, dim: int, layers: int, grid: int, channels: int, window: int) -> WindowCost:
    """BatchNorm + 1x1 conv over the concatenated layers, logits upsampled to pixels (+ softmax)."""
    concat = layers * dim * grid
    full = channels * window * window
    return WindowCost(max(concat, full), FLOAT * (2 * concat + 3 * full))


def dpt_head_cost(*, hidden: int, grid: int, window: int) -> WindowCost:
    """geodino's DPT canopy head: maps of ``hidden`` channels up to 4x the patch grid."""
    fine = hidden * 16 * grid  # one map at 4x the patch grid
    kept = hidden * grid * (16 + 4 + 1 + 1)  # the four resampled layers
    return WindowCost(max(fine, window * window), FLOAT * (kept + 6 * fine + 3 * window * window))


def chmv2_head_cost(*, fusion: int, head_hidden: int, bins: int, channels: Sequence[int],
                    factors: Sequence[float], dim: int, grid_side: int) -> WindowCost:
    """transformers' CHMv2 DPT decoder and depth-bin head.

    Reassembled maps at ``factor x`` the patch grid; the fusion chain doubles the resolution
    at each stage and ends at 2 x the finest map (window / 2 for factors up to 4), with
    ``fusion`` channels; the head upsamples 2x again and makes ``bins`` logits per pixel,
    which the mixlog normalisation turns into weights (several maps of that size alive).
    """
    grid = grid_side * grid_side
    reassembled = sum(c * int(f * grid_side) ** 2 for c, f in zip(channels, factors))
    readout = 3 * dim * grid  # [patch, cls] concatenation and its projection
    side = 2 * int(max(factors) * grid_side)  # the fusion chain's output
    fused = fusion * side * side
    out = (2 * side) ** 2  # the head's output resolution
    largest = max(fused, max(fusion // 2, head_hidden, bins) * out)
    total = 2 * reassembled + readout + 4 * fused + (fusion // 2 + 2 * head_hidden + 4 * bins) * out
    return WindowCost(largest, FLOAT * total)


def index_limit(cost: WindowCost, window: int) -> int:
    """The most windows whose largest tensor stays within :data:`INDEX_LIMIT` elements."""
    from geodino.errors import ConfigError

    limit = INDEX_LIMIT // cost.largest
    if limit < 1:
        raise ConfigError(f"a {window} px window makes a tensor of {cost.largest:,} elements in this model, more "
                          f"than GPU kernels index ({INDEX_LIMIT:,}); use a smaller --window")
    return limit


def batch_size_for(cost: WindowCost, window: int, free_bytes: int | None, fraction: float = 0.6) -> int:
    """The largest batch within the index limit, ``fraction`` of ``free_bytes`` and the ceiling.

    ``free_bytes`` None: no memory bound (the caller's choice stands, only kernel limits apply).
    """
    limits = [index_limit(cost, window), max(1, MAX_BATCH_PIXELS // (window * window))]
    if free_bytes is not None:
        limits.append(int(free_bytes * fraction // cost.bytes))
    return max(1, min(limits))


def model_cost(backbone, heads: Mapping[str, object], chm, window: int, embeddings: bool = False) -> WindowCost:
    """The cost of one window through geodino's loaded models (backbone, heads, CHMv2).

    geodino's backbone runs only for heads or embeddings (CHMv2 brings its own).
    """
    cost = WindowCost(1, 0)
    grid = (window // backbone.patch_size) ** 2
    if heads or embeddings or chm is None:
        config = getattr(backbone.model, "_orig_mod", backbone.model).config  # through torch.compile
        if backbone.info.arch == "convnext":
            cost = convnext_cost(dims=config.hidden_sizes, window=window)
        else:
            cost = vit_backbone_cost(config, window)
        cost = cost.then(layer_grids_cost(dim=backbone.embed_dim, layers=len(backbone.layers), grid=grid))
    for head in heads.values():
        meta = head.meta
        if meta.task == "canopy" and meta.head_type == "dpt":
            cost = cost.then(dpt_head_cost(hidden=meta.hidden, grid=grid, window=window))
        else:
            channels = len(head.classes) if meta.task == "landcover" else 1
            cost = cost.then(linear_head_cost(dim=meta.embed_dim, layers=meta.num_layers, grid=grid,
                                              channels=channels, window=window))
    if chm is not None:
        cost = cost.then(chmv2_cost(chm.config, window))
    return cost


def vit_backbone_cost(config, window: int) -> WindowCost:
    """:func:`vit_cost` from a transformers DINOv3ViTConfig."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return vit_cost(dim=config.hidden_size, depth=config.num_hidden_layers, heads=config.num_attention_heads,
                    mlp_hidden=config.intermediate_size, registers=config.num_register_tokens or 0,
                    patch=patch, window=window, gated=bool(getattr(config, "use_gated_mlp", False)))


def chmv2_cost(config, window: int) -> WindowCost:
    """Backbone plus DPT decoder of a transformers CHMv2Config."""
    bb = config.backbone_config
    head = chmv2_head_cost(fusion=config.fusion_hidden_size, head_hidden=config.head_hidden_size,
                           bins=config.number_output_channels, channels=config.post_process_channels,
                           factors=config.reassemble_factors, dim=bb.hidden_size,
                           grid_side=window // config.patch_size)
    return vit_backbone_cost(bb, window).then(head)
