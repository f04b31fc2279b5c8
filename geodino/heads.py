"""Task heads on frozen DINOv3 features: canopy height (metres) and land cover (classes).

A saved head is self-describing, as a transformers model is: ``head.safetensors`` holds the
weights, ``head.json`` the type, hyper-parameters, backbone id and layers, sensor profile,
window, class table or units, and a summary of the data and metrics it was fitted with.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geodino.classes import ClassTable
from geodino.errors import ModelError

HEAD_FILE = "head.safetensors"
META_FILE = "head.json"


@dataclass
class HeadMeta:
    """Everything needed to use a head again, stored beside its weights."""

    task: str  # "canopy" or "landcover"
    head_type: str  # "dpt", "linear"
    embed_dim: int
    num_layers: int
    backbone: str
    backbone_layers: list[int]
    patch_size: int = 16
    profile: str = "auto"
    family: str = "sat"
    window: int = 512
    overlap: int = 64
    hidden: int = 64
    classes: dict | None = None
    units: str | None = None
    max_height: float = 80.0
    gsd: float | None = None  # pixel size (m) of the scene it was fitted on; None: not recorded
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class LandCoverHead(nn.Module):
    """BatchNorm + linear classifier over concatenated normed layers, logits upsampled to pixels."""

    def __init__(self, meta: HeadMeta) -> None:
        super().__init__()
        self.meta = meta
        channels = meta.embed_dim * meta.num_layers
        self.bn = nn.BatchNorm2d(channels)
        self.classifier = nn.Conv2d(channels, len(ClassTable.from_dict(meta.classes)), kernel_size=1)

    @property
    def classes(self) -> ClassTable:
        return ClassTable.from_dict(self.meta.classes)

    def patch_logits(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.bn(torch.cat(list(layers), dim=1)))

    def forward(self, layers: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.patch_logits(layers)
        if size is None:
            size = (logits.shape[-2] * self.meta.patch_size, logits.shape[-1] * self.meta.patch_size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class _ResidualConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.skip = _ResidualConv(c)
        self.refine = _ResidualConv(c)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, upsample: bool = True) -> torch.Tensor:
        if skip is not None:
            x = x + self.skip(skip)
        x = self.refine(x)
        if upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(x)


class CanopyHeightHead(nn.Module):
    """Canopy height in metres at full input resolution (non-negative).

    ``dpt``: a DPT-style decoder: the four normed layers are reassembled at 4x, 2x, 1x and
    1/2x the patch grid, fused coarse to fine with residual convolutions, and upsampled to
    pixels. ``linear``: BatchNorm + 1x1 convolution over the concatenated layers, bilinear
    upsampling. Both end in ReLU, so 0 m is reachable and negative heights are impossible.
    """

    def __init__(self, meta: HeadMeta) -> None:
        super().__init__()
        self.meta = meta
        d, n, c = meta.embed_dim, meta.num_layers, meta.hidden
        if meta.head_type == "linear":
            self.bn = nn.BatchNorm2d(d * n)
            self.proj = nn.Conv2d(d * n, 1, kernel_size=1)
        elif meta.head_type == "dpt":
            if n != 4:
                raise ModelError("the DPT canopy head takes exactly 4 intermediate layers")
            self.project = nn.ModuleList(nn.Conv2d(d, c, 1) for _ in range(4))
            self.resample = nn.ModuleList([
                nn.ConvTranspose2d(c, c, 4, stride=4),
                nn.ConvTranspose2d(c, c, 2, stride=2),
                nn.Identity(),
                nn.Conv2d(c, c, 3, stride=2, padding=1),
            ])
            self.fusion = nn.ModuleList(_Fusion(c) for _ in range(4))
            self.output = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(c // 2, 1, 1))
        else:
            raise ModelError(f"unknown canopy head type {meta.head_type!r}; use dpt or linear")

    def raw(self, layers: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Heights before the final ReLU, (B, 1, H, W)."""
        gh, gw = layers[0].shape[-2:]
        if size is None:
            size = (gh * self.meta.patch_size, gw * self.meta.patch_size)
        if self.meta.head_type == "linear":
            x = self.proj(self.bn(torch.cat(list(layers), dim=1)))
        else:
            feats = [r(p(x)) for x, p, r in zip(layers, self.project, self.resample)]
            x = self.fusion[3](feats[3])
            x = x[..., : feats[2].shape[-2], : feats[2].shape[-1]]
            x = self.fusion[2](x, feats[2])
            x = self.fusion[1](x, feats[1])
            x = self.fusion[0](x, feats[0], upsample=False)  # 4x the patch grid (4 px cells)
            x = self.output(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, layers: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        return F.relu(self.raw(layers, size))


HEAD_CLASSES = {"canopy": CanopyHeightHead, "landcover": LandCoverHead}


def build_head(meta: HeadMeta) -> nn.Module:
    try:
        return HEAD_CLASSES[meta.task](meta)
    except KeyError:
        raise ModelError(f"unknown head task {meta.task!r}") from None


def save_head(head: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``head.safetensors`` + ``head.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out / HEAD_FILE))
    (out / META_FILE).write_text(json.dumps(asdict(head.meta), indent=2))
    return out


def load_head(path: str | os.PathLike, *, backbone=None) -> nn.Module:
    """Load a saved head; with ``backbone``, check that it was fitted on that backbone."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / META_FILE).exists() or not (p / HEAD_FILE).exists():
        what = "does not exist" if not p.exists() else f"is not a geodino head folder (no {META_FILE} and {HEAD_FILE})"
        raise ModelError(f"{p} {what}: fit a head on a labelled scene first, e.g. `geodino fit canopy --scene S.tif "
                         f"--labels HEIGHTS.tif --backbone B --out {p}` (land cover: geodino fit landcover), or run "
                         "without it (geodino run SCENE --out DIR lists what works)")
    data = json.loads((p / META_FILE).read_text())
    try:
        meta = HeadMeta(**data)
    except TypeError as e:
        raise ModelError(f"{p / META_FILE}: unexpected content ({e})") from None
    head = build_head(meta)
    head.load_state_dict(load_file(str(p / HEAD_FILE)))
    head.eval()
    if backbone is not None:
        check_compatible(head, backbone, p)
    return head


def check_compatible(head: nn.Module, backbone, where) -> None:
    meta = head.meta
    if meta.embed_dim != backbone.embed_dim or list(meta.backbone_layers) != list(backbone.layers):
        raise ModelError(
            f"{where}: this {meta.task} head was fitted on backbone {meta.backbone} "
            f"(dim {meta.embed_dim}, layers {meta.backbone_layers}); the loaded backbone {backbone.name} has "
            f"dim {backbone.embed_dim}, layers {list(backbone.layers)}. Use --backbone {meta.backbone} "
            "or fit a head for this backbone.")
    same_name = Path(str(meta.backbone)).name == Path(str(backbone.name)).name or meta.backbone == backbone.name
    if not same_name:
        raise ModelError(f"{where}: this {meta.task} head was fitted on backbone {meta.backbone}, not "
                         f"{backbone.name}; features of different backbones are not interchangeable. "
                         f"Use --backbone {meta.backbone} or fit a head for this backbone.")
