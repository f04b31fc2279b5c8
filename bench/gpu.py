"""GPU path: end-to-end windows/s of `geodino run` beside backbone-only windows/s.

    python bench/gpu.py --device cuda              # ViT-S/16, ViT-B/16, ViT-L/16, CHMv2 at 512^2
    python bench/gpu.py --device cpu --quick       # the same code path on a CPU, small

Backbone only: the model (bf16 autocast on CUDA) on batches of random 512 x 512 windows
already on the device. End to end: `geodino run` on a synthetic uint8 RGB scene of the same
number of windows (read, normalise, pinned host-to-device copies, infer, stitch, write the
COG), with the batch size chosen from free GPU memory. Random weights throughout. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ARCHS, CACHE, benchmark_model, machine, rgb8_scene  # noqa: E402


def tiny_chmv2(root: Path, arch: str) -> Path:
    """A CHMv2ForDepthEstimation (DINOv3 ViT + DPT head) with random weights of ``arch`` size."""
    import torch
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, DINOv3ViTConfig

    out = root / f"chmv2_{arch}"
    if (out / "config.json").exists():
        return out
    a = ARCHS[arch]
    n = a["num_hidden_layers"]
    idx = [n // 4, n // 2, 3 * n // 4, n]
    bc = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, out_indices=idx, apply_layernorm=True,
                         reshape_hidden_states=True, **a)
    bc.return_class_token = True
    d = a["hidden_size"]
    config = CHMv2Config(backbone_config=bc, post_process_channels=[d // 4, d // 2, d, d],
                         reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=256, head_hidden_size=128)
    torch.manual_seed(0)
    CHMv2ForDepthEstimation(config).save_pretrained(out)
    return out


def backbone_rate(fn, batch: int, windows: int, device: str) -> float:
    import torch

    x = torch.randn(batch, 3, 512, 512, device=device)
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16,
                                                enabled=device.startswith("cuda")):
        fn(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        done = 0
        while done < windows:
            fn(x)
            done += batch
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return done / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny models and scenes (a CPU check of the path)")
    ap.add_argument("--archs", nargs="+", default=None)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    import torch

    from geodino.backbone import load_backbone
    from geodino.pipeline import RunOptions, build_run, write_scene
    from geodino.predict import load_chmv2

    archs = args.archs or (["tiny"] if args.quick else ["vits16", "vitb16", "vitl16"])
    windows = args.windows or (8 if args.quick else 512)
    stride = 448
    side = 512 + stride * (int(windows ** 0.5) - 1)
    scene = rgb8_scene(side)
    results = {}
    for arch in archs + [f"chmv2-{archs[-1]}"]:
        chm = arch.startswith("chmv2-")
        base = arch.split("-", 1)[1] if chm else arch
        backbone, head, layers = benchmark_model(base)
        batch = 8 if args.quick else 32
        if chm:
            model = load_chmv2(str(tiny_chmv2(CACHE, base)), torch.device(args.device))
            rate = backbone_rate(lambda x: model(pixel_values=x).predicted_depth, batch, windows, args.device)
            opts = RunOptions(backbone=str(backbone), canopy_model=str(tiny_chmv2(CACHE, base)), profile="rgb8",
                              batch_size=0, device=args.device, polygons=False, layers=layers,
                              compile=args.compile)
        else:
            bb = load_backbone(backbone, args.device, layers=layers, compile=args.compile)
            rate = backbone_rate(lambda x: bb.model(pixel_values=x), batch, windows, args.device)
            opts = RunOptions(backbone=str(backbone), landcover_head=str(head), profile="rgb8", batch_size=0,
                              device=args.device, polygons=False, layers=layers, compile=args.compile)
        out = CACHE / f"gpu_{arch}"
        if out.exists():
            shutil.rmtree(out)
        run = build_run(str(scene), opts)
        run.bundle.load()
        report = write_scene(run, out, overwrite=True, quiet=True)
        e2e = report["windows"] / report["seconds"]
        results[arch] = {"windows": report["windows"], "backbone_batch_size": batch, "backbone_only_windows_per_s": round(rate, 2),
                         "end_to_end_windows_per_s": round(e2e, 2), "fraction": round(e2e / rate, 3)}
    print(json.dumps({"benchmark": "gpu", "device": args.device, "machine": machine(), "compile": args.compile,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
