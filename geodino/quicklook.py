"""``quicklook.png``: the scene, canopy height and land cover of a run side by side.

Drawn by :func:`geodino.plot.side_by_side` (map axes, metres colourbar, class legend outside
the map) and saved with a tight bounding box so that titles and legend are never cut.
"""

from __future__ import annotations

from pathlib import Path

from geodino.export import atomic_path

QUICKLOOK = "quicklook.png"


def quicklook(out_dir: str | Path, png: str | Path | None = None, *, scene=None, stretch=None,
              max_size: int = 800, dpi: int = 90, files: dict | None = None) -> Path:
    """Write ``png`` (default ``out_dir/quicklook.png``) from the GeoTIFFs in ``out_dir``.

    ``scene``: the scene to show first (a Scene, a file or a DataArray; ``stretch`` its (lo, hi)
    per band); without it, the scene recorded in ``out_dir/report.json`` if there is one. A
    Scene is drawn from the decimated read its run has already made (no second decode).
    ``files``: {output name: GeoTIFF} to draw instead of ``out_dir``'s (a run draws its
    outputs before they are renamed into place).
    """
    from geodino.plot import side_by_side

    out_dir = Path(out_dir)
    png = Path(png) if png is not None else out_dir / QUICKLOOK
    # a figure of its own that pyplot never sees: this also runs inside notebooks and threads
    fig = side_by_side(files if files is not None else out_dir, scene_source=scene, stretch=stretch,
                       max_size=max_size, pyplot=False)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.15)
    return png


__all__ = ["QUICKLOOK", "quicklook"]
