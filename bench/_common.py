"""Shared helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("GEODINO_BENCH_CACHE", "/tmp/geodino-bench"))

# Benchmarks are geodino's own processes, measured with the settings the CLI uses (importing
# geodino no longer applies them, see geodino.runtime): the 16 MB GDAL block cache and one malloc
# arena, here and in the child processes the scripts start. A value set by the caller wins.
os.environ.setdefault("GDAL_CACHEMAX", "16")
os.environ.setdefault("MALLOC_ARENA_MAX", "1")  # read by glibc in children at their start
if os.environ["MALLOC_ARENA_MAX"] == "1":
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # this process: M_ARENA_MAX (glibc only)
    except (OSError, AttributeError):
        pass


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def synthetic_scene(size: int, bands: str = "reflectance") -> Path:
    """A cached synthetic scene of size x size pixels (generated block by block once)."""
    from geodino.synth import SynthConfig, generate

    out = CACHE / f"scene_{size}"
    if not (out / "scene.tif").exists():
        generate(out, SynthConfig(width=size, height=size, seed=1), overwrite=True)
    return out / "scene.tif"


def rgb8_scene(size: int) -> Path:
    """A 3-band uint8 tiled DEFLATE scene (the peers' benchmark input), derived from the synthetic one."""
    import numpy as np
    import rasterio

    path = CACHE / f"rgb8_{size}.tif"
    if path.exists():
        return path
    src_path = synthetic_scene(size)
    with rasterio.open(src_path) as src:
        profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=src.crs,
                       transform=src.transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
        tmp = path.with_suffix(".partial.tif")
        with rasterio.open(tmp, "w", **profile) as dst:
            for _, win in src.block_windows(1):
                rgb = src.read([3, 2, 1], window=win).astype(np.float32)
                dst.write(np.clip(rgb / 3000 * 255, 0, 255).astype(np.uint8), window=win)
        os.replace(tmp, path)
    return path


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; return its last JSON line plus its peak RSS (MB)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.setdefault("peak_rss_mb", round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1))
    return result


PEAK = "import resource; peak = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)\n"


ARCHS = {
    "tiny": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384),
    "vits16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vitl16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def benchmark_model(arch: str) -> tuple[Path, Path, list[int]]:
    """A randomly initialised DINOv3 ViT of ``arch`` and a 7-class 1x1-conv head on its last layer.

    The peers' benchmark model: patch-grid logits, bilinear x16 upsampling. Cached on disk.
    """
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from geodino.classes import WORLDCOVER
    from geodino.heads import HeadMeta, build_head, save_head

    root = CACHE / f"model_{arch}"
    backbone, head = root / "backbone", root / "head"
    last = ARCHS[arch]["num_hidden_layers"] - 1
    if not (head / "head.json").exists():
        torch.manual_seed(0)
        config = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, layerscale_value=1.0, **ARCHS[arch])
        DINOv3ViTModel(config).save_pretrained(backbone)
        (backbone / "geodino_backbone.json").write_text(json.dumps({"family": "web", "layers": [last]}))
        meta = HeadMeta(task="landcover", head_type="linear", embed_dim=ARCHS[arch]["hidden_size"], num_layers=1,
                        backbone=str(backbone), backbone_layers=[last], profile="rgb8", family="web",
                        classes=WORLDCOVER.to_dict())
        save_head(build_head(meta).eval(), head)
    return backbone, head, [last]


def pattern_rgb8_scene(size: int) -> Path:
    """A 3-band uint8 tiled DEFLATE scene made in seconds: smooth colour fields plus noise.

    For throughput benchmarks, where the full synthetic generator (minutes at 8192^2) buys
    nothing: the pipeline's cost does not depend on what the pixels show.
    """
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    path = CACHE / f"pattern_rgb8_{size}.tif"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32737",
                   transform=from_origin(500000.0, 9000000.0, 0.6, 0.6), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate")
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".partial.tif")
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, 512):
            h = min(512, size - row)
            y = (np.arange(row, row + h, dtype=np.float32) / 700.0)[:, None]
            x = np.arange(size, dtype=np.float32)[None, :] / 900.0
            base = np.stack([np.sin(x + 0.7 * y), np.cos(1.3 * y - 0.4 * x), np.sin(0.5 * x * y + 1.0)])
            noise = rng.integers(-12, 13, size=(3, h, size), dtype=np.int16)
            dst.write(np.clip(110 + 60 * base + noise, 0, 255).astype(np.uint8),
                      window=rasterio.windows.Window(0, row, size, h))
    os.replace(tmp, path)
    return path
