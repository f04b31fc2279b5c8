from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


def realdata(name: str) -> Path:
    """A file from ../shared/realdata, or a skip where that folder is absent (a user's clone)."""
    path = REALDATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real test rasters live beside the checkout)")
    return path


@pytest.fixture(scope="session")
def small_scene(tmp_path_factory):
    """A 640 x 576 synthetic scene with ground truth (not square, not a window multiple)."""
    from geodino.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("small_scene")
    return generate(out, SynthConfig(width=640, height=576, seed=9))


@pytest.fixture(scope="session")
def collar_scene(tmp_path_factory):
    """A synthetic scene with a rotated nodata collar."""
    from geodino.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("collar_scene")
    return generate(out, SynthConfig(width=800, height=700, seed=11, nodata_collar=True))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny DINOv3 saved like a user's local copy, with untrained (random) heads on it."""
    import torch

    from geodino.backbone import load_backbone, save_tiny_backbone
    from geodino.classes import WORLDCOVER
    from geodino.heads import HeadMeta, build_head, save_head

    root = tmp_path_factory.mktemp("tiny_models")
    bb_dir = save_tiny_backbone(root / "backbone", seed=0)
    bb = load_backbone(bb_dir)
    torch.manual_seed(0)
    paths = {"backbone": str(bb_dir)}
    for task, kind in (("canopy", "dpt"), ("landcover", "linear")):
        meta = HeadMeta(task=task, head_type=kind, embed_dim=bb.embed_dim, num_layers=len(bb.layers),
                        backbone=str(bb_dir), backbone_layers=list(bb.layers), profile="reflectance",
                        classes=WORLDCOVER.to_dict() if task == "landcover" else None,
                        units="m" if task == "canopy" else None, window=128, overlap=32)
        head = build_head(meta).eval()
        with torch.no_grad():  # give the untrained BatchNorm some spread so outputs vary
            for m in head.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.fill_(0.05)
        paths[task] = str(save_head(head, root / task))
    return paths
