"""GPU path: end-to-end windows/s of `geodino run` beside backbone-only windows/s, case by case.

    python bench/gpu.py --device cuda --jsonl $OUT/gpu.jsonl   # ViT-S/B/L, compiled ViT-S, CHMv2
    python bench/gpu.py --device cpu --quick                   # the same code path on a CPU, small

Each case prints one JSON line as soon as it is measured (and appends it to ``--jsonl``);
a case that fails prints its error and the next one runs. Cases:

- ``vits16``, ``vitb16``, ``vitl16``: random-weight DINOv3 ViTs with a 7-class 1x1-conv
  land-cover head on the last layer (bench/_common.py's benchmark model);
- ``vits16-compiled``: the same ViT-S with ``compile=True``;
- ``chmv2-vitl16``: a random-weight CHMv2ForDepthEstimation of the released architecture
  (ViT-L + DPT head, 256 depth bins), alone (geodino's backbone is loaded but not run).

All with batch size 0 (chosen from free GPU memory; 8 on a CPU). *Backbone only*: the
backbone's model call as the pipeline makes it (``output_hidden_states=True``; for CHMv2 the
whole model), bf16 autocast on CUDA, on a batch of that size already on the device, timed
after one warm-up call. *End to end*: ``write_scene`` on a synthetic uint8 RGB scene of about
``--windows`` windows of 512/64 (read, normalise, copy to the device, infer, blend, write
the COG), after a warm-up run on a one-batch scene in the same process (models loaded and,
if asked, compiled; compilation time is reported separately).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ARCHS, CACHE, benchmark_model, machine

WINDOW, OVERLAP = 512, 64


def smooth_rgb8_scene(side: int, seed: int = 0) -> Path:
    """A side x side uint8 RGB scene: smooth pattern plus noise, 512-tiled DEFLATE, in seconds.

    The full synthetic generator takes minutes at 10k^2; throughput only needs realistic
    bytes (compressible but not constant). Written strip by strip with GDAL's multi-threaded
    compression.
    """
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    path = CACHE / f"smooth_rgb8_{side}.tif"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(500000.0, 4000000.0, 0.6, 0.6), "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "num_threads": "ALL_CPUS"}
    tmp = path.with_suffix(".partial.tif")
    x = np.arange(side, dtype=np.float32)[None, :]
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, side, 512):
            h = min(512, side - row)
            y = np.arange(row, row + h, dtype=np.float32)[:, None]
            strip = np.empty((3, h, side), np.uint8)
            for b in range(3):
                smooth = 110 + 60 * np.sin(x / (97 + 13 * b) + b) * np.cos(y / 131) + 30 * np.sin((x + y) / 509)
                noise = rng.integers(-25, 26, (h, side), dtype=np.int16)
                strip[b] = np.clip(smooth + noise, 1, 255).astype(np.uint8)
            dst.write(strip, window=((row, row + h), (0, side)))
    tmp.replace(path)
    return path


def side_for(windows: int) -> int:
    """A square scene side that holds about ``windows`` windows of 512/64."""
    per_axis = max(1, round(math.sqrt(windows)))
    return WINDOW + (WINDOW - OVERLAP) * (per_axis - 1)


def tiny_chmv2(arch: str) -> Path:
    """A CHMv2ForDepthEstimation with random weights: the released decoder on an ``arch`` ViT
    (a small decoder on the tiny ViT)."""
    import torch
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, DINOv3ViTConfig

    out = CACHE / f"chmv2_{arch}"
    if (out / "config.json").exists():
        return out
    a = ARCHS[arch]
    n = a["num_hidden_layers"]
    bc = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, out_indices=[n // 4, n // 2, 3 * n // 4, n],
                         apply_layernorm=True, reshape_hidden_states=True, **a)
    bc.return_class_token = True
    d = a["hidden_size"]
    # the released decoder (256 fusion channels, 256 depth bins); a small one for the CPU check
    fusion, hidden, bins = (32, 16, 32) if arch == "tiny" else (256, 128, 256)
    config = CHMv2Config(backbone_config=bc, post_process_channels=[d // 8, d // 4, d // 2, d],
                         reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=fusion, head_hidden_size=hidden,
                         number_output_channels=bins)
    torch.manual_seed(0)
    CHMv2ForDepthEstimation(config).save_pretrained(out)
    return out


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_only_rate(fn, batch: int, windows: int, device: str) -> float:
    """Windows/s of ``fn`` on a batch already on the device (one warm-up call first)."""
    import torch

    x = torch.randn(batch, 3, WINDOW, WINDOW, device=device)
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16,
                                                enabled=device.startswith("cuda")):
        fn(x)
        sync(device)
        start = time.perf_counter()
        done = 0
        while done < windows:
            fn(x)
            done += batch
        sync(device)
    return done / (time.perf_counter() - start)


def run_case(name: str, args, scene: Path, warm_scene: Path) -> dict:
    from geodino.pipeline import RunOptions, build_run, write_scene

    compiled = name.endswith("-compiled")
    arch = name.removesuffix("-compiled").removeprefix("chmv2-")
    opts = {"profile": "rgb8", "batch_size": 0, "device": args.device, "polygons": False, "compile": compiled}
    if name.startswith("chmv2-"):
        backbone, _, layers = benchmark_model(arch)
        opts.update(backbone=str(backbone), canopy_model=str(tiny_chmv2(arch)), layers=layers)
    else:
        backbone, head, layers = benchmark_model(arch)
        opts.update(backbone=str(backbone), landcover_head=str(head), layers=layers)
    t0 = time.perf_counter()
    warm = build_run(str(warm_scene), RunOptions(**opts))  # loads (and compiles) the models
    write_scene(warm, CACHE / f"gpu_warm_{name}", overwrite=True, quiet=True)
    warm_s = time.perf_counter() - t0
    batch = warm.bundle.batch_size
    bb, _, chm = warm.bundle.load()
    if chm is not None:
        rate = model_only_rate(lambda x: chm(pixel_values=x).predicted_depth, batch, args.windows, args.device)
    else:
        rate = model_only_rate(lambda x: bb.model(pixel_values=x, output_hidden_states=True), batch,
                               args.windows, args.device)
    run = build_run(str(scene), RunOptions(**opts))
    out = CACHE / f"gpu_{name}"
    if out.exists():
        shutil.rmtree(out)
    report = write_scene(run, out, overwrite=True, quiet=True)
    e2e = report["windows"] / report["seconds"]
    return {"case": name, "windows": report["windows"], "batch_size": batch,
            "backbone_only_windows_per_s": round(rate, 2), "end_to_end_windows_per_s": round(e2e, 2),
            "fraction": round(e2e / rate, 3), "end_to_end_s": report["seconds"],
            "warm_up_s": round(warm_s, 1)}


def emit(result: dict, jsonl: Path | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if jsonl is not None:
        with jsonl.open("a") as f:
            f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny models and scenes (a CPU check of the path)")
    ap.add_argument("--cases", nargs="+", default=None,
                    help="default: vits16 vitb16 vitl16 vits16-compiled chmv2-vitl16 (--quick: tiny ones)")
    ap.add_argument("--windows", type=int, default=None, help="about this many windows per scene (484; quick 16)")
    ap.add_argument("--jsonl", type=Path, default=None, help="also append each result line here")
    args = ap.parse_args()
    args.windows = args.windows or (16 if args.quick else 484)
    cases = args.cases or (["tiny", "tiny-compiled", "chmv2-tiny"] if args.quick
                           else ["vits16", "vitb16", "vitl16", "vits16-compiled", "chmv2-vitl16"])
    emit({"benchmark": "gpu", "device": args.device, "machine": machine(), "cases": cases,
          "window": WINDOW, "overlap": OVERLAP}, args.jsonl)
    t = time.perf_counter()
    scene = smooth_rgb8_scene(side_for(args.windows))
    warm_scene = smooth_rgb8_scene(WINDOW + WINDOW - OVERLAP)  # 4 windows: one batch
    emit({"scene": str(scene), "side": side_for(args.windows), "made_s": round(time.perf_counter() - t, 1)},
         args.jsonl)
    for name in cases:
        try:
            result = run_case(name, args, scene, warm_scene)
        except Exception as e:  # noqa: BLE001 (one crash must not lose the other cases)
            result = {"case": name, "error": f"{type(e).__name__}: {e}"[:2000],
                      "where": traceback.format_exc().splitlines()[-3:]}
        emit(result, args.jsonl)


if __name__ == "__main__":
    main()
