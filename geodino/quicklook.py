"""A PNG overview of a run: the scene, canopy height and land cover side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from geodino.export import atomic_path


def _read(path: Path, max_size: int, bands=None, resampling=Resampling.nearest):
    with rasterio.open(path) as src:
        scale = max(1.0, max(src.width, src.height) / max_size)
        shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        idx = bands or [1]
        data = src.read(idx, out_shape=(len(idx),) + shape, resampling=resampling, masked=True)
        cmap = None
        try:
            cmap = src.colormap(1)
        except ValueError:
            pass
        return data, cmap, src.tags(1)


def quicklook(scene_rgb: tuple[Path, list[int]], out_dir: Path, png: Path, max_size: int = 1000) -> Path:
    """Write ``png`` showing the scene (RGB bands), canopy_height.tif and landcover.tif of ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    panels = []
    scene, bands = scene_rgb
    rgb, _, _ = _read(scene, max_size, bands, Resampling.average)
    img = rgb.astype(np.float32).filled(np.nan)
    lo, hi = np.nanpercentile(img, 2), np.nanpercentile(img, 98)
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1).transpose(1, 2, 0)
    panels.append(("scene", img, {}))
    if (out_dir / "canopy_height.tif").exists():
        chm, _, _ = _read(out_dir / "canopy_height.tif", max_size, resampling=Resampling.average)
        panels.append(("canopy height (m)", chm[0].filled(np.nan), {"cmap": "viridis", "vmin": 0}))
    legend = None
    if (out_dir / "landcover.tif").exists():
        lc, cmap, tags = _read(out_dir / "landcover.tif", max_size)
        table = np.zeros((256, 4))
        for code, color in (cmap or {}).items():
            table[code] = np.array(color) / 255.0
        panels.append(("land cover", lc[0].filled(0), {"cmap": ListedColormap(table), "vmin": 0, "vmax": 255,
                                                        "interpolation": "nearest"}))
        codes = [int(c) for c in tags.get("class_codes", "").split(",") if c]
        names = tags.get("class_names", "").split(",")
        legend = [Patch(color=table[c], label=n) for c, n in zip(codes, names)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.5))
    axes = np.atleast_1d(axes)
    for ax, (title, data, kw) in zip(axes, panels):
        im = ax.imshow(data, **kw)
        ax.set_title(title)
        ax.set_axis_off()
        if title.startswith("canopy"):
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if legend:
        axes[-1].legend(handles=legend, loc="lower left", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return png
