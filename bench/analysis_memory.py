"""Peak memory and time of similarity and k-means clusters on embedding rasters of growing size.

    python bench/analysis_memory.py --sizes 256 1024 --dim 64

SIZE is the patch grid's side (a 16-pixel patch each: 1024 patches = a 16384 x 16384 px
scene). The embeddings raster is made once (smooth fields plus noise, float32, tiled) and
cached; each measurement runs in a fresh interpreter. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, PEAK, machine, run_child

CHILD = PEAK + """
import json, sys, time
from geodino.analysis import cluster, write_similarity
from pathlib import Path
import rasterio
emb, out = sys.argv[1], Path(sys.argv[2])
with rasterio.open(emb) as src:
    x, y = src.xy(src.height // 3, src.width // 3)
t = time.perf_counter()
write_similarity(emb, (x, y), out, overwrite=True)
t_sim = time.perf_counter() - t
sim_rss = peak()
t = time.perf_counter()
cluster(emb, 8, seed=0, out=out, overwrite=True)
print(json.dumps({"similarity_seconds": round(t_sim, 2), "similarity_peak_rss_mb": sim_rss,
                  "cluster_seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": peak()}))
"""


def embeddings_raster(size: int, dim: int) -> Path:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    path = CACHE / f"embeddings_{size}_{dim}.tif"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    freq = rng.uniform(0.5, 6, (dim, 2))
    profile = {"driver": "GTiff", "width": size, "height": size, "count": dim, "dtype": "float32",
               "crs": "EPSG:32633", "transform": from_origin(500000, 4000000, 9.6, 9.6), "nodata": float("nan"),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "interleave": "pixel"}
    tmp = path.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for i in range(dim):
            dst.set_band_description(i + 1, f"embedding {i}")
        for row in range(0, size, 256):
            h = min(256, size - row)
            yy, xx = np.mgrid[row:row + h, 0:size] / size
            block = np.sin(freq[:, 0, None, None] * 6.28 * yy + freq[:, 1, None, None] * 6.28 * xx)
            block += 0.1 * rng.standard_normal(block.shape)
            dst.write(block.astype(np.float32), window=Window(0, row, size, h))
    tmp.rename(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    results = {}
    for size in args.sizes:
        results[str(size)] = run_child(CHILD, str(embeddings_raster(size, args.dim)), str(CACHE / f"analysis_{size}"))
    rss = [r["peak_rss_mb"] for r in results.values()]
    print(json.dumps({"benchmark": "analysis_memory", "dim": args.dim, "machine": machine(), "results": results,
                      "largest_over_smallest_rss": round(rss[-1] / rss[0], 3)}, indent=2))


if __name__ == "__main__":
    main()
