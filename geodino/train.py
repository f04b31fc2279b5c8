"""Fitting task heads on frozen DINOv3 features.

Labels (a raster on any grid, or polygons) are aligned to the scene's processing grid
(:mod:`geodino.labels`), windows are sampled where labels exist and split into train and validation by spatial
blocks, backbone features of each window are computed once and cached on disk (zarr), and
the head is fitted on the cache for as many epochs as asked without running the backbone
again. The result is saved as a self-describing head folder with its validation metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from geodino.errors import ConfigError, InputError
from geodino.heads import HeadMeta, build_head, save_head
from geodino.labels import Labels
from geodino.metrics import ClassAccumulator, HeightAccumulator
from geodino.progress import Progress
from geodino.tiling import Tile, WindowSpec, read_tile, window_grid


@dataclass
class FitConfig:
    task: str  # canopy | landcover
    scene: str
    labels: str
    backbone: str
    out: str
    head_type: str | None = None  # canopy: dpt (default) or linear; landcover: linear
    profile: str = "auto"
    bands: list | None = None
    window: int = 256
    class_column: str | None = None  # polygons: the class code (landcover) or height (canopy) column
    name_column: str | None = None  # polygons: class names
    epochs: int = 30
    batch_size: int = 4
    lr: float = 2e-3
    loss: str = "silog"  # canopy: silog, l1 or l2 (L1 fits the median: 0 m where crowns are sparse)
    val_fraction: float = 0.2
    split_block: int = 2  # windows per side of a split block
    min_labelled: int = 1  # labelled pixels a window needs
    seed: int = 0
    cache_dir: str | None = None
    device: str = "cpu"
    hidden: int = 32

    def validate(self) -> None:
        if self.task not in ("canopy", "landcover"):
            raise ConfigError(f"unknown task {self.task!r}; use canopy or landcover")
        if self.loss not in ("l1", "l2", "silog"):
            raise ConfigError("loss must be l1, l2 or silog")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        WindowSpec(self.window, 0)


# --------------------------------------------------------------------------------------
# sampling and splitting


def labelled_tiles(labels: Labels, tiles: Sequence[Tile], min_labelled: int = 1) -> list[tuple[Tile, int]]:
    out = []
    for t in tiles:
        y = labels.read(t)
        n = int(np.isfinite(y).sum()) if labels.task == "canopy" else int((y >= 0).sum())
        if n >= min_labelled:
            out.append((t, n))
    return out


def _overlaps(a: Tile, b: Tile) -> bool:
    return a.row < b.row + b.size and b.row < a.row + a.size and a.col < b.col + b.size and b.col < a.col + a.size


def blocked_split(tiles: Sequence[Tile], val_fraction: float, block: int, seed: int,
                  stride: int) -> tuple[list[Tile], list[Tile]]:
    """Spatially blocked train/validation split: whole blocks of windows go to validation, and
    training windows that overlap any validation window are dropped."""
    if val_fraction <= 0 or len(tiles) < 2:
        return list(tiles), []
    span = block * stride
    blocks: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        blocks.setdefault((t.row // span, t.col // span), []).append(t)
    keys = sorted(blocks)
    order = np.random.default_rng(seed).permutation(len(keys))
    val: list[Tile] = []
    target = max(1, round(val_fraction * len(tiles)))
    for taken, i in enumerate(order):
        if len(val) >= target or taken >= len(keys) - 1:  # keep at least one block for training
            break
        val.extend(blocks[keys[i]])
    if not val:
        # a single block: hold out one window of it, still without overlap
        val = [tiles[int(np.random.default_rng(seed).integers(len(tiles)))]]
    train = [t for t in tiles if t not in val and not any(_overlaps(t, v) for v in val)]
    return train, sorted(val, key=lambda t: t.index)


# --------------------------------------------------------------------------------------
# feature cache


class FeatureCache:
    """Backbone layers, labels and validity of the sampled windows, in a zarr store on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def complete(self) -> bool:
        return (self.root / "geodino_cache.json").exists()

    def build(self, scene, normalise, backbone, labels: Labels, tiles: Sequence[Tile], batch_size: int) -> None:
        import zarr

        n = len(tiles)
        s = tiles[0].size
        g = s // backbone.patch_size
        d = backbone.embed_dim * len(backbone.layers)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(self.root), mode="w")
        feats = root.create_array("features", shape=(n, d, g, g), chunks=(1, d, g, g), dtype="float16")
        label_dtype = "float32" if labels.task == "canopy" else "int16"
        targets = root.create_array("labels", shape=(n, s, s), chunks=(1, s, s), dtype=label_dtype)
        valid = root.create_array("valid", shape=(n, s, s), chunks=(1, s, s), dtype="bool")
        with Progress("features", total=n) as bar:
            for i in range(0, n, batch_size):
                chunk = tiles[i:i + batch_size]
                xs, vs = zip(*(read_tile(scene, normalise, t) for t in chunk))
                out = backbone(torch.from_numpy(np.stack(xs)))
                feats[i:i + len(chunk)] = torch.cat(out.layers, dim=1).cpu().numpy().astype(np.float16)
                targets[i:i + len(chunk)] = np.stack([labels.read(t) for t in chunk]).astype(label_dtype)
                valid[i:i + len(chunk)] = np.stack(vs)
                bar.advance(len(chunk))
        (self.root / "geodino_cache.json").write_text(json.dumps({"windows": [asdict(t) for t in tiles]}))

    def arrays(self):
        import zarr

        root = zarr.open_group(str(self.root), mode="r")
        return root["features"], root["labels"], root["valid"]


