"""Peak memory of stitching a whole scene into a COG with a cheap per-window function.

    python bench/stitch_memory.py --sizes 2048 16384

The per-window function is a per-pixel band mean (no model), so the figure is the cost of
reading, blending, the dask graph and the COG writer alone. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, PEAK, machine, run_child, synthetic_scene  # noqa: E402

CHILD = PEAK + """
import json, sys, time
import numpy as np
import dask
from geodino.export import RasterOutput, write_rasters
from geodino.scene import open_scene
from geodino.sensor import prepare
from geodino.stitch import OutputSpec, stitch
from geodino.tiling import WindowSpec, window_grid

class BandMean:
    token = "band-mean"
    def __call__(self, x):
        return {"mean": x.mean(axis=1, keepdims=True)}

scene, norm = prepare(open_scene(sys.argv[1]), "reflectance", "sat")
tiles = window_grid(scene.grid.height, scene.grid.width, WindowSpec(512, 64))
out = stitch(scene, norm, tiles, BandMean(), {"mean": OutputSpec(1)}, overlap=64, batch_size=8,
             chunks=int(sys.argv[3]))
t = time.perf_counter()
with dask.config.set(scheduler="threads", num_workers=4):
    write_rasters([RasterOutput(sys.argv[2], out["mean"], dtype="float32", nodata=float("nan"), grid=scene.grid)],
                  overwrite=True)
print(json.dumps({"windows": len(tiles), "seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": peak()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--chunks", type=int, default=512)
    args = ap.parse_args()
    results = {}
    for size in args.sizes:
        results[str(size)] = run_child(CHILD, str(synthetic_scene(size)), str(CACHE / f"stitched_{size}.tif"),
                                       str(args.chunks))
    rss = [r["peak_rss_mb"] for r in results.values()]
    print(json.dumps({"benchmark": "stitch_memory", "chunks": args.chunks, "machine": machine(), "results": results,
                      "largest_over_smallest_rss": round(rss[-1] / rss[0], 3)}, indent=2))


if __name__ == "__main__":
    main()
