"""Peak memory of opening a scene and iterating all its windows (reading + normalising).

    python bench/windows_memory.py --sizes 2048 8192 16384

Prints JSON: per size, windows, seconds and peak RSS of a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import PEAK, machine, run_child, synthetic_scene  # noqa: E402

CHILD = PEAK + """
import json, sys, time
from geodino.loader import iter_batches
from geodino.scene import open_scene
from geodino.sensor import prepare
from geodino.tiling import WindowSpec, window_grid
scene, norm = prepare(open_scene(sys.argv[1]), "reflectance", "sat")
tiles = window_grid(scene.grid.height, scene.grid.width, WindowSpec(512, 64))
t = time.perf_counter()
n = sum(len(b) for b in iter_batches(scene, norm, tiles, batch_size=8))
print(json.dumps({"windows": n, "seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": peak()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    args = ap.parse_args()
    results = {}
    for size in args.sizes:
        results[str(size)] = run_child(CHILD, str(synthetic_scene(size)))
    rss = [r["peak_rss_mb"] for r in results.values()]
    print(json.dumps({"benchmark": "windows_memory", "machine": machine(), "results": results,
                      "largest_over_smallest_rss": round(rss[-1] / rss[0], 3)}, indent=2))


if __name__ == "__main__":
    main()
