"""Fit canopy and land-cover heads on one synthetic scene, evaluate on a held-out one.

    python bench/heads_quality.py [--backbone DIR] [--save-model data_samples/model]

Fits with `geodino fit` semantics (train.fit), runs the full pipeline on a scene generated
with another seed, and compares the maps with that scene's ground truth and with trivial
baselines (the training mean height; the training majority class). Prints JSON.
With --save-model, the backbone and both heads are copied there (the bundled demo model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default=None, help="backbone folder (default: a new tiny DINOv3, seed 0)")
    ap.add_argument("--train-size", type=int, default=2048)
    ap.add_argument("--test-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--save-model", default=None)
    args = ap.parse_args()

    from geodino.backbone import save_tiny_backbone
    from geodino.metrics import ClassAccumulator, HeightAccumulator, evaluate_rasters
    from geodino.pipeline import RunOptions, build_run, write_scene
    from geodino.synth import SynthConfig, generate
    from geodino.train import FitConfig, fit

    work = CACHE / "heads_quality"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    backbone = args.backbone or str(save_tiny_backbone(work / "backbone", seed=0))
    train = generate(work / "train", SynthConfig(width=args.train_size, height=args.train_size, seed=3))
    test = generate(work / "test", SynthConfig(width=args.test_size, height=args.test_size, seed=27,
                                                  nodata_collar=True))
    t0 = time.perf_counter()
    fits = {}
    for task, labels in (("canopy", train.canopy_height), ("landcover", train.landcover)):
        r = fit(FitConfig(task=task, scene=str(train.scene), labels=str(labels), backbone=backbone,
                          out=str(work / task), profile="reflectance", epochs=args.epochs, window=256,
                          cache_dir=str(work / "cache")), progress=False)
        fits[task] = r
    fit_seconds = time.perf_counter() - t0
    opts = RunOptions(backbone=backbone, canopy_head=str(work / "canopy"), landcover_head=str(work / "landcover"))
    report = write_scene(build_run(str(test.scene), opts), work / "maps", quiet=True)
    chm = evaluate_rasters(work / "maps" / "canopy_height.tif", test.canopy_height, "canopy")
    lc = evaluate_rasters(work / "maps" / "landcover.tif", test.landcover, "landcover")

    # trivial baselines on the same held-out pixels
    mean_h = fits["canopy"].baseline["training_mean"]
    majority = fits["landcover"].baseline["majority_class"]
    from geodino.classes import WORLDCOVER

    code = WORLDCOVER.codes[WORLDCOVER.names.index(majority)]
    with rasterio.open(test.canopy_height) as a, rasterio.open(test.landcover) as b:
        ref_h, ref_c = a.read(1), b.read(1)
    hb = HeightAccumulator()
    hb.update(np.where(np.isfinite(ref_h), mean_h, np.nan), ref_h)
    cb = ClassAccumulator(WORLDCOVER.codes)
    cb.update(np.where(ref_c > 0, code, 0), ref_c)

    def brief(m):
        return {k: v for k, v in m.items() if k not in ("confusion_matrix", "prediction", "reference")}

    out = {"benchmark": "heads_quality", "machine": machine(),
           "train_scene": f"synth seed 3, {args.train_size}^2", "test_scene": f"synth seed 27, {args.test_size}^2",
           "fit_seconds": round(fit_seconds, 1), "run_seconds": report["seconds"],
           "canopy": {"model": brief(chm), "baseline_training_mean": brief(hb.result()),
                      "validation_in_training_scene": brief(fits["canopy"].metrics)},
           "landcover": {"model": brief(lc), "baseline_majority_class": brief(cb.result(WORLDCOVER.names)),
                         "validation_in_training_scene": brief(fits["landcover"].metrics)}}
    print(json.dumps(out, indent=2))
    if args.save_model:
        dest = Path(args.save_model)
        dest.mkdir(parents=True, exist_ok=True)
        for name, src in (("backbone", Path(backbone)), ("canopy_head", work / "canopy"),
                          ("landcover_head", work / "landcover")):
            if (dest / name).exists():
                shutil.rmtree(dest / name)
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(".feature-cache"))
        (dest / "quality.json").write_text(json.dumps(out, indent=2))
        relocate(dest, out)


def relocate(dest: Path, quality: dict) -> None:
    """Make the copied heads name their backbone by its folder in the bundle, not a temp path."""
    for head in ("canopy_head", "landcover_head"):
        meta_path = dest / head / "head.json"
        meta = json.loads(meta_path.read_text())
        meta["backbone"] = "backbone"
        meta["training"]["scene"] = quality["train_scene"]
        meta["training"]["labels"] = f"{'canopy_height' if head == 'canopy_head' else 'landcover'}.tif of that scene"
        meta_path.write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
