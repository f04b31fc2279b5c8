"""What to tell a user whose first ``geodino run SCENE --out DIR`` names no model.

geodino ships no real weights (DINOv3 is gated), so a run without a model cannot make a
real map. Rather than fall back silently to a gated download or to the demo model, the run
stops (exit 2) with the commands that do work on this machine for this scene: the bundled
demo model with the sensor profile that fits the scene, Meta's canopy model from a local
copy, fitting a head with ``geodino fit``, and embeddings with the default backbone.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from geodino.options import DEFAULT_BACKBONE

DEMO_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"


def _shown(path: Path) -> str:
    """A path as short as it can be written from the current directory."""
    try:
        rel = os.path.relpath(path)
        return str(path) if rel.startswith("..") else rel
    except ValueError:  # another drive on Windows
        return str(path)


def _profile_for(scene: str) -> str | None:
    try:
        from geodino.scene import open_scene
        from geodino.sensor import suggest_profile

        fit = suggest_profile(open_scene(scene))
    except Exception:  # noqa: BLE001 (an unreadable scene fails later with its own message)
        return None
    return fit[0] if fit else None


def nothing_to_compute(scene: str | None = None, out: str | None = None) -> str:
    """The message: one line saying what is missing, then the commands that work here."""
    s = shlex.quote(scene) if scene else "SCENE.tif"
    o = shlex.quote(str(out)) if out else "maps"
    profile = _profile_for(scene) if scene else None
    p = f" --profile {profile}" if profile else ""
    lines = [("nothing to compute: no model was given (a canopy head, a land-cover head, a canopy model or "
              "--embeddings). Commands that work here:")]
    if DEMO_PIPELINE.exists():
        lines.append(f"  the bundled demo model (illustrative maps only): geodino run {s} --out {o} "
                     f"--pipeline {_shown(DEMO_PIPELINE)}{p}")
    lines.append("  Meta's canopy-height model (gated: hf download facebook/dinov3-vitl16-chmv2-dpt-head --local-dir "
                 "./chmv2 and facebook/dinov3-vitl16-pretrain-sat493m --local-dir ./vitl16-sat once): "
                 f"geodino run {s} --out {o} --canopy-model ./chmv2 --backbone ./vitl16-sat{p}")
    lines.append(f"  a head of your own: geodino fit canopy --scene {s} --labels HEIGHTS.tif --backbone ./vitl16-sat "
                 f"--out heads/canopy, then geodino run {s} --out {o} --backbone ./vitl16-sat "
                 f"--canopy-head heads/canopy{p}")
    lines.append(f"  embeddings only: geodino run {s} --out {o} --embeddings --backbone ./vitl16-sat{p} "
                 f"(the default backbone, {DEFAULT_BACKBONE}, needs the same gated download)")
    return "\n".join(lines)