def _cache_key(cfg: FitConfig, scene, backbone, tiles) -> str:
    parts = [os.path.abspath(cfg.scene), _mtime(cfg.scene), os.path.abspath(cfg.labels), _mtime(cfg.labels),
             backbone.name, str(backbone.layers), cfg.profile, str(cfg.bands), str(cfg.window),
             str(cfg.class_column), str([asdict(t) for t in tiles])]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _mtime(path: str) -> str:
    try:
        return str(os.stat(path).st_mtime_ns)
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# fitting


def _silog(pred, target, lam: float = 0.85, eps: float = 1.0):
    d = torch.log(pred + eps) - torch.log(target + eps)
    return torch.sqrt((d ** 2).mean() - lam * d.mean() ** 2 + 1e-8)


@dataclass
class FitResult:
    """``metrics``: on the validation windows (None when there were none);
    ``training_metrics``: on the training windows (how well the head fits its own labels)."""

    head_dir: Path
    metrics: dict | None
    baseline: dict
    train_windows: int
    val_windows: int
    backbone_calls: int = 0
    history: list = field(default_factory=list)
    training_metrics: dict = field(default_factory=dict)


def fit(cfg: FitConfig, *, backbone=None, progress: bool = True) -> FitResult:
    """Fit a head on one scene's labels and save it to ``cfg.out``."""
    from geodino.backbone import load_backbone
    from geodino.scene import open_scene
    from geodino.sensor import prepare

    cfg.validate()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    backbone = backbone or load_backbone(cfg.backbone, cfg.device)
    scene, norm = prepare(open_scene(cfg.scene), cfg.profile, backbone.info.family, cfg.bands)
    labels = Labels(cfg.labels, scene, cfg.task, class_column=cfg.class_column, name_column=cfg.name_column)
    spec = WindowSpec(cfg.window, 0)
    all_tiles = window_grid(scene.grid.height, scene.grid.width, spec)
    sampled = labelled_tiles(labels, all_tiles, cfg.min_labelled)
    if not sampled:
        raise InputError(f"{cfg.labels}: no labels fall inside {cfg.scene} (check the CRS and extent)")
    tiles = [t for t, _ in sampled]
    train_tiles, val_tiles = blocked_split(tiles, cfg.val_fraction, cfg.split_block, cfg.seed, spec.stride)

    cache_root = Path(cfg.cache_dir or (Path(cfg.out) / ".feature-cache"))
    cache = FeatureCache(cache_root / f"{_cache_key(cfg, scene, backbone, tiles)}.zarr")
    calls = [0]
    if not cache.complete:
        counting = _CountingBackbone(backbone, calls)
        cache.build(scene, norm, counting, labels, tiles, cfg.batch_size)
    feats, targets, valid = cache.arrays()
    index = {t.index: i for i, t in enumerate(tiles)}
    train_idx = [index[t.index] for t in train_tiles]
    val_idx = [index[t.index] for t in val_tiles]

    head_type = cfg.head_type or ("dpt" if cfg.task == "canopy" else "linear")
    classes = labels.classes
    meta = HeadMeta(task=cfg.task, head_type=head_type, embed_dim=backbone.embed_dim,
                    num_layers=len(backbone.layers), backbone=str(cfg.backbone),
                    backbone_layers=list(backbone.layers), patch_size=backbone.patch_size, profile=norm.profile,
                    family=backbone.info.family, window=cfg.window, overlap=64 if cfg.window > 128 else 32,
                    hidden=cfg.hidden, classes=classes.to_dict() if classes else None,
                    units="m" if cfg.task == "canopy" else None, gsd=_pixel_size(scene))
    head = build_head(meta).to(backbone.device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    rng = np.random.default_rng(cfg.seed)
    history = []
    d = backbone.embed_dim

    def batch(ids):
        ids = sorted(ids)
        x = torch.from_numpy(np.stack([feats[i] for i in ids]).astype(np.float32)).to(backbone.device)
        layers = list(x.split(d, dim=1))
        y = torch.from_numpy(np.stack([targets[i] for i in ids]).astype(
            np.float32 if cfg.task == "canopy" else np.int64)).to(backbone.device)
        return layers, y

    with Progress(f"fit {cfg.task}", total=cfg.epochs, unit="epochs", enabled=None if progress else False) as bar:
        for epoch in range(cfg.epochs):
            head.train()
            order = rng.permutation(train_idx)
            total = 0.0
            for i in range(0, len(order), cfg.batch_size):
                layers, y = batch(order[i:i + cfg.batch_size])
                loss = _loss(head, layers, y, cfg)
                if loss is None:
                    continue
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            sched.step()
            history.append(round(total, 6))
            bar.advance()
    head.eval()
    stats = _train_stats(targets, train_idx, cfg.task, classes)
    train_metrics, train_baseline = _evaluate(head, batch, train_idx, cfg, classes, train_stats=stats)
    if val_idx:
        metrics, baseline = _evaluate(head, batch, val_idx, cfg, classes, train_stats=stats)
    else:
        # no held-out data: there is nothing to say about accuracy elsewhere, and we say so
        metrics, baseline = None, train_baseline
        warnings.warn(NO_VALIDATION.format(n=len(train_idx)), NoValidationWarning, stacklevel=2)
    meta.training = {"scene": str(cfg.scene), "labels": str(cfg.labels), "train_windows": len(train_idx),
                     "val_windows": len(val_idx), "epochs": cfg.epochs, "lr": cfg.lr, "loss": cfg.loss,
                     "seed": cfg.seed, "split": f"spatial blocks of {cfg.split_block}x{cfg.split_block} windows",
                     "baseline_on": "validation windows" if val_idx else "training windows (no held-out block)"}
    meta.metrics = {"training": train_metrics, "validation": metrics, "baseline": baseline}
    out = save_head(head, cfg.out)
    return FitResult(out, metrics, baseline, len(train_idx), len(val_idx), calls[0], history,
                     training_metrics=train_metrics)


class NoValidationWarning(UserWarning):
    """A head was fitted without held-out windows: its metrics are training metrics only."""


NO_VALIDATION = ("NO VALIDATION DATA: all {n} labelled windows were used for training (val_fraction 0, or too "
                 "few windows to hold a block out). Only training metrics exist; they say how well the head "
                 "fits its own labels, not how accurate it is elsewhere. Label more area or raise val_fraction.")


def _pixel_size(scene) -> float | None:
    """The scene's pixel size in metres (None in a geographic CRS, which has no metre pixels)."""
    grid = scene.grid
    return round(float(abs(grid.res[0])), 6) if grid.crs is not None and grid.crs.is_projected else None


class _CountingBackbone:
    def __init__(self, backbone, calls) -> None:
        self.backbone, self.calls = backbone, calls
        self.patch_size, self.embed_dim, self.layers = backbone.patch_size, backbone.embed_dim, backbone.layers

    def __call__(self, x):
        self.calls[0] += 1
        return self.backbone(x)


def _loss(head, layers, y, cfg):
    if cfg.task == "canopy":
        ok = torch.isfinite(y)
        if not ok.any():
            return None
        # the loss sees heights before the final ReLU: through a ReLU, the many 0 m pixels would
        # push outputs negative, where no gradient reaches them again
        raw = head.raw(layers, tuple(y.shape[-2:]))[:, 0]
        if cfg.loss == "silog":
            return _silog(F.softplus(raw)[ok], y[ok]) + 0.1 * F.l1_loss(raw[ok], y[ok])
        if cfg.loss == "l2":
            return F.mse_loss(raw[ok], y[ok])
        return F.l1_loss(raw[ok], y[ok])
    if not (y >= 0).any():
        return None
    logits = head(layers, tuple(y.shape[-2:]))
    return F.cross_entropy(logits, y, ignore_index=-1)


def _train_stats(targets, idx, task, classes):
    if task == "canopy":
        total, n = 0.0, 0
        for i in idx:
            y = np.asarray(targets[i], np.float64)
            ok = np.isfinite(y)
            total += y[ok].sum()
            n += ok.sum()
        return {"mean": total / max(n, 1)}
    counts = np.zeros(len(classes), np.int64)
    for i in idx:
        y = np.asarray(targets[i]).ravel()
        counts += np.bincount(y[y >= 0], minlength=len(classes))
    return {"majority": int(np.argmax(counts))}


@torch.no_grad()
def _evaluate(head, batch, idx, cfg, classes, train_stats):
    if cfg.task == "canopy":
        acc, base = HeightAccumulator(), HeightAccumulator()
    else:
        acc, base = ClassAccumulator(classes.codes), ClassAccumulator(classes.codes)
    codes = np.asarray(classes.codes) if classes else None
    for i in range(0, len(idx), cfg.batch_size):
        layers, y = batch(idx[i:i + cfg.batch_size])
        y = y.cpu().numpy()
        out = head(layers, tuple(y.shape[-2:])).cpu().numpy()
        for k in range(len(y)):
            if cfg.task == "canopy":
                acc.update(out[k, 0], y[k])
                base.update(np.where(np.isfinite(y[k]), train_stats["mean"], np.nan), y[k])
            else:
                ok = y[k] >= 0
                ref = np.where(ok, codes[np.clip(y[k], 0, None)], 0)
                acc.update(np.where(ok, codes[out[k].argmax(0)], 0), ref)
                base.update(np.where(ok, codes[train_stats["majority"]], 0), ref)
    if cfg.task == "canopy":
        return acc.result(), {"predict_training_mean": base.result(), "training_mean": train_stats["mean"]}
    names = classes.names
    return acc.result(names), {"predict_majority_class": base.result(names),
                               "majority_class": names[train_stats["majority"]]}
