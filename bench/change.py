"""`geodino change` on two dates against one `geodino run` of one date (target: <= 2.2x).

    python bench/change.py --size 8192
    python bench/change.py --size 4096 --repeats 2

Both with the bundled demo model and pipelines/demo.yaml (canopy + land-cover heads, 512
windows, 64 overlap, polygons on), each in a fresh interpreter, times exclude imports:
- run: `geodino run` of the first date (COGs, land-cover polygons, report);
- change: `geodino change` of both dates (each date inferred once, canopy/transition/embedding
  change COGs, change polygons, transition matrix, co-registration check, report).
The two dates are the synthetic change pair (`geodino synth --change`, 1024², seed 4) tiled
to --size (a realistic density of change; rendering 8192² pairs from scratch takes too long
on this machine). Runs alternate run/change --repeats times; the ratio uses the medians, of
wall-clock seconds and of the child processes' CPU seconds (process time, imports included:
the figure to read on a shared machine). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, PEAK, machine, run_child

REPO = Path(__file__).resolve().parents[1]


def tiled_pair(size: int) -> tuple[Path, Path]:
    """The 1024² synthetic change pair tiled to size x size (cached)."""
    import os

    import rasterio
    from rasterio.windows import Window

    from geodino.synth import SynthConfig
    from geodino.synth_change import generate_pair

    base = CACHE / "change_pair_1024"
    if not (base / "truth_change.tif").exists():
        generate_pair(base, SynthConfig(width=1024, height=1024, seed=4), overwrite=True)
    out = []
    for role in ("before", "after"):
        path = CACHE / f"change_{role}_{size}.tif"
        out.append(path)
        if path.exists():
            continue
        with rasterio.open(base / role / "scene.tif") as src:
            tile = src.read()
            profile = src.profile | {"width": size, "height": size, "BIGTIFF": "IF_SAFER"}
            tags, descriptions = src.tags(), src.descriptions
        tmp = path.with_suffix(".partial.tif")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.update_tags(**tags)
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
            for r in range(0, size, 1024):
                for c in range(0, size, 1024):
                    h, w = min(1024, size - r), min(1024, size - c)
                    dst.write(tile[:, :h, :w], window=Window(c, r, w, h))
        os.replace(tmp, path)
    return out[0], out[1]


_RUN = PEAK + """
import json, shutil, sys, time
from pathlib import Path
from geodino.options import load_pipeline
from geodino.runner import run_scenes
scene, out, pipeline = sys.argv[1:4]
shutil.rmtree(out, ignore_errors=True)
options = load_pipeline(pipeline)
t = time.perf_counter()
report = run_scenes([scene], out, options, quiet=True, log=lambda m: None)[0]
print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "cpu_seconds": round(time.process_time(), 1),
                  "windows": report["windows"], "peak_rss_mb": peak()}))
"""

_CHANGE = PEAK + """
import json, shutil, sys, time
from geodino.options import load_pipeline
from geodino.change_write import run_change
before, after, out, pipeline = sys.argv[1:5]
shutil.rmtree(out, ignore_errors=True)
options = load_pipeline(pipeline)
t = time.perf_counter()
report = run_change([before, after], out, options, quiet=True, log=lambda m: None)
step = report["steps"][0]
print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "cpu_seconds": round(time.process_time(), 1),
                  "windows": report["windows"],
                  "polygons": {k: v["polygons"] for k, v in step.get("polygons", {}).items()},
                  "coregistration_px": report["coregistration"][0]["shift_px"], "peak_rss_mb": peak()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    before, after = tiled_pair(args.size)
    pipeline = str(REPO / "pipelines" / "demo.yaml")
    runs, changes = [], []
    for _ in range(args.repeats):
        runs.append(run_child(_RUN, str(before), str(CACHE / f"bench_run_{args.size}"), pipeline))
        changes.append(run_child(_CHANGE, str(before), str(after), str(CACHE / f"bench_change_{args.size}"), pipeline))
    run_s = statistics.median(r["seconds"] for r in runs)
    change_s = statistics.median(r["seconds"] for r in changes)
    run_cpu = statistics.median(r["cpu_seconds"] for r in runs)
    change_cpu = statistics.median(r["cpu_seconds"] for r in changes)
    print(json.dumps({"size": args.size, "model": "bundled demo model (pipelines/demo.yaml)", "machine": machine(),
                      "run": runs, "change": changes, "run_seconds": run_s, "change_seconds": change_s,
                      "change_over_run": round(change_s / run_s, 3),
                      "cpu_change_over_run": round(change_cpu / run_cpu, 3), "target": "<= 2.2"}, indent=2))


if __name__ == "__main__":
    main()
