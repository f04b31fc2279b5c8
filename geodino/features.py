"""Per-patch embeddings as a georeferenced raster, and the classic DINO PCA picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geodino.export import atomic_path, check_writable


def pca_picture(embeddings: str | Path, out: str | Path, *, sample: int = 100_000, overwrite: bool = False,
                seed: int = 0) -> Path:
    """Project embeddings on their first 3 principal components as an RGB GeoTIFF (uint8, nodata 0).

    The components are fitted on a sample of valid patches; each is stretched between its 1st
    and 99th percentile. Reads and writes strip by strip.
    """
    out = Path(out)
    check_writable([out], overwrite)
    rng = np.random.default_rng(seed)
    with rasterio.open(embeddings) as src:
        step = max(1, int(np.sqrt(src.width * src.height / sample)))
        shape = (src.count, max(1, src.height // step), max(1, src.width // step))
        decimated = src.read(out_shape=shape, resampling=rasterio.enums.Resampling.nearest).astype(np.float32)
        vectors = decimated.reshape(src.count, -1).T
        vectors = vectors[np.isfinite(vectors).all(axis=1)]
        if len(vectors) > sample:
            vectors = vectors[rng.choice(len(vectors), sample, replace=False)]
        mean = vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
        comps = vt[:3]
        # fix the sign so the picture does not flip between runs
        comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
        proj = (vectors - mean) @ comps.T
        lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
        hi = np.where(hi > lo, hi, lo + 1)
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=3, dtype="uint8", crs=src.crs,
                       transform=src.transform, nodata=0, tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate", photometric="RGB")
        with atomic_path(out) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            dst.update_tags(source=str(Path(embeddings).name), method="PCA of patch embeddings, 1-99% stretch")
            for i, name in enumerate(("PC1", "PC2", "PC3"), start=1):
                dst.set_band_description(i, name)
            for row in range(0, src.height, 256):
                win = Window(0, row, src.width, min(256, src.height - row))
                block = src.read(window=win).astype(np.float32)
                flat = block.reshape(src.count, -1).T
                ok = np.isfinite(flat).all(axis=1)
                rgb = np.zeros((flat.shape[0], 3), np.uint8)
                if ok.any():
                    p = (flat[ok] - mean) @ comps.T
                    rgb[ok] = (1 + np.clip((p - lo) / (hi - lo), 0, 1) * 254).astype(np.uint8)
                dst.write(rgb.T.reshape(3, win.height, win.width), window=win)
    return out


def write_features(scenes: list[str], out: str | Path, options, *, mosaic: bool = False,
                   overwrite: bool = False) -> list[Path]:
    """``geodino features``: embeddings + PCA picture per scene (OUT/<name>/ when several), or of one mosaic.

    Several files are mosaicked only when asked: two dates of one tile would otherwise be
    blended into one picture that shows neither.
    """
    from geodino.errors import InputError
    from geodino.pipeline import build_run, write_scene

    out = Path(out)
    if mosaic or len(scenes) == 1:
        jobs = [(scenes, out)]
    else:
        stems = [Path(s).stem for s in scenes]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise InputError(f"several scenes are named {', '.join(twice)}: their outputs would collide in "
                             f"{out}/<name>/; rename them, run them one by one, or pass --mosaic to mosaic them")
        jobs = [([s], out / stem) for s, stem in zip(scenes, stems)]
    for _, folder in jobs:
        check_writable([folder / "embeddings.tif", folder / "embeddings_pca.tif"], overwrite)
    written = []
    for paths, folder in jobs:
        run = build_run(paths if len(paths) > 1 else paths[0], options)
        write_scene(run, folder, overwrite=overwrite)
        written += [folder / "embeddings.tif",
                    pca_picture(folder / "embeddings.tif", folder / "embeddings_pca.tif", overwrite=overwrite)]
    return written
