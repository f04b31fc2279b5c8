"""geodino: georeferenced maps from satellite and aerial scenes with a frozen DINOv3 backbone."""

from __future__ import annotations

# Importing geodino changes nothing outside it: no environment variables, GDAL config or
# allocator settings (DESIGN invariant 10). The GDAL block cache and malloc arena settings that
# geodino's runs use are applied at the edge, scoped and documented in geodino.runtime.

__version__ = "0.1.0"

from geodino.errors import ConfigError, GeodinoError, InputError, ModelError

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
    "crowns": "geodino.trees",
    "CrownParams": "geodino.trees",
    "plot": "geodino.plot",
    "explore": "geodino.webmap",
    "similarity": "geodino.analysis",
    "cluster": "geodino.analysis",
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'geodino' has no attribute {name!r}")


__all__ = ["__version__", "GeodinoError", "InputError", "ConfigError", "ModelError", *_LAZY]
