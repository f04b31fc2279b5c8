"""Fitting task heads on frozen DINOv3 features.

Labels (a raster on any grid, or polygons) are aligned to the scene's processing grid,
windows are sampled where labels exist and split into train and validation by spatial
blocks, backbone features of each window are computed once and cached on disk (zarr), and
the head is fitted on the cache for as many epochs as asked without running the backbone
again. The result is saved as a self-describing head folder with its validation metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geodino.classes import WORLDCOVER, ClassTable, LandCoverClass
from geodino.errors import ConfigError, InputError
from geodino.heads import HeadMeta, build_head, save_head
from geodino.metrics import ClassAccumulator, HeightAccumulator
from geodino.progress import Progress
from geodino.tiling import Tile, WindowSpec, read_tile, window_grid

VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".parquet")
NAME_COLUMNS = ("class_name", "name", "class", "label", "landcover", "land_cover")  # tried in order


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
# labels on the processing grid


class Labels:
    """Labels aligned to a scene's processing grid, read window by window.

    ``read`` returns float32 heights (NaN = unlabelled) or int64 class indexes (-1 = unlabelled).
    """

    def __init__(self, path: str, scene, task: str, classes: ClassTable | None = None,
                 class_column: str | None = None, name_column: str | None = None) -> None:
        self.path, self.scene, self.task = str(path), scene, task
        p = Path(path)
        if not p.exists():
            raise InputError(f"{path}: label file not found")
        self.vector = p.suffix.lower() in VECTOR_SUFFIXES
        self._ds = None
        if self.vector:
            self._open_vector(class_column, name_column, classes)
        else:
            self._open_raster(classes)

    # vector labels: reprojected, rasterised per window
    def _open_vector(self, column, name_column, classes) -> None:
        import geopandas as gpd

        try:
            gdf = gpd.read_file(self.path)
        except Exception as e:  # pyogrio raises its own error types
            raise InputError(f"{self.path}: cannot read as vector data ({str(e).splitlines()[0]})") from None
        if gdf.crs is None:
            raise InputError(f"{self.path}: has no CRS")
        if column is None:
            candidates = [c for c in ("class_code", "code", "id", "class", "height") if c in gdf.columns]
            if not candidates:
                raise InputError(f"{self.path}: say which column holds the {'class' if self.task == 'landcover' else 'height'}"
                                 f" with --class-column (columns: {', '.join(map(str, gdf.columns))})")
            column = candidates[0]
        if column not in gdf.columns:
            raise InputError(f"{self.path}: no column {column!r} (columns: {', '.join(map(str, gdf.columns))})")
        if name_column is not None and name_column not in gdf.columns:
            raise InputError(f"{self.path}: no column {name_column!r}")
        import pandas as pd

        if name_column is None and self.task == "landcover":
            # a text column beside the codes names the classes (e.g. `id` + `class`)
            texts = [c for c in NAME_COLUMNS if c in gdf.columns and c != column
                     and not pd.api.types.is_numeric_dtype(gdf[c])]
            name_column = texts[0] if texts else None
        values = gdf[column]

        if not pd.api.types.is_numeric_dtype(values):
            raise InputError(f"{self.path}: column {column!r} must hold numbers (class codes or heights); "
                             "use --name-column for class names")
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].to_crs(self.scene.grid.crs)
        self.gdf, self.column = gdf, column
        if self.task == "landcover":
            codes = sorted(int(v) for v in gdf[column].unique())
            names = {}
            if name_column:
                names = _names_by_code(gdf[column], gdf[name_column], f"{self.path}, column {name_column!r}")
            self.classes = classes or _table_for(codes, names)
        else:
            self.classes = None

    def _open_raster(self, classes) -> None:
        from geodino.scene import _open_checked

        src = _open_checked(self.path)
        if src.crs is None:
            raise InputError(f"{self.path}: label raster has no CRS")
        grid = self.scene.grid
        same = src.crs == grid.crs and src.transform == grid.transform and src.shape == grid.shape
        if same:
            self._ds = src
        else:
            finer = abs(src.transform.a) < abs(grid.transform.a) * 0.75 if src.crs == grid.crs else False
            if self.task == "canopy":
                resampling = Resampling.average if finer else Resampling.bilinear
                nodata = src.nodata if src.nodata is not None else np.nan
            else:
                resampling = Resampling.mode if finer else Resampling.nearest
                nodata = src.nodata if src.nodata is not None else 0
            self._ds = WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                                 height=grid.height, resampling=resampling, src_nodata=src.nodata, nodata=nodata)
        if self.task == "landcover":
            self.classes = classes or _table_from_raster(src)
        else:
            self.classes = None

    def read_codes(self, window: Window) -> np.ndarray:
        """Raw label values on the grid (class codes or heights), NaN/0 where unlabelled."""
        h, w = int(window.height), int(window.width)
        if self.vector:
            from rasterio.features import rasterize

            transform = self.scene.grid.window_transform(window)
            west, north = transform.c, transform.f
            east, south = west + w * transform.a, north + h * transform.e
            hits = self.gdf.iloc[list(self.gdf.sindex.query(_box(west, south, east, north)))]
            fill = np.nan if self.task == "canopy" else 0
            dtype = "float32" if self.task == "canopy" else "int32"
            if len(hits) == 0:
                return np.full((h, w), fill, dtype)
            shapes = zip(hits.geometry, hits[self.column].astype(float if self.task == "canopy" else int))
            return rasterize(shapes, out_shape=(h, w), transform=transform, fill=fill, dtype=dtype)
        data = self._ds.read(1, window=window, boundless=False, masked=True)
        if self.task == "canopy":
            return data.astype(np.float32).filled(np.nan)
        return data.astype(np.int64).filled(0)

    def read(self, tile: Tile) -> np.ndarray:
        """Labels of a window as targets; the part outside the scene is unlabelled."""
        grid = self.scene.grid
        ih, iw = min(tile.size, grid.height - tile.row), min(tile.size, grid.width - tile.col)
        raw = self.read_codes(Window(tile.col, tile.row, iw, ih))
        if self.task == "canopy":
            out = np.full((tile.size, tile.size), np.nan, np.float32)
            out[:ih, :iw] = raw
            return out
        lut = np.full(max(256, int(raw.max(initial=0)) + 1), -1, np.int64)
        lut[np.asarray(self.classes.codes)] = np.arange(len(self.classes))
        out = np.full((tile.size, tile.size), -1, np.int64)
        out[:ih, :iw] = lut[np.clip(raw, 0, len(lut) - 1)]
        return out


def _names_by_code(codes, names, label: str) -> dict[int, str]:
    """Each class code's name: the one most of its polygons carry. Real label files have slips
    (a polygon of code 5 named like code 4); those are reported, not silently taken."""
    from collections import Counter

    counts: dict[int, Counter] = {}
    for c, n in zip(codes, names):
        counts.setdefault(int(c), Counter())[str(n)] += 1
    majority = {c: cnt.most_common(1)[0] for c, cnt in counts.items()}
    out = {}
    for c, cnt in counts.items():
        top = [n for n, k in cnt.items() if k == majority[c][1]]
        # a tie: prefer a name no other code goes by
        free = [n for n in top if all(majority[o][0] != n for o in counts if o != c)]
        out[c] = min(free or top)
    mixed = {c: dict(cnt) for c, cnt in counts.items() if len(cnt) > 1}
    if mixed:
        warnings.warn(f"{label}: some class codes carry several names {mixed}; using "
                      f"{ {c: out[c] for c in mixed} }", stacklevel=3)
    return out


def _box(west, south, east, north):
    from shapely.geometry import box

    return box(min(west, east), min(south, north), max(west, east), max(south, north))


def _table_for(codes: Sequence[int], names: dict | None = None) -> ClassTable:
    codes = [c for c in codes if c != 0]
    if not codes:
        raise InputError("the labels hold no class codes other than 0 (nodata)")
    if set(codes) <= set(WORLDCOVER.codes) and not names:
        # WorldCover codes: its names and colours, for the classes present
        return ClassTable(tuple(c for c in WORLDCOVER.classes if c.code in codes))
    rng = np.random.default_rng(0)
    return ClassTable(tuple(LandCoverClass(int(c), (names or {}).get(int(c), f"class {c}"),
                                           tuple(int(v) for v in rng.integers(30, 230, 3))) for c in codes))


def _table_from_raster(src) -> ClassTable:
    tags = src.tags(1)
    if "class_codes" in tags and "class_names" in tags:
        codes = [int(c) for c in tags["class_codes"].split(",")]
        names = tags["class_names"].split(",")
        try:
            cmap = src.colormap(1)
        except ValueError:
            cmap = {}
        return ClassTable(tuple(LandCoverClass(c, n, tuple(cmap.get(c, (128, 128, 128, 255))[:3]))
                                for c, n in zip(codes, names)), nodata=int(src.nodata or 0))
    # codes present, from a decimated read
    step = max(1, int(math.sqrt(src.width * src.height / 4e6)))
    data = src.read(1, out_shape=(max(1, src.height // step), max(1, src.width // step)),
                    resampling=Resampling.nearest)
    codes = [int(c) for c in np.unique(data) if c != (src.nodata if src.nodata is not None else 0)]
    return _table_for(codes)


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
