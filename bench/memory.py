"""Peak RSS of `geodino run` end to end with the tiny model, by scene size.

    python bench/memory.py --sizes 2048 8192 16384

Each size runs in a fresh process (read, normalise, infer, stitch, write the COG).
Targets: the largest within 1.25x of the smallest, and under 2.5 GB. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, PEAK, benchmark_model, machine, rgb8_scene, run_child  # noqa: E402

CHILD = PEAK + """
import json, shutil, sys, time
from pathlib import Path
from geodino.pipeline import RunOptions, build_run, write_scene
scene, backbone, head, last, out = sys.argv[1:6]
if Path(out).exists():
    shutil.rmtree(out)
opts = RunOptions(backbone=backbone, landcover_head=head, profile="rgb8", window=512, overlap=64, batch_size=8,
                  polygons=False, layers=[int(last)])
t = time.perf_counter()
report = write_scene(build_run(scene, opts), out, overwrite=True, quiet=True)
print(json.dumps({"windows": report["windows"], "seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": peak()}))
"""


def run_sizes(description: str, default_sizes: list[int], prefix: str):
    """Parse --sizes/--arch and run `geodino run` end to end for each size in a fresh process."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sizes", type=int, nargs="+", default=default_sizes)
    ap.add_argument("--arch", default="tiny")
    args = ap.parse_args()
    backbone, head, layers = benchmark_model(args.arch)
    results = {}
    for size in args.sizes:
        results[str(size)] = run_child(CHILD, str(rgb8_scene(size)), str(backbone), str(head), str(layers[0]),
                                       str(CACHE / f"{prefix}_{size}"))
    return args, results


def main() -> None:
    args, results = run_sizes(__doc__, [2048, 8192, 16384], "memory")
    rss = [r["peak_rss_mb"] for r in results.values()]
    print(json.dumps({"benchmark": "memory", "arch": args.arch, "machine": machine(), "results": results,
                      "largest_over_smallest_rss": round(rss[-1] / rss[0], 3)}, indent=2))


if __name__ == "__main__":
    main()
