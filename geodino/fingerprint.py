"""Run fingerprints: what a scene's outputs were made from, so a rerun can tell them apart.

A fingerprint records the scene files (path relative to the output folder, size and
modification time), every option that changes outputs, a content stamp of each model and
the geodino version. The options part is built from *all* :class:`~geodino.options.RunOptions`
fields less an explicit set of performance-only knobs, so an option added later is covered
without touching this module. Two fingerprints match when every part is equal;
:func:`differences` says which parts differ in words (``window 512 -> 256``).

Nothing here is a library's job: rasterio and dask have no notion of a run's provenance,
and hashing whole model files (gigabytes) on every run would cost more than a small scene.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import geodino

# Options that change how fast or where a run computes, never what it writes (DESIGN
# invariant 2: results do not depend on chunks, scheduler, batch size or window order).
PERFORMANCE_ONLY = frozenset({"workers", "processes", "scheduler", "chunks", "batch_size", "compile", "quiet", "progress"})
# Model options: identified by the content of what they name, not by how the path is spelled.
MODEL_OPTIONS = ("backbone", "canopy_head", "landcover_head", "canopy_model")

FULL_HASH_BYTES = 32 * 2**20  # files up to this size are hashed whole
SAMPLES = 16  # larger files: this many 1 MiB pieces at even offsets, plus the size
SAMPLE_BYTES = 2**20


def display_path(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """``path`` as recorded in reports and tags: relative to ``base`` (the output folder) when
    it is a local file or folder, else as given (hub ids, URLs). Never an absolute path of
    this machine, so reports can be shared and folders moved as a whole."""
    text = str(path)
    p = Path(text).expanduser()
    if text.startswith(("/vsi", "http://", "https://", "s3://", "gs://", "<")) or not p.exists():
        return text
    try:
        return Path(os.path.relpath(os.path.abspath(p), os.path.abspath(base))).as_posix()
    except ValueError:  # another drive (Windows): there is no relative path
        return p.name


def file_stamp(path: str | os.PathLike) -> str:
    """A content stamp of one file: sha256 of the whole file up to 32 MiB, else of its size
    and 16 evenly spread MiB (a weights file is rewritten whole, so a change shows there,
    and a 27 GB checkpoint is stamped in a fraction of a second)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with p.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            for piece in iter(lambda: f.read(2**20), b""):
                h.update(piece)
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def model_stamp(name: str | None) -> str | None:
    """A content stamp of a model: its files' stamps for a local file or folder, the cached
    snapshot's commit for a Hugging Face hub id, else the name itself."""
    if not name:
        return None
    p = Path(str(name)).expanduser()
    if p.is_file():
        return "file:" + file_stamp(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                h.update(f"{rel.as_posix()}:{file_stamp(f)};".encode())
        return "dir:" + h.hexdigest()[:16]
    return "hub:" + _hub_revision(str(name))


def _hub_revision(name: str) -> str:
    try:
        from geodino.backbone import resolve_name

        name = resolve_name(name)
    except ImportError:
        pass
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except (ImportError, ValueError):  # no hub library, or not a repo id: the name is all we know
        hit = None
    if isinstance(hit, str):
        return f"{name}@{Path(hit).parent.name}"  # .../snapshots/<commit>/config.json
    return name


def scene_stamp(path: str, out_dir: str | os.PathLike) -> dict:
    p = Path(path)
    entry = {"path": display_path(path, out_dir)}
    if p.is_file():
        st = p.stat()
        entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return entry


def _plain(value):
    """Option values in a JSON-stable form (band "3" and 3 are the same band)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def option_values(options) -> dict:
    """Every RunOptions field that changes outputs (all fields less the performance-only ones
    and the models, which are stamped by content)."""
    out = {}
    for f in dataclasses.fields(options):
        if f.name in PERFORMANCE_ONLY or f.name in MODEL_OPTIONS:
            continue
        out[f.name] = _plain(getattr(options, f.name))
    out["device"] = _device_kind(out.get("device"))
    return out


def _device_kind(device) -> str | None:
    """cpu or cuda: fp32 and bf16 give different numbers; which GPU does not matter."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device).split(":")[0]


def fingerprint(scene: str | Sequence[str], options, out_dir: str | os.PathLike) -> dict:
    """The fingerprint of running ``scene`` (a file, or the files of a mosaic) with ``options``
    into ``out_dir``."""
    paths = [scene] if isinstance(scene, (str, os.PathLike)) else list(scene)
    return {
        "geodino_version": geodino.__version__,
        "scene": [scene_stamp(str(p), out_dir) for p in paths],
        "options": option_values(options),
        "models": {role: {"path": display_path(getattr(options, role), out_dir),
                          "stamp": model_stamp(getattr(options, role))}
                   for role in MODEL_OPTIONS if getattr(options, role, None)},
    }


def differences(old: dict | None, new: dict) -> list[str]:
    """What differs between a recorded fingerprint and this run's, one phrase per item."""
    if not old:
        return ["the outputs were made by a geodino without run fingerprints"]
    diffs = []
    if old.get("geodino_version") != new["geodino_version"]:
        diffs.append(f"geodino_version {old.get('geodino_version')} -> {new['geodino_version']}")
    if len(old.get("scene", [])) != len(new["scene"]):
        diffs.append(f"scene files {len(old.get('scene', []))} -> {len(new['scene'])}")
    for a, b in zip(old.get("scene", []), new["scene"]):
        # a file is the same by name, size and modification time: the relative path changes
        # when the output folder moves, and is kept for people to read
        if _name(a.get("path")) != _name(b["path"]) or ("size" in a) != ("size" in b):
            diffs.append(f"scene {a.get('path')} -> {b['path']}")
        elif a.get("size") != b.get("size"):
            diffs.append(f"scene {b['path']} size {a.get('size')} -> {b.get('size')}")
        elif a.get("mtime_ns") != b.get("mtime_ns"):
            diffs.append(f"scene {b['path']} modified since")
    old_opts, new_opts = old.get("options", {}), new["options"]
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key, _MISSING) != new_opts.get(key, _MISSING):
            diffs.append(f"{key} {_show(old_opts.get(key, _MISSING))} -> {_show(new_opts.get(key, _MISSING))}")
    old_models, new_models = old.get("models", {}), new["models"]
    for role in MODEL_OPTIONS:
        a, b = old_models.get(role), new_models.get(role)
        if (a or {}).get("stamp") == (b or {}).get("stamp"):
            continue
        if a and b and a.get("path") == b.get("path"):
            diffs.append(f"{role} {b['path']}: its files changed")
        else:
            diffs.append(f"{role} {_show((a or {}).get('path'))} -> {_show((b or {}).get('path'))}")
    return diffs


_MISSING = object()


def _name(path) -> str:
    text = str(path)
    return Path(text).name if "://" not in text and not text.startswith(("/vsi", "<")) else text


def _show(value) -> str:
    if value is _MISSING:
        return "(absent)"
    if value is None:
        return "none"
    return str(value)


__all__ = [
    "MODEL_OPTIONS",
    "PERFORMANCE_ONLY",
    "differences",
    "display_path",
    "file_stamp",
    "fingerprint",
    "model_stamp",
    "option_values",
]
