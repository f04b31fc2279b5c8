"""``quicklook.png``: the scene, canopy height and land cover of a run side by side.

Drawn by :func:`geodino.plot.side_by_side` (map axes, metres colourbar, class legend outside
the map) and cut to its tight bounding box so that titles and legend are never cut.

It is on a run's critical tail, so it does the least work that gives the same picture: the
rasters (read at ``max_size``, which also sets the height colour scale) reach imshow already
thinned to the pixels a panel can show, the figure is drawn once (see :func:`save_tight_png`)
and encoded as RGB with fast zlib settings.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from geodino.export import atomic_path

QUICKLOOK = "quicklook.png"
PAD_INCHES = 0.15  # white margin around the tight bounding box
# measured on an 8192^2 run's quicklook: RGB at zlib level 4 takes half the encoding time of
# savefig's RGBA at the default level 6, for 10 % fewer bytes (RGB at level 6: a third more
# time for 0.6 % fewer bytes)
COMPRESS_LEVEL = 4


def quicklook(out_dir: str | Path, png: str | Path | None = None, *, scene=None, stretch=None,
              max_size: int = 800, dpi: int = 90, files: dict | None = None) -> Path:
    """Write ``png`` (default ``out_dir/quicklook.png``) from the GeoTIFFs in ``out_dir``.

    ``scene``: the scene to show first (a Scene, a file or a DataArray; ``stretch`` its (lo, hi)
    per band); without it, the scene recorded in ``out_dir/report.json`` if there is one. A
    Scene is drawn from its decimated read (:meth:`geodino.scene.Scene.read_overview`): the one
    its run made for its checks, if it made one. ``files``: {output name: GeoTIFF} to draw
    instead of ``out_dir``'s (a run draws its outputs before they are renamed into place).
    ``max_size``: the most pixels a side read for a panel (it shows fewer: see
    :func:`thin_images`).
    """
    from geodino.plot import side_by_side

    out_dir = Path(out_dir)
    png = Path(png) if png is not None else out_dir / QUICKLOOK
    # a figure of its own that pyplot never sees: this also runs inside notebooks and threads
    fig = side_by_side(files if files is not None else out_dir, scene_source=scene, stretch=stretch,
                       max_size=max_size, pyplot=False)
    thin_images(fig, dpi)
    with atomic_path(png) as tmp:
        save_tight_png(fig, tmp, dpi=dpi, pad_inches=PAD_INCHES)
    return png


def thin_images(fig, dpi: float) -> None:
    """Keep no more rows and columns of each image in ``fig`` (map axes in one row) than its
    axes can have pixels at ``dpi``, the nearest to where they fall: what imshow's
    nearest-neighbour resampling keeps of a larger array, which costs imshow more than the
    figure shows. Images keep their extent."""
    maps = [ax for ax in fig.axes if ax.get_images()]
    width, height = fig.get_size_inches()
    # an axes of a row of n is at most the figure's height tall and an n-th of its width wide
    pixels = math.ceil(max(width / max(len(maps), 1), height) * dpi)
    for ax in maps:
        for image in ax.get_images():
            data = image.get_array()
            rows, cols = (_nearest(n, pixels) for n in data.shape[:2])
            image.set_data(data[rows][:, cols])


def _nearest(n: int, size: int) -> slice | np.ndarray:
    """Indices of ``min(n, size)`` samples of ``n`` at their centres."""
    if n <= size:
        return slice(None)
    return ((np.arange(size) + 0.5) * (n / size)).astype(np.intp)


def save_tight_png(fig, path: str | Path, *, dpi: float, pad_inches: float = PAD_INCHES) -> None:
    """Save ``fig`` as a PNG cut to its tight bounding box plus ``pad_inches``, drawing it once.

    What ``fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=pad_inches)`` shows, but
    savefig draws a laid-out figure twice (a pass that lays it out and finds the box, then the
    picture, shifted into the box): here one Agg draw lays the figure out and paints it, and
    the box is cut from its pixels (the figure's face colour where the pad reaches past the
    figure). Written by hand because matplotlib has no single-draw tight save. An artist that
    reaches outside the figure (possible without a layout engine) is not in those pixels: such
    a figure is saved by savefig. For a figure that pyplot does not manage: its canvas becomes
    an Agg one and its dpi ``dpi``.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    tight = fig.get_tightbbox(canvas.get_renderer())
    inside = fig.bbox_inches.padded(1 / dpi)  # a pixel's grace: text extents are rounded
    if not (inside.x0 <= tight.x0 and tight.x1 <= inside.x1 and inside.y0 <= tight.y0 and tight.y1 <= inside.y1):
        fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight", pad_inches=pad_inches,
                    pil_kwargs={"compress_level": COMPRESS_LEVEL})
        return
    box = tight.padded(pad_inches)
    pixels = np.asarray(canvas.buffer_rgba())
    height, width = pixels.shape[:2]
    # the box in buffer pixels: columns from the left, rows from the top
    left, right = round(box.x0 * dpi), round(box.x1 * dpi)
    top, bottom = round(height - box.y1 * dpi), round(height - box.y0 * dpi)
    face = np.round(np.array(to_rgba(fig.get_facecolor())) * 255).astype(np.uint8)
    # RGB when nothing is see-through (the usual white face): a quarter fewer bytes to encode
    bands = 3 if face[3] == 255 and (pixels[..., 3] == 255).all() else 4
    out = np.empty((bottom - top, right - left, bands), np.uint8)
    out[:] = face[:bands]
    y0, y1, x0, x1 = max(top, 0), min(bottom, height), max(left, 0), min(right, width)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1, :bands]
    info = PngInfo()  # what savefig records
    info.add_text("Software", f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/")
    Image.fromarray(out).save(path, format="png", dpi=(dpi, dpi), pnginfo=info, compress_level=COMPRESS_LEVEL)


__all__ = ["QUICKLOOK", "quicklook", "save_tight_png", "thin_images"]
