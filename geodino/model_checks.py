"""Does the model fit the scene? Warnings for maps that would be confident nonsense.

Two checks run before any window is computed, each a one-line warning on the ``geodino``
logger (stderr by default, so the CLI and a notebook both show it):

- the bundled demo model (a tiny random-weight network with heads fitted on synthetic
  scenes) on anything but its own sample scene: its maps are illustrative only;
- a scene whose pixel size is more than 2x away from the pixel size a head was fitted at
  (or the SAT backbone's 0.6 m for Meta's canopy model): the warning names ``--target-gsd``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("geodino")

SAMPLE_SCENE = Path(__file__).resolve().parents[1] / "data_samples" / "scene" / "scene.tif"
BACKBONE_META = "geodino_backbone.json"
SAT_GSD = 0.6  # DINOv3 SAT-493M (and so CHMv2) was trained on 0.6 m Maxar imagery
GSD_TOLERANCE = 2.0


def is_demo_model(backbone: str | os.PathLike | None) -> bool:
    """Whether ``backbone`` is geodino's demo model or another random-weight stand-in.

    Such folders carry ``"demo_model": true`` (the bundled one) or ``"random_weights": true``
    (``save_tiny_backbone``) in their ``geodino_backbone.json``; real DINOv3 weights never do.
    """
    if not backbone:
        return False
    meta = Path(str(backbone)).expanduser() / BACKBONE_META
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text())
    except ValueError:
        return False
    return bool(data.get("demo_model") or data.get("random_weights"))


def is_bundled_sample(scene_paths: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
    paths = [scene_paths] if isinstance(scene_paths, (str, os.PathLike)) else list(scene_paths)
    try:
        return len(paths) == 1 and Path(paths[0]).resolve() == SAMPLE_SCENE
    except OSError:
        return False


def demo_warning(backbone, scene_paths) -> str | None:
    if not is_demo_model(backbone) or is_bundled_sample(scene_paths):
        return None
    return ("warning: the demo model (a tiny random-weight network, heads fitted on synthetic scenes) makes "
            "illustrative maps only; for real maps use a DINOv3 backbone with heads fitted on it (geodino fit) "
            "or Meta's canopy model (--canopy-model)")


def gsd_warnings(scene_gsd: float | None, fitted: Mapping[str, float | None]) -> list[str]:
    """One warning per model whose fitted pixel size is more than 2x from the scene's."""
    if not scene_gsd:
        return []
    apart: dict[float, list[str]] = {}
    for what, gsd in fitted.items():
        if gsd and max(scene_gsd / gsd, gsd / scene_gsd) > GSD_TOLERANCE:
            apart.setdefault(float(gsd), []).append(what)
    return [f"warning: the scene has {scene_gsd:.3g} m pixels, the {' and the '.join(whats)} "
            f"{'was' if len(whats) == 1 else 'were'} fitted at {gsd:g} m (more than {GSD_TOLERANCE:g}x apart): "
            f"resample with --target-gsd {gsd:g}" + _coarse_note(scene_gsd / gsd) for gsd, whats in apart.items()]


def _coarse_note(ratio: float) -> str:
    if ratio <= 10:
        return ""
    return f" (upsampling {ratio:.0f}x adds no detail: imagery this coarse needs a model fitted at its pixel size)"


def scene_gsd(scene) -> float | None:
    grid = scene.grid
    return float(abs(grid.res[0])) if grid.crs is not None and grid.crs.is_projected else None


def check_model_fit(scene, backbone: str, heads: Mapping[str, object], canopy_model: str | None) -> list[str]:
    """Log (and return) the warnings for this scene and these models."""
    fitted = {f"{'land-cover' if task == 'landcover' else task} head": getattr(head.meta, "gsd", None)
              for task, head in heads.items()}
    if canopy_model:
        fitted["canopy model (CHMv2, SAT imagery)"] = SAT_GSD
    messages = [m for m in [demo_warning(backbone, scene.paths)] if m]
    messages += gsd_warnings(scene_gsd(scene), fitted)
    for m in messages:
        log.warning(m)
    return messages
