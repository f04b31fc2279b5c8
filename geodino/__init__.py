"""geodino: georeferenced maps from satellite and aerial scenes with a frozen DINOv3 backbone."""

from __future__ import annotations

import os as _os

# GDAL's block cache defaults to 5% of RAM and fills with every tile read or written, so
# resident memory grew with the scene until it was full. Windows on one row share only a
# few source tiles (those of the row above are a whole scene-width away), so 16 MB keeps the
# reuse that matters: 16384^2 stitch peak RSS 620 (64 MB) -> ~340 MB, with tiles under two
# rows of windows decoded twice. Striped sources raise it to a window row of strips when
# stitching (geodino.scene.ensure_block_cache). A value the user set wins.
_os.environ.setdefault("GDAL_CACHEMAX", "16")


def _limit_malloc_arenas() -> None:
    """Use one glibc malloc arena (as MALLOC_ARENA_MAX=1 would).

    Reader, blender and writer threads each get an arena by default; window-sized buffers
    freed in one and never reused fragment them all, and resident memory creeps up with the
    number of windows. Measured: peak RSS of a 16384 x 16384 stitch 1335 -> 1001 MB with two
    arenas; with one (and malloc_trim after each wave) 16384^2/2048^2 stitch 1.27x -> 1.22x,
    end to end 1.17x -> 1.14x, no slower (the threads allocate big buffers, rarely).
    A MALLOC_ARENA_MAX the user set wins.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in _os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


_limit_malloc_arenas()

__version__ = "0.1.0"

from geodino.errors import ConfigError, GeodinoError, InputError, ModelError  # noqa: E402

# The public API, imported on first use so that `import geodino` stays light.
_LAZY = {
    "open_scene": "geodino.scene",
    "Scene": "geodino.scene",
    "load_backbone": "geodino.backbone",
    "run_scene": "geodino.pipeline",
    "run_scenes": "geodino.runner",
    "build_run": "geodino.pipeline",
    "write_scene": "geodino.pipeline",
    "RunOptions": "geodino.options",
    "load_pipeline": "geodino.options",
    "CanopyHeightHead": "geodino.heads",
    "LandCoverHead": "geodino.heads",
    "load_head": "geodino.heads",
    "save_head": "geodino.heads",
    "fit": "geodino.train",
    "FitConfig": "geodino.train",
    "metrics": "geodino.metrics",
    "synth": "geodino.synth",
    # change between dates; not in a module named "change", whose import would shadow the function
    "change": "geodino.change_run",
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'geodino' has no attribute {name!r}")


__all__ = ["__version__", "GeodinoError", "InputError", "ConfigError", "ModelError", *_LAZY]
