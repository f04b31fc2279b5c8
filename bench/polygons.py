"""Land-cover polygons (geodino.vectorize.polygonize) alone: GDAL's C polygoniser against the
rasterio.features.shapes reference path, on the land-cover COG that bench/pipeline.py wrote.

    python bench/pipeline.py --size 8192     # once, writes the land cover
    python bench/polygons.py --size 8192     # CPU and wall seconds of each path, and whether they agree

Each path runs in a fresh process (so neither inherits the other's warm caches or imports),
geopandas imported before the clock starts, as it is in a run. Prints JSON.
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
import geopandas, rasterio
import geodino.vectorize as vectorize
from geodino.classes import WORLDCOVER
raster, out, path = sys.argv[1:4]
if path == "reference":
    vectorize.gdal_library = lambda: None
with rasterio.open(raster):
    pass  # GDAL's drivers registered, as in a run
cpu, wall = time.process_time(), time.perf_counter()
vectorize.polygonize(raster, out, WORLDCOVER, overwrite=True)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
print(json.dumps({"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "peak_rss_mb": peak()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="the bench/pipeline.py run whose land cover to use")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each path (the fastest is kept)")
    args = ap.parse_args()
    raster = CACHE / f"pipeline_{args.size}" / "landcover.tif"
    if not raster.exists():
        sys.exit(f"{raster} is missing: run python bench/pipeline.py --size {args.size} first")
    import geopandas as gpd
    import shapely

    result = {"benchmark": "polygons", "raster": str(raster)}
    frames = {}
    for path in ("gdal", "reference"):
        out = CACHE / f"polygons_{args.size}_{path}.gpkg"
        runs = [run_child(CHILD, str(raster), str(out), path)
                for _ in range(args.repeat)]
        result[path] = min(runs, key=lambda r: r["cpu_s"])
        frames[path] = gpd.read_file(out)
    a, b = frames["gdal"], frames["reference"]
    result["polygons"] = len(a)
    result["vertices"] = int(shapely.get_num_coordinates(a.geometry.values).sum())
    result["paths_agree"] = bool(
        len(a) == len(b) and (a["class_code"].values == b["class_code"].values).all()
        and (a["area_m2"].values == b["area_m2"].values).all()
        and shapely.equals_exact(shapely.normalize(a.geometry.values), shapely.normalize(b.geometry.values)).all())
    result["cpu_ratio"] = round(result["reference"]["cpu_s"] / result["gdal"]["cpu_s"], 2)
    result["machine"] = machine()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
