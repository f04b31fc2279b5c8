"""Peak memory of `geodino change` by stage and scene size (DESIGN invariant 6: flat in area).

    python bench/change_memory.py --sizes 2048,4096,8192

Each size runs in a fresh interpreter (bundled demo model, pipelines/demo.yaml, the tiled
synthetic pair of bench/change.py). A sampler thread reads the process's resident set size
every 50 ms and keeps the maximum per stage: ``build`` (opening both dates, the radiometric
match and the co-registration check), ``rasters`` (the streamed pass that infers both dates
and writes the change COGs), ``tables and polygons`` (one pass over the written rasters: the
summaries, the transition matrix and the vector step) and the rest of writing (the
GeoPackage, report.json); ``peak_rss_mb`` is
the process's own high-water mark; ``stage_seconds_and_cpu_s``: wall and CPU seconds (process
time, every thread) of each stage that returned (``write`` includes the stages inside it). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, PEAK, machine, run_child
from change import tiled_pair

REPO = Path(__file__).resolve().parents[1]

_CHILD = PEAK + """
import json, shutil, sys, threading, time
import geodino.change_vectors as cv
import geodino.change_write as cw
from geodino.options import load_pipeline
from geodino.change_run import build_change

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

stage, peaks, done = ["build"], {}, threading.Event()
def sample():
    while not done.is_set():
        peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss())
        time.sleep(0.05)

times = {}
def staged(name, fn):
    def wrapper(*a, **k):
        previous, stage[0] = stage[0], name
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            stage[0] = previous
            times[name] = (round(time.perf_counter() - t, 2), round(time.process_time() - c, 2))
    return wrapper

cw.write_change = staged("write (the rest: GeoPackage, report)", cw.write_change)
cw.write_rasters = staged("rasters", cw.write_rasters)
cw.change_tables = staged("tables and polygons", cw.change_tables)
before, after, out, pipeline = sys.argv[1:5]
shutil.rmtree(out, ignore_errors=True)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
run = build_change([before, after], load_pipeline(pipeline))
report = cw.write_change(run, out, quiet=True)
done.set()
step = report["steps"][0]
print(json.dumps({"seconds": round(time.perf_counter() - t, 1), "cpu_seconds": round(time.process_time(), 1),
                  "windows": report["windows"],
                  "polygons": {k: v["polygons"] for k, v in step.get("polygons", {}).items()},
                  "stage_peak_rss_mb": {k: round(v, 1) for k, v in peaks.items()},
                  "stage_seconds_and_cpu_s": times, "peak_rss_mb": peak()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096,8192")
    args = ap.parse_args()
    pipeline = str(REPO / "pipelines" / "demo.yaml")
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        before, after = tiled_pair(size)
        results[size] = run_child(_CHILD, str(before), str(after), str(CACHE / f"bench_change_memory_{size}"),
                                  pipeline)
        print(json.dumps({size: results[size]}), file=sys.stderr)
    sizes = sorted(results)
    print(json.dumps({"model": "bundled demo model (pipelines/demo.yaml)", "machine": machine(),
                      "sizes": {str(s): results[s] for s in sizes},
                      "peak_growth": round(results[sizes[-1]]["peak_rss_mb"] / results[sizes[0]]["peak_rss_mb"], 3)},
                     indent=2))


if __name__ == "__main__":
    main()
