"""Detection quality of `geodino change` on the synthetic pair (`geodino synth --change`), with baselines.

Runs the change pipeline with the bundled demo model (pipelines/demo.yaml) on a synthetic
pair with known truth and measures, for canopy loss (the "canopy loss" polygons of
change.gpkg: height fell by >= 5 m to below the 2 m gap height, after the dates' radiometric
match; polygons of at least --min-area m²):

- clear-cut area: total area of the loss polygons / the truth clear-cut area (target 0.85-1.15);
- loss-polygon IoU with the truth clear-cut (target >= 0.6);
- false loss on unchanged forest: share of the truth's unchanged tree cover inside loss
  polygons (target < 5%).

Baselines on the same pair: no change at all; NDVI differencing (loss where NDVI drops by more
than 0.2, regions under --min-area dropped), the usual label-free method; and an oracle that
applies the same -5 m rule to the *true* canopy heights (what perfect height maps would give);
and the previous rule on geodino's own change raster (any fall of 5 m counted as loss, the
same min-area), for comparison. ``--no-radiometric-match`` runs the ablation.

    python bench/change_quality.py --size 2048 --seed 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.features import rasterize

REPO = Path(__file__).resolve().parents[1]


def _scores(loss: np.ndarray, truth: dict, px: float) -> dict:
    cut, unchanged_forest = truth["clearcut"], truth["unchanged_forest"]
    union = np.logical_or(loss, cut).sum()
    return {"loss_area_m2": round(float(loss.sum() * px), 1),
            "clearcut_area_ratio": round(float(loss.sum() / cut.sum()), 3),
            "iou": round(float(np.logical_and(loss, cut).sum() / union), 3) if union else 0.0,
            "false_loss_on_unchanged_forest": round(float(loss[unchanged_forest].mean()), 4)}


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    from skimage.morphology import remove_small_objects

    return remove_small_objects(mask, max_size=max(0, int(np.ceil(min_pixels)) - 1), connectivity=1) \
        if min_pixels > 1 else mask


def _ndvi(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as src:
        img = src.read().astype(np.float64)
        valid = src.read_masks(1) > 0
    red, nir = img[2], img[3]
    return (nir - red) / np.maximum(nir + red, 1.0), valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--min-area", type=float, default=50.0, help="m²; polygons and baseline regions smaller are dropped")
    parser.add_argument("--work", type=Path, default=None, help="keep the pair and outputs here (a pair already "
                        "there is reused)")
    parser.add_argument("--no-radiometric-match", action="store_true", help="ablation: dates as they are")
    args = parser.parse_args()

    from geodino.change_run import build_change
    from geodino.change_write import write_change
    from geodino.options import load_pipeline
    from geodino.synth import TREE, SynthConfig, landcover_at
    from geodino.synth_change import CLEARCUT, UNCHANGED, generate_pair

    work = args.work or Path(tempfile.mkdtemp(prefix="geodino-change-quality-"))
    cfg = SynthConfig(width=args.size, height=args.size, seed=args.seed, nodata_collar=True)
    pair_dir = work / "pair"
    if (pair_dir / "truth_canopy_change.tif").exists() and (pair_dir / "pair.json").exists() \
            and json.loads((pair_dir / "pair.json").read_text()) == {"size": args.size, "seed": args.seed}:
        before, after = pair_dir / "before" / "scene.tif", pair_dir / "after" / "scene.tif"
        truth_change, truth_chm = pair_dir / "truth_change.tif", pair_dir / "truth_canopy_change.tif"
    else:
        pair = generate_pair(pair_dir, cfg, overwrite=True)
        before, after, truth_change, truth_chm = pair.before.scene, pair.after.scene, pair.truth_change, \
            pair.truth_canopy_change
        (pair_dir / "pair.json").write_text(json.dumps({"size": args.size, "seed": args.seed}))
    options = load_pipeline(REPO / "pipelines" / "demo.yaml")
    t0 = time.perf_counter()
    run = build_change([before, after], options, radiometric_match=not args.no_radiometric_match)
    report = write_change(run, work / "out", min_area=args.min_area, overwrite=True, quiet=True)
    seconds = time.perf_counter() - t0

    with rasterio.open(truth_change) as src:
        codes = src.read(1)
        transform, shape = src.transform, (src.height, src.width)
        px = abs(transform.a * transform.e)
    gy, gx = np.meshgrid(np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5, indexing="ij")
    forest = landcover_at(cfg.seed, gy, gx) == TREE
    truth = {"clearcut": codes == CLEARCUT, "unchanged_forest": (codes == UNCHANGED) & forest}
    import geopandas as gpd

    gdf = gpd.read_file(work / "out" / "change.gpkg")
    loss_geoms = gdf[gdf["type"] == "canopy loss"].geometry
    predicted = rasterize(((g, 1) for g in loss_geoms), out_shape=shape, transform=transform, dtype="uint8") > 0 \
        if len(loss_geoms) else np.zeros(shape, bool)
    valid = codes > 0
    min_px = args.min_area / px

    ndvi_a, ok_a = _ndvi(before)
    ndvi_b, ok_b = _ndvi(after)
    ndvi_loss = _drop_small((ndvi_b - ndvi_a < -0.2) & ok_a & ok_b & valid, min_px)
    with rasterio.open(truth_chm) as src:
        true_dh = src.read(1)
    with rasterio.open(work / "out" / "canopy_change.tif") as src:
        own_dh = src.read(1)
    with np.errstate(invalid="ignore"):
        oracle = _drop_small((true_dh <= -5.0) & valid, min_px)
        any_fall = _drop_small((own_dh <= -5.0) & valid, min_px)
    canopy = report["steps"][0]["canopy"]

    print(json.dumps({
        "scene": {"size": args.size, "seed": args.seed, "gsd_m": cfg.gsd, "pixel_area_m2": px,
                  "truth_clearcut_m2": round(float(truth["clearcut"].sum() * px), 1),
                  "truth_unchanged_forest_m2": round(float(truth["unchanged_forest"].sum() * px), 1)},
        "model": "bundled demo model (pipelines/demo.yaml)", "min_height_change_m": 5.0, "min_area_m2": args.min_area,
        "radiometric_match": report["radiometric_match"],
        "geodino_change": _scores(predicted & valid, truth, px),
        "partial_loss_area_m2": round(canopy["partial_loss_area_m2"], 1),
        "gain_area_m2": round(canopy["gain_area_m2"], 1),
        "previous_rule_any_fall_of_5m": _scores(any_fall, truth, px),
        "baseline_no_change": _scores(np.zeros(shape, bool), truth, px),
        "baseline_ndvi_drop_0.2": _scores(ndvi_loss, truth, px),
        "oracle_true_heights": _scores(oracle, truth, px),
        "coregistration_px": report["coregistration"][0]["shift_px"],
        "change_seconds": round(seconds, 1),
        "targets": {"clearcut_area_ratio": "0.85-1.15", "iou": ">= 0.6", "false_loss_on_unchanged_forest": "< 0.05"},
    }, indent=2))


if __name__ == "__main__":
    main()
