"""geodino: georeferenced maps from satellite and aerial scenes with a frozen DINOv3 backbone."""

from __future__ import annotations

__version__ = "0.1.0"

from geodino.errors import ConfigError, GeodinoError, InputError, ModelError  # noqa: E402

__all__ = ["__version__", "GeodinoError", "InputError", "ConfigError", "ModelError"]
