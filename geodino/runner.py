"""Running many scenes into an output folder, resuming finished ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import rasterio

from geodino.options import RunOptions
from geodino.pipeline import build_run, write_scene
from geodino.report import REPORT

OUTPUT_NAMES = ("canopy_height.tif", "landcover.tif", "landcover_probability.tif", "embeddings.tif",
                "landcover.gpkg", REPORT, "quicklook.png", "landcover.qml", "canopy_height.qml")


def is_complete(out_dir: Path) -> bool:
    """Whether a scene's outputs are all there and readable (a finished earlier run)."""
    report = out_dir / REPORT
    if not report.exists():
        return False
    try:
        data = json.loads(report.read_text())
    except ValueError:
        return False
    if not data.get("complete"):
        return False
    for name in data.get("outputs", {}).values():
        p = out_dir / name
        if not p.exists():
            return False
        if p.suffix == ".tif":
            try:
                with rasterio.open(p) as src:
                    src.read(1, window=((0, 1), (0, 1)))
            except rasterio.errors.RasterioError:
                return False
    return True


def scene_out_dir(out: Path, scene: str, many: bool) -> Path:
    return out / Path(scene).stem if many else out


def run_scenes(scenes: Sequence[str], out: str | Path, options: RunOptions, *, overwrite: bool = False,
               quiet: bool = False, log=print) -> list[dict]:
    """Run each scene into its own folder (or ``out`` itself for one scene); skip finished ones."""
    out = Path(out)
    many = len(scenes) > 1
    reports = []
    for scene in scenes:
        target = scene_out_dir(out, scene, many)
        if not overwrite and is_complete(target):
            log(f"{scene}: outputs complete in {target}, skipped")
            reports.append(json.loads((target / REPORT).read_text()))
            continue
        if not overwrite:
            # a half-finished earlier run may have left some of our outputs (never other files)
            for name in OUTPUT_NAMES:
                (target / name).unlink(missing_ok=True)
        run = build_run(scene, options)
        reports.append(write_scene(run, target, overwrite=True, quiet=quiet))
        log(f"{scene}: {reports[-1]['windows']} windows in {reports[-1]['seconds']} s -> {target}")
    return reports


__all__ = ["run_scenes", "is_complete", "scene_out_dir"]
