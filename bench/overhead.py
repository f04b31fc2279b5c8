"""End-to-end `geodino run` time against the backbone-only loop over the same windows.

    python bench/overhead.py --arch tiny --size 8192
    python bench/overhead.py --arch vits16 --size 2048

Model: a randomly initialised DINOv3 ViT + a 1x1-conv 7-class head on the patch grid,
bilinear x16 upsampling (the peers' benchmark). Scene: 3-band uint8, tiled, DEFLATE.
Windows 512, overlap 64 (stride 448), batch 8. Times exclude imports and model loading.
End to end = read, normalise, infer, stitch, write the COG (+ polygons off). Backbone only =
the same model forward on the same number of windows from memory. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, benchmark_model, machine, rgb8_scene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", "vits16", "vitb16", "vitl16"])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    import numpy as np
    import torch

    from geodino.pipeline import RunOptions, build_run, write_scene

    backbone, head, layers = benchmark_model(args.arch)
    scene = rgb8_scene(args.size)
    out = CACHE / f"overhead_{args.arch}_{args.size}"
    if out.exists():
        shutil.rmtree(out)
    opts = RunOptions(backbone=str(backbone), landcover_head=str(head), profile="rgb8", window=512, overlap=64,
                      batch_size=args.batch_size, device=args.device, polygons=False, layers=layers,
                      workers=args.workers)
    run = build_run(str(scene), opts)
    run.bundle.load()  # model loading is not part of either time
    windows = len(run.tiles)

    # backbone only: the same model call on the same number of windows, no I/O
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch_size, 3, 512, 512)).astype(np.float32)
    run.bundle(batch[:1])  # warm-up
    t = time.perf_counter()
    done = 0
    while done < windows:
        n = min(args.batch_size, windows - done)
        run.bundle(batch[:n])
        done += n
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    backbone_s = time.perf_counter() - t

    t = time.perf_counter()
    write_scene(run, out, overwrite=True, quiet=True)
    end_to_end_s = time.perf_counter() - t
    print(json.dumps({
        "benchmark": "overhead", "arch": args.arch, "size": args.size, "windows": windows,
        "batch_size": args.batch_size, "device": args.device, "machine": machine(),
        "backbone_only_s": round(backbone_s, 3), "end_to_end_s": round(end_to_end_s, 3),
        "ratio": round(end_to_end_s / backbone_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
