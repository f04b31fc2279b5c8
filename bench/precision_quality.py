"""What bf16 and int8 cost in quality against fp32: feature fidelity and map quality.

    python bench/precision_quality.py [--arch vits16] [--windows 2] [--size 1024]

Feature fidelity: cosine similarity of each patch token's feature, and of every block's
(normed) output, between a precision and fp32 on 512 x 512 windows cut from a held-out
synthetic scene; mean and 1st percentile over tokens. Map quality: the bundled demo model
(tiny backbone + trained heads, data_samples/model) on the held-out synthetic scene of
bench/heads_quality.py (seed 27, with a nodata collar): canopy MAE / RMSE / R² and land-cover
OA / mIoU against the scene's ground truth, per precision.

Both again on backbones with **injected activation outliers** (``inject_outliers``):
random-weight ViTs have none, trained DINOv3 weights do, and outliers are what breaks
per-token int8. The injection leaves the fp32 function unchanged, so the demo heads still fit
and any loss is the precision's. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE, machine

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data_samples" / "model"
PRECISIONS = ("fp32", "bf16", "int8")


def inject_outliers(model, channels: int = 4, low: float = 50.0, high: float = 100.0, seed: int = 0) -> dict:
    """Give a DINOv3 ViT the outlier channels of trained ViTs without changing its fp32 function.

    In every block, the same few channels of the LayerNorm outputs feeding attention and the
    MLP are scaled by 50-100x (LayerNorm affine weight and bias), and the input columns of the
    linear layers reading them (q/k/v projections, MLP up/gate projection) are divided by the
    same factor; likewise a few channels of the value projection's output are scaled up and
    the attention output projection's input columns scaled down (attention is linear in V).
    The fp32 output is unchanged up to rounding, but the activations entering those int8
    matrix products carry 50-100x outlier channels, as in trained ViTs (the "massive
    activations" of a few fixed dimensions), which dominates a per-token int8 scale.
    """
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    picked = torch.randperm(d, generator=g)[:channels]
    scale = low + (high - low) * torch.rand(channels, generator=g)
    with torch.no_grad():
        for block in model.model.layer:
            att, mlp = block.attention, block.mlp
            for norm, readers in ((block.norm1, (att.q_proj, att.k_proj, att.v_proj)),
                                  (block.norm2, [m for m in (getattr(mlp, "up_proj", None),
                                                             getattr(mlp, "gate_proj", None)) if m is not None])):
                norm.weight[picked] *= scale
                norm.bias[picked] *= scale
                for lin in readers:
                    lin.weight[:, picked] /= scale
            v_channels = torch.randperm(d, generator=g)[:channels]
            att.v_proj.weight[v_channels] *= scale[:, None]
            if att.v_proj.bias is not None:
                att.v_proj.bias[v_channels] *= scale
            att.o_proj.weight[:, v_channels] /= scale
    return {"channels": picked.tolist(), "scales": [round(float(s), 1) for s in scale]}


def outlier_copy(src: Path, dest: Path) -> dict:
    """A saved copy of the backbone at ``src`` with outliers injected (loaded and saved as a user would)."""
    from transformers import DINOv3ViTModel

    if dest.exists():
        shutil.rmtree(dest)
    model = DINOv3ViTModel.from_pretrained(src)
    how = inject_outliers(model)
    model.save_pretrained(dest)
    for extra in ("geodino_backbone.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dest / extra)
    return how


def _cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-token cosine similarity of (B, D, h, w) grids: mean and 1st percentile."""
    d = a.shape[1]
    c = torch.nn.functional.cosine_similarity(a.permute(0, 2, 3, 1).reshape(-1, d).double(),
                                              b.permute(0, 2, 3, 1).reshape(-1, d).double(), dim=1)
    return {"mean": round(float(c.mean()), 5), "p1": round(float(torch.quantile(c, 0.01)), 5)}


def scene_windows(scene_path: Path, n: int, size: int = 512) -> torch.Tensor:
    """The first ``n`` windows (stride 128) of the scene with >= 95% valid pixels, read and normalised
    as the pipeline does."""
    from geodino.scene import open_scene
    from geodino.sensor import prepare
    from geodino.tiling import WindowSpec, read_tile, window_grid

    scene, norm = prepare(open_scene(str(scene_path)), "reflectance", "web", None)
    out = []
    for tile in window_grid(scene.grid.height, scene.grid.width, WindowSpec(size, size - 128)):
        x, valid = read_tile(scene, norm, tile)
        if valid.mean() >= 0.95:
            out.append(x)
        if len(out) == n:
            break
    if not out:
        raise SystemExit(f"{scene_path}: no fully valid {size} x {size} window")
    return torch.from_numpy(np.stack(out)).float()


def feature_fidelity(backbone_dir: Path, windows: torch.Tensor) -> dict:
    from geodino.backbone import load_backbone

    depth = json.loads((backbone_dir / "config.json").read_text())["num_hidden_layers"]
    every = list(range(depth))
    feats = {}
    for name in PRECISIONS:
        bb = load_backbone(backbone_dir, layers=every, precision=name)
        with torch.inference_mode():
            feats[name] = bb(windows)
    ref = feats["fp32"]
    out = {}
    for name in ("bf16", "int8"):
        f = feats[name]
        layers = [_cosines(a, b) for a, b in zip(f.layers, ref.layers)]
        out[name] = {"patch": _cosines(f.patches, ref.patches),
                     "layers_mean": [c["mean"] for c in layers], "layers_p1": [c["p1"] for c in layers],
                     "worst_layer": min(layers, key=lambda c: c["p1"])}
    return out


def map_quality(backbone_dir: Path, test, work: Path, label: str) -> dict:
    from geodino.metrics import evaluate_rasters
    from geodino.pipeline import RunOptions, build_run, write_scene

    out = {}
    for name in PRECISIONS:
        opts = RunOptions(backbone=str(backbone_dir), canopy_head=str(DEMO / "canopy_head"),
                          landcover_head=str(DEMO / "landcover_head"), profile="reflectance", polygons=False,
                          precision=name)
        maps = work / f"maps_{label}_{name}"
        write_scene(build_run(str(test.scene), opts), maps, overwrite=True, quiet=True)
        chm = evaluate_rasters(maps / "canopy_height.tif", test.canopy_height, "canopy")
        lc = evaluate_rasters(maps / "landcover.tif", test.landcover, "landcover")
        out[name] = {"canopy": {k: chm[k] for k in ("mae", "rmse", "r2") if k in chm},
                     "landcover": {k: lc[k] for k in ("overall_accuracy", "miou") if k in lc}}
    ref = out["fp32"]
    for name in ("bf16", "int8"):
        c, r = out[name], ref
        c["canopy_mae_ratio"] = round(c["canopy"]["mae"] / r["canopy"]["mae"], 4)
        c["miou_drop"] = round(r["landcover"]["miou"] - c["landcover"]["miou"], 4)
    return out


def verdict(fidelity: dict, maps: dict) -> dict:
    """Which bars each precision meets (int8 cosine 0.99 mean / 0.95 p1; MAE +5%; mIoU -0.02)."""
    out = {}
    for name in ("bf16", "int8"):
        f, m = fidelity[name]["patch"], maps[name]
        out[name] = {"patch_cosine_mean": f["mean"], "patch_cosine_p1": f["p1"],
                     "canopy_mae_ratio": m["canopy_mae_ratio"], "miou_drop": m["miou_drop"],
                     "meets_bars": bool(f["mean"] >= 0.99 and f["p1"] >= 0.95 and m["canopy_mae_ratio"] <= 1.05
                                        and m["miou_drop"] <= 0.02)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vits16", help="random-weight ViT for feature fidelity (bench/_common.py ARCHS)")
    ap.add_argument("--windows", type=int, default=2, help="512 x 512 windows for feature fidelity")
    ap.add_argument("--size", type=int, default=1024, help="held-out scene size for map quality")
    args = ap.parse_args()

    from _common import benchmark_model

    from geodino.synth import SynthConfig, generate

    t0 = time.perf_counter()
    work = CACHE / "precision_quality"
    work.mkdir(parents=True, exist_ok=True)
    test_dir = work / f"test_{args.size}"
    if not (test_dir / "scene.tif").exists():
        generate(test_dir, SynthConfig(width=args.size, height=args.size, seed=27, nodata_collar=True), overwrite=True)
    from geodino.synth import SynthOutputs

    test = SynthOutputs(scene=test_dir / "scene.tif", landcover=test_dir / "landcover.tif",
                        canopy_height=test_dir / "canopy_height.tif")
    windows = scene_windows(test.scene, args.windows)

    arch_dir, _, _ = benchmark_model(args.arch)
    arch_out = work / f"{args.arch}_outliers"
    arch_how = outlier_copy(arch_dir, arch_out)
    demo_out = work / "demo_outliers" / "backbone"  # the heads check the backbone's folder name
    demo_how = outlier_copy(DEMO / "backbone", demo_out)

    result = {"benchmark": "precision_quality", "machine": machine(),
              "feature_windows": f"{args.windows} x 512^2 from synth seed 27", "map_scene": f"synth seed 27, {args.size}^2",
              "outliers": {"how": inject_outliers.__doc__.split("\n\n")[1].split("\n\n")[0].strip().replace("\n    ", " "),
                           args.arch: arch_how, "demo": demo_how}}
    for label, bb_dir, maps_dir in ((args.arch, arch_dir, None), (f"{args.arch}+outliers", arch_out, None),
                                    ("demo", DEMO / "backbone", DEMO / "backbone"),
                                    ("demo+outliers", demo_out, demo_out)):
        entry = {"features": feature_fidelity(bb_dir, windows)}
        if maps_dir is not None:
            entry["maps"] = map_quality(maps_dir, test, work, label)
            entry["verdict"] = verdict(entry["features"], entry["maps"])
        result[label] = entry
        print(json.dumps({label: entry}), file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
