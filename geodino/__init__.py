"""geodino: georeferenced maps from satellite and aerial scenes with a frozen DINOv3 backbone."""

from __future__ import annotations

import os as _os

# GDAL's block cache defaults to 5% of RAM and fills with every tile read or written; a
# fixed cap keeps geodino's memory flat in scene size. A value the user set wins.
_os.environ.setdefault("GDAL_CACHEMAX", "256")


def _return_freed_memory() -> None:
    """Let glibc hand freed window-sized buffers back to the OS.

    glibc raises its mmap threshold as large arrays are freed, after which window buffers
    come from heap arenas that fragment and never shrink; with many threads the resident
    size then creeps up with the number of windows. Fixed thresholds keep it flat. Values
    the user set through MALLOC_* variables win.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in _os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_return_freed_memory()

__version__ = "0.1.0"

from geodino.errors import ConfigError, GeodinoError, InputError, ModelError  # noqa: E402

__all__ = ["__version__", "GeodinoError", "InputError", "ConfigError", "ModelError"]
