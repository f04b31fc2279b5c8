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
