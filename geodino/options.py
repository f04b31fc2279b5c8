"""Run options: the schema of pipeline YAML files, their validation and loading."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import rasterio

from geodino.errors import ConfigError
from geodino.tiling import WindowSpec

# The documented default backbone (`run --help` and `features --help` show it).
DEFAULT_BACKBONE = "facebook/dinov3-vitl16-pretrain-sat493m"


@dataclass
class RunOptions:
    """Everything a run needs besides the scene; also the schema of pipeline YAML files."""

    backbone: str = DEFAULT_BACKBONE
    canopy_head: str | None = None
    landcover_head: str | None = None
    canopy_model: str | None = None
    profile: str | None = None  # None: the heads' profile, else auto
    bands: list | None = None
    window: int = 512
    overlap: int = 64
    batch_size: int = 8  # 0: chosen from free GPU memory (8 on a CPU)
    chunks: int = 512
    device: str = "cpu"
    compile: bool = False
    target_gsd: float | None = None
    embeddings: bool = False
    embeddings_dtype: str = "float32"
    probabilities: bool = False
    polygons: bool = True
    min_polygon_area: float = 0.0
    scheduler: str = "threads"  # threads | local | tcp://host:port
    workers: int = 0  # threads per process for reading, blending and writing; 0: one per CPU core
    processes: int = 1  # worker processes with scheduler: local
    compress: str = "DEFLATE"
    layers: list | None = None  # backbone blocks the heads read (default: the backbone's usual four)
    crowns: bool = False  # individual trees (trees.gpkg, crowns.tif) from the canopy raster
    quicklook: bool = True  # write quicklook.png (scene, canopy height, land cover) beside the outputs
    precision: str | None = None  # fp32 | bf16 | int8; None: the device's default (fp32 CPU, bf16 CUDA); changes outputs

    @classmethod
    def from_mapping(cls, data: dict, source: str = "config") -> "RunOptions":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        out = cls()
        for key, value in data.items():
            setattr(out, key, _coerce(key, value, known[key].type, source))
        out.validate()
        return out

    def validate(self, scene: str | None = None, out: str | None = None) -> None:
        WindowSpec(self.window, self.overlap)
        if self.batch_size < 0:
            raise ConfigError("batch_size must be at least 1 (or 0 to choose it from free GPU memory)")
        if self.workers < 0 or self.processes < 1:
            raise ConfigError("workers must be 0 (one per CPU core) or more, and processes at least 1")
        if self.chunks < 16:
            raise ConfigError("chunks must be at least 16 pixels")
        if self.embeddings_dtype not in ("float16", "float32"):
            raise ConfigError("embeddings_dtype must be float16 or float32")
        if self.embeddings_dtype == "float16" and not _float16_supported():
            raise ConfigError(f"embeddings_dtype float16 needs rasterio >= 1.5 (this is {rasterio.__version__}); "
                              "use float32")
        if self.precision is not None:
            from geodino.precision import check_precision_name

            if check_precision_name(self.precision) == "int8" and self.canopy_model:
                raise ConfigError("precision int8 quantises geodino's backbone; Meta's canopy model (canopy_model) "
                                  "has its own backbone and is not quantised: use fp32 or bf16 with it")
        if self.compress.upper() not in ("DEFLATE", "ZSTD", "LZW"):
            raise ConfigError("compress must be DEFLATE, ZSTD or LZW")
        if self.crowns and not (self.canopy_head or self.canopy_model):
            raise ConfigError("crowns are found in the canopy-height map: give a canopy head or a canopy model")
        check_scheduler(self.scheduler)
        check_device(self.device)
        if not (self.canopy_head or self.landcover_head or self.canopy_model or self.embeddings):
            from geodino.first_run import nothing_to_compute

            raise ConfigError(nothing_to_compute(scene, out))


_SCHEDULER_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://[^\s/:]+(:\d+)$")
_DEVICE = re.compile(r"^(cpu|auto|cuda|cuda:\d+|mps)$")


def check_scheduler(value: str) -> None:
    """threads, local, or a dask scheduler address with a port (tcp://host:8786, tls://...)."""
    if value in ("threads", "local") or _SCHEDULER_ADDRESS.match(str(value)):
        return
    raise ConfigError(f"scheduler {value!r} is not threads, local or a scheduler address with a port "
                      "(e.g. tcp://10.0.0.5:8786 or tls://scheduler:8786)")


def check_device(value: str) -> None:
    """cpu, cuda, cuda:N, mps or auto; a CUDA device only where one is present."""
    if not _DEVICE.match(str(value)):
        raise ConfigError(f"device {value!r} is not one of cpu, cuda, cuda:N (N = GPU index), mps, auto")
    if value.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.split(":")[1]) if ":" in value else 0
        if count == 0:
            raise ConfigError(f"device {value} asked for, but no CUDA GPU is available here; "
                              "use --device cpu (or auto)")
        if index >= count:
            raise ConfigError(f"device {value} asked for, but there are {count} CUDA GPU(s) (cuda:0-cuda:{count - 1})")


def _float16_supported() -> bool:
    from rasterio import dtypes

    return "float16" in getattr(dtypes, "dtype_fwd", {}) or hasattr(dtypes, "float16")


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list}


def _coerce(key: str, value, annotation: str, source: str):
    names = [t.strip() for t in str(annotation).split("|")]
    if value is None:
        if "None" in names:
            return None
        raise ConfigError(f"{source}: {key} may not be empty")
    for name in names:
        t = _TYPES.get(name.split("[")[0])
        if t is None:
            continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is str and isinstance(value, str):
            return value
        if t is list and isinstance(value, list):
            return value
    raise ConfigError(f"{source}: {key} must be {' or '.join(n for n in names if n != 'None')}, "
                      f"got {type(value).__name__} {value!r}")


def load_pipeline(path: str | Path) -> RunOptions:
    """A validated RunOptions from a pipeline YAML file (relative model paths resolve against it)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: pipeline config not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value")
    # model paths written relative to the config file are found from anywhere; they stay as
    # relative as the config's own path was typed (reports record them relative to the output)
    for key in ("backbone", "canopy_head", "landcover_head", "canopy_model"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (p.parent / value).exists():
            data[key] = os.path.normpath(p.parent / value)
    return RunOptions.from_mapping(data, source=str(p))


__all__ = ["RunOptions", "check_device", "check_scheduler", "load_pipeline"]
