"""Composing the stages: scene -> normalisation -> windows -> model -> stitched, exported maps.

``run_scene`` builds the lazy result (an xarray Dataset); ``write_scene`` computes it in one
pass (each window inferred once) and exports COGs, polygons and a JSON report;
``run_scenes`` loops over many scenes, resuming where outputs are already complete.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import dask
import dask.array as da
import numpy as np
import rasterio
import xarray as xr

import geodino
from geodino.classes import ClassTable
from geodino.errors import ConfigError
from geodino.export import RasterOutput, atomic_path, polygonize, write_rasters
from geodino.predict import ModelBundle, auto_batch_size
from geodino.progress import Progress
from geodino.scene import open_scene, require_valid_pixels
from geodino.sensor import prepare
from geodino.stitch import stitch
from geodino.tiling import WindowSpec, window_grid

REPORT = "report.json"
OUTPUT_NAMES = ("canopy_height.tif", "landcover.tif", "landcover_probability.tif", "embeddings.tif",
                "landcover.gpkg", REPORT)


@dataclass
class RunOptions:
    """Everything a run needs besides the scene; also the schema of pipeline YAML files."""

    backbone: str = "facebook/dinov3-vitl16-pretrain-sat493m"
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
    workers: int = 4
    compress: str = "DEFLATE"
    layers: list | None = None  # backbone blocks the heads read (default: the backbone's usual four)

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

    def validate(self) -> None:
        WindowSpec(self.window, self.overlap)
        if self.batch_size < 0:
            raise ConfigError("batch_size must be at least 1 (or 0 to choose it from free GPU memory)")
        if self.chunks < 16:
            raise ConfigError("chunks must be at least 16 pixels")
        if self.embeddings_dtype not in ("float16", "float32"):
            raise ConfigError("embeddings_dtype must be float16 or float32")
        if self.embeddings_dtype == "float16" and not _float16_supported():
            raise ConfigError(f"embeddings_dtype float16 needs rasterio >= 1.5 (this is {rasterio.__version__}); "
                              "use float32")
        if self.compress.upper() not in ("DEFLATE", "ZSTD", "LZW"):
            raise ConfigError("compress must be DEFLATE, ZSTD or LZW")
        if not (self.canopy_head or self.landcover_head or self.canopy_model or self.embeddings):
            raise ConfigError("nothing to compute: give a canopy head, a land-cover head, a canopy model "
                              "or ask for embeddings")


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
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value")
    # model paths written relative to the config file are found from anywhere
    for key in ("backbone", "canopy_head", "landcover_head", "canopy_model"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (p.parent / value).exists():
            data[key] = str((p.parent / value).resolve())
    return RunOptions.from_mapping(data, source=str(p))


@dataclass
class SceneRun:
    """A lazy run over one scene: the dataset plus what produced it."""

    dataset: xr.Dataset
    scene: object
    normalisation: object
    bundle: ModelBundle
    tiles: list
    options: RunOptions
    classes: ClassTable | None = None
    hooks: list = field(default_factory=list)  # called with the number of windows each batch finishes


def _classes_of(bundle: ModelBundle) -> ClassTable | None:
    _, heads, _ = bundle.load()
    return heads["landcover"].classes if "landcover" in heads else None


def _profile_of(bundle: ModelBundle) -> str | None:
    _, heads, _ = bundle.load()
    for head in heads.values():
        return head.meta.profile
    return None


def build_run(scene_paths, options: RunOptions, progress=None) -> SceneRun:
    """Open the scene and build the lazy graph of all outputs (nothing is computed)."""
    options.validate()
    scene = open_scene(scene_paths, target_gsd=options.target_gsd)
    bundle = ModelBundle(backbone=options.backbone, device=options.device, canopy_head=options.canopy_head,
                         landcover_head=options.landcover_head, canopy_model=options.canopy_model,
                         embeddings=options.embeddings, compile=options.compile,
                         layers=tuple(options.layers) if options.layers else None)
    profile = options.profile or _profile_of(bundle) or "auto"
    scene, norm = prepare(scene, profile, bundle.family_name, options.bands)
    require_valid_pixels(scene)
    spec = WindowSpec(options.window, options.overlap)
    tiles = window_grid(scene.grid.height, scene.grid.width, spec)
    hooks = [progress] if progress is not None else []

    def advance(n: int) -> None:
        for hook in hooks:
            hook(n)

    batch_size = options.batch_size or auto_batch_size(bundle, spec.size)
    stitched = stitch(scene, norm, tiles, bundle, bundle.outputs(), overlap=spec.overlap,
                      batch_size=batch_size, chunks=options.chunks, progress=advance)
    classes = _classes_of(bundle)
    variables = {}
    if "canopy_height" in stitched:
        chm = stitched["canopy_height"].isel(band=0, drop=True).drop_vars("band_name", errors="ignore")
        chm.attrs.update(units="m", long_name="canopy height")
        variables["canopy_height"] = chm
    if "landcover" in stitched:
        probs = stitched["landcover"]
        codes = np.asarray(classes.codes, np.uint8)
        labels = da.map_blocks(_argmax_codes, probs.data, codes, classes.nodata, drop_axis=0, dtype=np.uint8)
        lc = xr.DataArray(labels, dims=("y", "x"), coords={"y": probs.y, "x": probs.x},
                          attrs={"long_name": "land cover", "class_codes": list(classes.codes),
                                 "class_names": list(classes.names), "_FillValue": classes.nodata})
        variables["landcover"] = lc
        if options.probabilities:
            variables["landcover_probability"] = probs.drop_vars("band_name", errors="ignore").rename(band="class").assign_coords(
                **{"class": list(classes.codes), "class_name": ("class", list(classes.names))})
    if "embeddings" in stitched:
        emb = stitched["embeddings"].drop_vars("band_name", errors="ignore").rename(band="embedding", y="y_patch", x="x_patch")
        variables["embeddings"] = emb
    ds = xr.Dataset(variables)
    ds = ds.rio.write_crs(scene.grid.crs)
    ds.attrs.update(scene=scene.name, backbone=options.backbone, profile=norm.profile, window=spec.size,
                    overlap=spec.overlap, geodino_version=geodino.__version__)
    return SceneRun(ds, scene, norm, bundle, tiles, options, classes, hooks)


def _argmax_codes(probs: np.ndarray, codes: np.ndarray, nodata: int) -> np.ndarray:
    invalid = np.isnan(probs[0])
    out = codes[np.argmax(np.nan_to_num(probs, nan=-1.0), axis=0)]
    out[invalid] = nodata
    return out


def run_scene(scene, *, backbone: str, canopy_head: str | None = None, landcover_head: str | None = None,
              **options) -> xr.Dataset:
    """The outputs of one scene as a lazy, CRS-aware xarray Dataset (computed when accessed)."""
    opts = RunOptions.from_mapping(dict(backbone=backbone, canopy_head=canopy_head,
                                        landcover_head=landcover_head, **options), source="run_scene")
    return build_run(scene, opts).dataset


# --------------------------------------------------------------------------------------
# writing


def output_paths(out_dir: Path, options: RunOptions, has: Sequence[str]) -> dict[str, Path]:
    paths = {}
    for name in has:
        paths[name] = out_dir / f"{name}.tif"
    if "landcover" in has and options.polygons:
        paths["landcover_polygons"] = out_dir / "landcover.gpkg"
    return paths


def _provenance(run: SceneRun) -> dict:
    o = run.options
    return {"geodino_version": geodino.__version__, "backbone": o.backbone,
            "canopy_head": o.canopy_head or o.canopy_model or "", "landcover_head": o.landcover_head or "",
            "window": o.window, "overlap": o.overlap, "sensor_profile": run.normalisation.profile,
            "normalisation": json.dumps(run.normalisation.to_dict())}


def write_scene(run: SceneRun, out_dir: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Compute the run in one pass and write its COGs, polygons and report; returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds, o = run.dataset, run.options
    tags = _provenance(run)
    grid = run.scene.grid
    rasters = []
    if "canopy_height" in ds:
        rasters.append(RasterOutput(out / "canopy_height.tif", ds["canopy_height"].expand_dims(band=1),
                                    dtype="float32", nodata=float("nan"), descriptions=["canopy height"],
                                    units="m", tags=tags, overview_resampling="average", grid=grid))
    if "landcover" in ds:
        rasters.append(RasterOutput(out / "landcover.tif", ds["landcover"].expand_dims(band=1), dtype="uint8",
                                    nodata=run.classes.nodata, descriptions=["land cover"], tags=tags,
                                    classes=run.classes, overview_resampling="mode", grid=grid))
    if "landcover_probability" in ds:
        rasters.append(RasterOutput(out / "landcover_probability.tif", ds["landcover_probability"],
                                    dtype="float32", nodata=float("nan"),
                                    descriptions=[f"P({n})" for n in run.classes.names], units="probability",
                                    tags=tags, overview_resampling="average", grid=grid))
    if "embeddings" in ds:
        emb = ds["embeddings"].rename(embedding="band", y_patch="y", x_patch="x")
        rasters.append(RasterOutput(out / "embeddings.tif", emb, dtype=o.embeddings_dtype, nodata=float("nan"),
                                    descriptions=[f"embedding {i}" for i in range(emb.shape[0])], tags=tags,
                                    overview_resampling="average", grid=grid.coarsen(run.bundle.patch_size)))
    total = len(run.tiles)
    start = time.perf_counter()
    with Progress(f"{run.scene.name}", total=total, enabled=None if not quiet else False) as bar:
        run.hooks.append(bar.advance)
        try:
            with _scheduler(o):
                write_rasters(rasters, overwrite=overwrite, compress=o.compress)
        finally:
            run.hooks.remove(bar.advance)
    elapsed = time.perf_counter() - start
    outputs = {r.path.stem: str(r.path.name) for r in rasters}
    if "landcover" in ds and o.polygons:
        polygonize(out / "landcover.tif", out / "landcover.gpkg", run.classes,
                   min_area=o.min_polygon_area, overwrite=overwrite)
        outputs["landcover_polygons"] = "landcover.gpkg"
    report = make_report(run, out, elapsed, outputs)
    with atomic_path(out / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


@contextlib.contextmanager
def _scheduler(options: RunOptions):
    """threads: dask's local threads; local: a LocalCluster; anything else: a scheduler address."""
    if options.scheduler == "threads":
        with dask.config.set(scheduler="threads", num_workers=options.workers):
            yield None
        return
    from distributed import Client, LocalCluster

    if options.scheduler == "local":
        with LocalCluster(n_workers=1, threads_per_worker=options.workers, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
    else:
        try:
            client = Client(options.scheduler, timeout="10s")
        except OSError as e:
            raise ConfigError(f"cannot reach dask scheduler {options.scheduler} ({e})") from None
        with client:
            yield client


def make_report(run: SceneRun, out: Path, elapsed: float, outputs: dict) -> dict:
    grid = run.scene.grid
    rx, ry = grid.res
    area_km2 = grid.width * grid.height * rx * ry / 1e6 if grid.crs.is_projected else None
    report = {
        "scene": list(run.scene.paths), "geodino_version": geodino.__version__,
        "crs": grid.crs.to_string(), "width": grid.width, "height": grid.height,
        "transform": list(grid.transform)[:6], "area_km2": area_km2,
        "windows": len(run.tiles), "seconds": round(elapsed, 3),
        "windows_per_second": round(len(run.tiles) / elapsed, 3) if elapsed > 0 else None,
        "models": {"backbone": run.options.backbone, "canopy_head": run.options.canopy_head,
                   "landcover_head": run.options.landcover_head, "canopy_model": run.options.canopy_model},
        "sensor_profile": run.normalisation.profile, "normalisation": run.normalisation.to_dict(),
        "window": run.options.window, "overlap": run.options.overlap, "outputs": outputs,
    }
    if "landcover" in outputs:
        report["landcover_area_km2"] = class_areas(out / outputs["landcover"], run.classes)
    if "canopy_height" in outputs:
        report["canopy_height_m"] = height_stats(out / outputs["canopy_height"])
    report["complete"] = True
    return report


def class_areas(path: Path, classes: ClassTable) -> dict:
    counts = np.zeros(256, np.int64)
    with rasterio.open(path) as src:
        px = abs(src.transform.a * src.transform.e)
        for _, window in src.block_windows(1):
            counts += np.bincount(src.read(1, window=window).ravel(), minlength=256)
    return {c.name: round(counts[c.code] * px / 1e6, 6) for c in classes.classes}


def height_stats(path: Path) -> dict:
    hist = np.zeros(1000, np.int64)  # 0.1 m bins to 100 m
    total, n, peak = 0.0, 0, 0.0
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            v = src.read(1, window=window)
            v = v[np.isfinite(v)]
            if v.size:
                total += float(v.sum())
                n += v.size
                peak = max(peak, float(v.max()))
                hist += np.bincount(np.clip((v * 10).astype(np.int64), 0, 999), minlength=1000)
    if n == 0:
        return {"valid_pixels": 0}
    cdf = np.cumsum(hist) / n

    def q(p):
        return round(float(np.searchsorted(cdf, p)) / 10, 1)

    return {"valid_pixels": int(n), "mean": round(total / n, 3), "p50": q(0.5), "p95": q(0.95),
            "max": round(peak, 3), "fraction_above_2m": round(float(1 - cdf[19]), 4)}


def is_complete(out_dir: Path) -> bool:
    """Whether a scene's outputs are all there and readable (a finished earlier run)."""
    report = out_dir / REPORT
    if not report.exists():
        return False
    try:
        data = json.loads(report.read_text())
    except ValueError:
        return False
    if not data.get("complete"):
        return False
    for name in data.get("outputs", {}).values():
        p = out_dir / name
        if not p.exists():
            return False
        if p.suffix == ".tif":
            try:
                with rasterio.open(p) as src:
                    src.read(1, window=((0, 1), (0, 1)))
            except rasterio.errors.RasterioError:
                return False
    return True


def scene_out_dir(out: Path, scene: str, many: bool) -> Path:
    return out / Path(scene).stem if many else out


def run_scenes(scenes: Sequence[str], out: str | Path, options: RunOptions, *, overwrite: bool = False,
               quiet: bool = False, log=print) -> list[dict]:
    """Run each scene into its own folder (or ``out`` itself for one scene); skip finished ones."""
    out = Path(out)
    many = len(scenes) > 1
    reports = []
    for scene in scenes:
        target = scene_out_dir(out, scene, many)
        if not overwrite and is_complete(target):
            log(f"{scene}: outputs complete in {target}, skipped")
            reports.append(json.loads((target / REPORT).read_text()))
            continue
        if not overwrite:
            # a half-finished earlier run may have left some of our outputs (never other files)
            for name in OUTPUT_NAMES:
                (target / name).unlink(missing_ok=True)
        run = build_run(scene, options)
        reports.append(write_scene(run, target, overwrite=True, quiet=quiet))
        log(f"{scene}: {reports[-1]['windows']} windows in {reports[-1]['seconds']} s -> {target}")
    return reports


__all__ = ["RunOptions", "load_pipeline", "build_run", "run_scene", "write_scene", "run_scenes"]
