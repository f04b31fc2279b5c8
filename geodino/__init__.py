"""geodino: georeferenced maps from satellite and aerial scenes with a frozen DINOv3 backbone."""

from __future__ import annotations

import os as _os

# GDAL's block cache defaults to 5% of RAM and fills with every tile read or written; a
# fixed cap keeps geodino's memory flat in scene size. A value the user set wins.
_os.environ.setdefault("GDAL_CACHEMAX", "256")

__version__ = "0.1.0"

from geodino.errors import ConfigError, GeodinoError, InputError, ModelError  # noqa: E402

__all__ = ["__version__", "GeodinoError", "InputError", "ConfigError", "ModelError"]
