"""bf16 against fp32 canopy heights of a small random-weight CHMv2 (CPU autocast); prints JSON.

The model has CHMv2's architecture (DINOv3 ViT with 24 blocks read at 6/12/18/24, DPT head,
mixed-log depth bins to 96 m) at a reduced width; the input is the bundled sample scene,
normalised as geodino feeds CHMv2. This is the figure that sets CHMV2_CUDA_PRECISION.

    python bench/chmv2_precision.py [--width 128] [--window 256] [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine


def small_chmv2(width: int, seed: int = 0):
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, DINOv3ViTConfig

    torch.manual_seed(seed)
    bb = DINOv3ViTConfig(hidden_size=width, num_hidden_layers=24, num_attention_heads=width // 64,
                         intermediate_size=4 * width, num_register_tokens=4, out_indices=[6, 12, 18, 24],
                         apply_layernorm=True, reshape_hidden_states=True)
    bb.return_class_token = True
    config = CHMv2Config(backbone_config=bb, post_process_channels=[width // 4, width // 2, width, width],
                         fusion_hidden_size=64, head_hidden_size=32, number_output_channels=256)
    model = CHMv2ForDepthEstimation(config).eval()
    with torch.no_grad():  # trained-like layer scale so every block contributes
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.2, 1.0)
    return model


def sample_windows(window: int, count: int) -> torch.Tensor:
    from geodino.predict import CanopyModel
    from geodino.scene import open_scene
    from geodino.sensor import prepare

    root = Path(__file__).resolve().parents[1]
    scene, norm = prepare(open_scene(root / "data_samples" / "scene" / "scene.tif"), "reflectance", "sat")
    raw, valid = scene.read_overview(768)
    x = norm(raw.astype(np.float32), valid)
    tiles = [x[:, r:r + window, c:c + window] for r in (0, 768 - window) for c in (0, 768 - window)][:count]
    sat = torch.from_numpy(np.stack(tiles))
    return CanopyModel(torch.nn.Identity(), "sat").restandardise(sat)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    model = small_chmv2(args.width)
    x = sample_windows(args.window, args.windows)
    with torch.inference_mode():
        fp32 = model(pixel_values=x).predicted_depth.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pixel_values=x).predicted_depth.float()
    diff = (bf16 - fp32).abs()
    print(json.dumps({
        "model": f"random CHMv2 architecture, ViT width {args.width}, 24 blocks, DPT head, 256 mixlog bins",
        "windows": int(x.shape[0]), "window": args.window, "machine": machine(),
        "fp32_height_m": {"mean": round(float(fp32.mean()), 3), "p5": round(float(fp32.quantile(0.05)), 3),
                          "p95": round(float(fp32.quantile(0.95)), 3)},
        "abs_diff_m": {"median": round(float(diff.median()), 4), "p99": round(float(diff.flatten().quantile(0.99)), 4),
                       "max": round(float(diff.max()), 4)},
        "relative_l2": round(float((bf16 - fp32).norm() / fp32.norm()), 5),
    }, indent=2))


if __name__ == "__main__":
    main()
