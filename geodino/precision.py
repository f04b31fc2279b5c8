"""Numeric precision of the backbone: fp32, bf16 (autocast) or int8 (dynamically quantised).

Reduced precision is a choice, never silent (invariant 11): the default is the device's
(fp32 on a CPU, bf16 autocast on CUDA, as before), a run records the precision it used, and
each precision offered has measured quality against fp32 (``bench/precision_quality.py``).

- ``fp32``: the reference.
- ``bf16``: the backbone under ``torch.autocast(dtype=bfloat16)``. On a CPU only where the CPU
  has native bf16 dot products (AVX512-BF16 or AMX); elsewhere oneDNN emulates bf16 and it is
  slower than fp32, so it is refused rather than quietly made slow.
- ``int8``: the backbone's linear layers with int8 weights (per output channel) and int8
  activations quantised per token at run time; see :mod:`geodino.int8`. CPU only.
- ``fp16`` is refused: DINOv3 activations overflow in float16.

Heads always run in fp32 on a CPU (on CUDA they keep today's bf16 autocast under ``bf16``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch

from geodino.errors import ConfigError, ModelError

PRECISIONS = ("fp32", "bf16", "int8")
_FP16 = ("fp16", "float16", "half")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "torch.float32": "fp32", "torch.bfloat16": "bf16"}


class PrecisionWarning(UserWarning):
    """A reduced precision whose measured quality misses geodino's bar on some backbones."""


def check_precision_name(name: str) -> str:
    """The canonical name of a precision (fp32, bf16, int8), or a ConfigError that says why not."""
    key = str(name).strip().lower()
    if key in _FP16 or key == "torch.float16":
        raise ConfigError(f"precision {name}: DINOv3 activations overflow in float16; "
                          "use bf16 (CUDA, or a CPU with AVX512-BF16/AMX), int8 (CPU) or fp32")
    key = _ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ConfigError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return key


@functools.cache
def cpu_bf16_flags() -> frozenset[str]:
    """The CPU's native bf16 features (avx512_bf16, amx_bf16) from /proc/cpuinfo; empty elsewhere.

    ``torch.backends.cpu.get_cpu_capability()`` only says "AVX512" or "AMX"; AVX-512 without
    the BF16 extension runs bf16 through emulation, so the flags are read directly.
    """
    found: set[str] = set()
    if torch.backends.cpu.get_cpu_capability().upper().startswith("AMX"):
        found.add("amx_bf16")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset(found)
    for line in text.splitlines():
        if line.startswith("flags"):
            found |= {f for f in line.split(":", 1)[1].split() if f in ("avx512_bf16", "amx_bf16")}
            break
    return frozenset(found)


def cpu_supports_bf16() -> bool:
    """Whether bf16 autocast on this CPU uses native bf16 instructions."""
    return bool(cpu_bf16_flags())


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision a backbone on ``device`` runs at: the device default for None, else checked."""
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    name = check_precision_name(precision)
    if name == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        raise ModelError("precision bf16 on this CPU: it has no native bf16 instructions (AVX512-BF16 "
                         "or AMX), so bf16 would be emulated and slower than fp32; use --precision fp32 "
                         "or int8")
    if name == "int8" and device.type != "cpu":
        raise ModelError(f"precision int8 runs on the CPU only (geodino's int8 kernels are CPU kernels); "
                         f"on {device.type} use bf16 (the default there) or fp32, or --device cpu")
    return name


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the backbone's forward is autocast to (None: no autocast)."""
    return torch.bfloat16 if precision == "bf16" else None


def head_autocast(backbone) -> contextlib.AbstractContextManager:
    """The autocast context heads run in: fp32, except CUDA at bf16 (heads ran so before)."""
    device = backbone.device
    enabled = device.type == "cuda" and getattr(backbone, "precision", "bf16") == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# Measured quality against fp32 (bench/precision_quality.py, see BENCHMARKS.md): where a
# precision misses a bar on a backbone with the activation outliers trained ViTs have, the
# measured loss is printed when that precision is chosen.
QUALITY_BARS = {"patch_cosine_mean": 0.99, "patch_cosine_p1": 0.95, "canopy_mae_ratio": 1.05, "miou_drop": 0.02}
# The worst of bench/precision_quality.py's backbones with injected outliers (ViT-S/16 for
# features, the demo model for maps), 2026-11-28; both precisions meet every bar, so choosing
# them prints nothing. A precision that missed one would warn with these figures.
MEASURED_QUALITY: dict[str, dict[str, float | str]] = {
    "bf16": {"patch_cosine_mean": 0.99999, "patch_cosine_p1": 0.99998, "canopy_mae_ratio": 0.9988,
             "miou_drop": -0.0006, "where": "bench/precision_quality.py, 2026-11-28"},
    "int8": {"patch_cosine_mean": 0.99647, "patch_cosine_p1": 0.99083, "canopy_mae_ratio": 1.0058,
             "miou_drop": 0.0007, "where": "bench/precision_quality.py, 2026-11-28"},
}


def quality_warning(precision: str) -> str | None:
    """A sentence with the measured loss of ``precision`` where it misses a bar, else None."""
    m = MEASURED_QUALITY.get(precision)
    if not m:
        return None
    misses = []
    if m.get("patch_cosine_mean", 1.0) < QUALITY_BARS["patch_cosine_mean"]:
        misses.append(f"patch-feature cosine similarity to fp32 {m['patch_cosine_mean']:.3f} mean "
                      f"(bar {QUALITY_BARS['patch_cosine_mean']})")
    if m.get("patch_cosine_p1", 1.0) < QUALITY_BARS["patch_cosine_p1"]:
        misses.append(f"{m['patch_cosine_p1']:.3f} at the 1st percentile (bar {QUALITY_BARS['patch_cosine_p1']})")
    if m.get("canopy_mae_ratio", 1.0) > QUALITY_BARS["canopy_mae_ratio"]:
        misses.append(f"canopy MAE {100 * (m['canopy_mae_ratio'] - 1):+.1f}% vs fp32 (bar +5%)")
    if m.get("miou_drop", 0.0) > QUALITY_BARS["miou_drop"]:
        misses.append(f"land-cover mIoU {-m['miou_drop']:+.3f} vs fp32 (bar -0.02)")
    if not misses:
        return None
    return (f"precision {precision}: on a backbone with the activation outliers of trained ViTs geodino "
            f"measured {'; '.join(misses)} ({m.get('where', 'bench/precision_quality.py')}). "
            "Compare with an fp32 run on part of your scene before relying on it.")


@functools.cache
def warn_if_lossy(precision: str) -> None:
    """Warn once per process when a chosen precision misses a measured quality bar."""
    message = quality_warning(precision)
    if message:
        warnings.warn(message, PrecisionWarning, stacklevel=3)


__all__ = [
    "PRECISIONS",
    "PrecisionWarning",
    "autocast_dtype",
    "check_precision_name",
    "cpu_supports_bf16",
    "head_autocast",
    "quality_warning",
    "resolve_precision",
    "warn_if_lossy",
]
