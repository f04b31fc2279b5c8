"""Individual trees (geodino.crowns): speed and peak memory, and accuracy against synthetic truth.

    python bench/crowns.py speed --sizes 2048 8192      # Mpx/s and peak RSS, fresh process each
    python bench/crowns.py quality --size 2048          # truth canopy and the demo model's canopy

``speed`` runs on the truth canopy raster of a synthetic scene (seed 1, 0.6 m), rendered
once block by block and cached. ``quality`` scores the trees found on the truth canopy of a
2048² scene (seed 0, held out from the demo model's training scene, seed 3) and on the
canopy the bundled demo model predicts from that scene's image, against the generator's
crowns: tree-top F1 (one-to-one matches within 1.5 m), median absolute height error and
median relative crown-area error of matched trees. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, PEAK, machine, run_child

REPO = Path(__file__).resolve().parents[1]

CHILD = PEAK + """
import json, sys, time
from geodino.trees import crowns
t = time.perf_counter()
r = crowns(sys.argv[1], sys.argv[2], overwrite=True, progress=False, block=int(sys.argv[3]))
s = time.perf_counter() - t
print(json.dumps({"trees": r.trees, "seconds": round(s, 2), "peak_rss_mb": peak()}))
"""


def truth_canopy(size: int, seed: int) -> Path:
    """The synthetic truth canopy raster (0.6 m), rendered block by block and cached."""
    import rasterio
    from rasterio.windows import Window

    from geodino.export import atomic_path
    from geodino.synth import SynthConfig, render_canopy

    path = CACHE / f"canopy_{size}_seed{seed}.tif"
    if path.exists():
        return path
    cfg = SynthConfig(width=size, height=size, seed=seed)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "float32", "crs": cfg.crs,
               "transform": cfg.transform, "nodata": float("nan"), "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "deflate", "predictor": 3}
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for r in range(0, size, 1024):
            for c in range(0, size, 1024):
                h, w = min(1024, size - r), min(1024, size - c)
                dst.write(render_canopy(cfg, r, c, h, w), 1, window=Window(c, r, w, h))
    return path


def speed(sizes: list[int], block: int) -> dict:
    results = {}
    for size in sizes:
        chm = truth_canopy(size, seed=1)
        r = run_child(CHILD, str(chm), str(CACHE / f"crowns_{size}"), str(block))
        r["mpx_per_s"] = round(size * size / 1e6 / r["seconds"], 3)
        results[str(size)] = r
    rss = [r["peak_rss_mb"] for r in results.values()]
    return {"benchmark": "crowns_speed", "block": block, "results": results,
            "largest_over_smallest_rss": round(rss[-1] / rss[0], 3)}


def _score(out: Path, truth: dict) -> dict:
    import pyogrio

    from geodino.trees.match import score_trees

    tops = pyogrio.read_dataframe(out / "trees.gpkg", layer="treetops")
    det = np.c_[tops.geometry.x, tops.geometry.y]
    vis = truth["apex_visible"]
    return {
        "visible_tops": score_trees(det, np.c_[truth["x"], truth["y"]][vis], det_height=tops.height_m,
                                    ref_height=truth["height_m"][vis], det_area=tops.crown_area_m2,
                                    ref_area=truth["visible_area_m2"][vis]),
        "all_crowns_disk_area": score_trees(det, np.c_[truth["x"], truth["y"]], det_height=tops.height_m,
                                            ref_height=truth["height_m"], det_area=tops.crown_area_m2,
                                            ref_area=truth["area_m2"]),
    }


def quality(size: int, seed: int = 0) -> dict:
    from geodino.options import load_pipeline
    from geodino.pipeline import build_run, write_scene
    from geodino.synth import SynthConfig, crown_table, generate
    from geodino.trees import crowns

    cfg = SynthConfig(width=size, height=size, seed=seed)
    truth = crown_table(cfg)
    out = {"scene": {"size": size, "seed": seed, "gsd_m": cfg.gsd, "crowns_drawn": int(truth["row"].size),
                     "crowns_with_visible_apex": int(truth["apex_visible"].sum())}}
    chm = truth_canopy(size, seed)
    crowns(chm, CACHE / f"quality_truth_{size}", overwrite=True, progress=False)
    out["truth_canopy"] = _score(CACHE / f"quality_truth_{size}", truth)

    scene_dir = CACHE / f"quality_scene_{size}_seed{seed}"
    if not (scene_dir / "scene.tif").exists():
        generate(scene_dir, cfg, overwrite=True)
    options = load_pipeline(REPO / "pipelines" / "demo.yaml")
    options.polygons, options.landcover_head = False, None
    pred_dir = CACHE / f"quality_demo_{size}"
    write_scene(build_run(str(scene_dir / "scene.tif"), options), pred_dir, overwrite=True, quiet=True)
    for name, extra in (("demo_model_canopy", {}), ("demo_model_canopy_smoothed_0.6m", {"smoothing_m": 0.6})):
        target = CACHE / f"quality_{name}_{size}"
        crowns(pred_dir / "canopy_height.tif", target, overwrite=True, progress=False, **extra)
        out[name] = _score(target, truth)
    return {"benchmark": "crowns_quality", **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    s.add_argument("--block", type=int, default=1024)
    q = sub.add_parser("quality")
    q.add_argument("--size", type=int, default=2048)
    args = ap.parse_args()
    result = speed(args.sizes, args.block) if args.what == "speed" else quality(args.size)
    print(json.dumps({**result, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
