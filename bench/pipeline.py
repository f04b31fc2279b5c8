"""The pipeline's own ceiling: `geodino run` with an instant model, windows/s and time per stage.

    python bench/pipeline.py                       # 8192^2 uint8 RGB, threads, every core
    python bench/pipeline.py --size 4096 --workers 2
    python bench/pipeline.py --scheduler local --processes 2
    python bench/pipeline.py --embeddings --constant

The real `geodino run` path (geodino.pipeline.build_run + write_scene: read, normalise,
windows, stitch, stream, COG export, polygons, report) with the model call replaced by one
that returns precomputed arrays of the demo heads' shapes at once (bench/_instant.py):
canopy height (1 channel), land cover (7 classes), optionally embeddings. The scene is a
3-band uint8 tiled DEFLATE GeoTIFF. Stage times are summed over threads (so with several
workers they can exceed the wall time); `model` is the instant call itself. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import CACHE, machine, pattern_rgb8_scene  # noqa: E402

REPO = HERE.parent


SENT: list[int] = []


def _record_graph_sizes() -> None:
    """Record the pickled size of every graph a distributed client sends (one per wave)."""
    import cloudpickle
    from distributed import Client

    real = Client.get

    def get(self, dsk, keys, **kw):
        SENT.append(len(cloudpickle.dumps(dict(dsk))))
        return real(self, dsk, keys, **kw)

    Client.get = get


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=None, help="dask threads (default: the pipeline's default)")
    ap.add_argument("--scheduler", default="threads", help="threads or local (a LocalCluster)")
    ap.add_argument("--processes", type=int, default=1, help="worker processes with --scheduler local")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--embeddings", action="store_true")
    ap.add_argument("--no-polygons", action="store_true")
    ap.add_argument("--constant", action="store_true", help="flat outputs instead of a map-like pattern")
    ap.add_argument("--compress", default=None)
    args = ap.parse_args()
    # dask.distributed workers import the instant model from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)

    import geodino.pipeline as pipeline
    from geodino.options import load_pipeline
    from geodino.timing import collect

    from _instant import InstantBundle

    scene = pattern_rgb8_scene(args.size)
    out = CACHE / f"pipeline_{args.size}"
    if out.exists():
        shutil.rmtree(out)
    opts = load_pipeline(REPO / "pipelines" / "demo.yaml")
    opts.profile, opts.batch_size, opts.polygons = "rgb8", args.batch_size, not args.no_polygons
    opts.embeddings, opts.scheduler, opts.min_polygon_area = args.embeddings, args.scheduler, 0.0
    for key in ("workers", "chunks", "compress"):
        if getattr(args, key) is not None:
            setattr(opts, key, getattr(args, key))
    cluster = None
    if args.scheduler == "local":
        # started before the clock, as `--scheduler local` starts it (geodino's worker
        # environment); the run then connects to it, as to any scheduler address
        t = time.perf_counter()
        cluster_scope = pipeline.local_cluster(args.processes, max(1, (os.cpu_count() or 1) // args.processes))
        cluster = cluster_scope.__enter__()
        startup = time.perf_counter() - t
        opts.scheduler = cluster.scheduler_address
        _record_graph_sizes()

    def bundle(**kw):
        return InstantBundle(constant=args.constant, **kw)

    pipeline.ModelBundle = bundle  # build_run makes its bundle through this name
    if cluster is not None:
        # workers import torch and load the model on their first batch: a one-time cost per
        # worker, paid here on a small scene so that the timed run measures the steady state.
        # The scene has batches for every worker (1024^2 had one: a second process loaded its
        # model, made its instant outputs and opened the scene on the clock).
        t = time.perf_counter()
        warm = pattern_rgb8_scene(1024 * max(2, args.processes))
        pipeline.write_scene(pipeline.build_run(str(warm), opts), CACHE / "pipeline_warmup",
                             overwrite=True, quiet=True)
        warmup = time.perf_counter() - t
        SENT.clear()
    run = pipeline.build_run(str(scene), opts)
    run.bundle.load()
    graph_bytes = len(pickle.dumps(dict(run.dataset.__dask_graph__()), protocol=5))
    with collect() as stages:
        t, cpu = time.perf_counter(), _cpu_seconds()
        report = pipeline.write_scene(run, out, overwrite=True, quiet=True)
        seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    windows = len(run.tiles)
    if cluster is not None:
        cluster_scope.__exit__(None, None, None)
    print(json.dumps({
        "benchmark": "pipeline", "size": args.size, "windows": windows, "scheduler": args.scheduler,
        "workers": opts.workers, "processes": args.processes if args.scheduler == "local" else None,
        "batch_size": args.batch_size, "chunks": opts.chunks, "embeddings": args.embeddings,
        "polygons": opts.polygons, "constant": args.constant, "compress": opts.compress,
        "seconds": round(seconds, 3), "windows_per_second": round(windows / seconds, 2),
        # CPU seconds of this process (all threads): the work done, whatever else the machine runs
        "cpu_seconds": round(cpu, 3), "cpu_ms_per_window": round(1000 * cpu / windows, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "graph_pickle_mb": round(graph_bytes / 2**20, 3),
        "cluster_startup_s": round(startup, 2) if cluster is not None else None,
        "worker_warmup_s": round(warmup, 2) if cluster is not None else None,
        "largest_graph_sent_kb": round(max(SENT) / 1024, 1) if SENT else None,
        "stages_s": {k: round(v, 3) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
        "stages_cpu_s": {k: round(v, 3) for k, v in sorted(stages.cpu.items(), key=lambda kv: -kv[1])},
        "stages_calls": dict(sorted(stages.calls.items())),
        "outputs": report["outputs"], "machine": machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
