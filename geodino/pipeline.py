"""Composing the stages: scene -> normalisation -> windows -> model -> stitched, exported maps.

``run_scene`` builds the lazy result (an xarray Dataset); ``write_scene`` computes it in one
pass (each window inferred once) and exports COGs, polygons and a JSON report;
``geodino.runner.run_scenes`` loops over many scenes, resuming where outputs are complete.
Options live in :mod:`geodino.options`, the report in :mod:`geodino.report`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

import geodino
from geodino.classes import ClassTable
from geodino.errors import ConfigError
from geodino.export import RasterOutput, atomic_path, check_writable, polygonize, write_rasters
from geodino.fingerprint import display_path
from geodino.model_checks import check_model_fit, is_demo_model
from geodino.options import RunOptions, load_pipeline
from geodino.predict import ModelBundle, auto_batch_size
from geodino.progress import Progress
from geodino.report import REPORT, ClassCounts, HeightStats, make_report
from geodino.scene import open_scene, require_valid_pixels
from geodino.sensor import prepare
from geodino.stitch import stitch
from geodino.tiling import WindowSpec, window_grid
from geodino.timing import stage


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
    fingerprint: dict | None = None  # what the outputs are made from (geodino.fingerprint); set by the runner


def _classes_of(bundle: ModelBundle) -> ClassTable | None:
    _, heads, _ = bundle.load()
    return heads["landcover"].classes if "landcover" in heads else None


def _profile_of(bundle: ModelBundle) -> str | None:
    _, heads, _ = bundle.load()
    for head in heads.values():
        return head.meta.profile
    return None


def build_run(scene_paths, options: RunOptions, progress=None, grid=None, adjust_normalisation=None) -> SceneRun:
    """Open the scene and build the lazy graph of all outputs (nothing is computed).

    ``grid`` (a :class:`geodino.scene.Grid`): process on that grid instead of the scene's own
    (the scene is warped onto it), e.g. every date of a change run on the first date's grid.
    ``adjust_normalisation(scene, normalisation) -> normalisation``: replaces the scene's fixed
    normalisation before the graph is built (a change run maps later dates' radiometry onto
    the first date's).
    """
    options.validate()
    scene = open_scene(scene_paths, target_gsd=options.target_gsd, grid=grid)
    bundle = ModelBundle(backbone=options.backbone, device=options.device, canopy_head=options.canopy_head,
                         landcover_head=options.landcover_head, canopy_model=options.canopy_model,
                         embeddings=options.embeddings, compile=options.compile,
                         layers=tuple(options.layers) if options.layers else None,
                         precision=options.precision)
    profile = options.profile or _profile_of(bundle) or "auto"
    scene, norm = prepare(scene, profile, bundle.family_name, options.bands)
    require_valid_pixels(scene)
    if adjust_normalisation is not None:
        norm = adjust_normalisation(scene, norm)
    check_model_fit(scene, options.backbone, bundle.load()[1], options.canopy_model)
    spec = WindowSpec(options.window, options.overlap)
    tiles = window_grid(scene.grid.height, scene.grid.width, spec)
    hooks = [progress] if progress is not None else []

    def advance(n: int) -> None:
        for hook in hooks:
            hook(n)

    batch_size = options.batch_size or auto_batch_size(bundle, spec.size)
    bundle = bundle.with_batch_size(batch_size)  # a compiled model pads every call to it
    classes = _classes_of(bundle)
    # the class map is made in the tasks that interpolate the logits (geodino.upsample): the
    # float logits at full resolution are computed only for the probabilities output
    class_codes = {"landcover": (np.asarray(classes.codes, np.uint8), classes.nodata)} if classes else None
    stitched = stitch(scene, norm, tiles, bundle, bundle.outputs(), overlap=spec.overlap,
                      batch_size=batch_size, chunks=options.chunks, progress=advance, class_codes=class_codes)
    variables = {}
    if "canopy_height" in stitched:
        chm = stitched["canopy_height"].isel(band=0, drop=True).drop_vars("band_name", errors="ignore")
        chm.attrs.update(units="m", long_name="canopy height")
        variables["canopy_height"] = chm
    if "landcover" in stitched:
        logits = stitched["landcover"]  # blended logits, NaN where no valid input
        labels = stitched["landcover_codes"].data[0]  # the codes of argmax_codes(logits)
        lc = xr.DataArray(labels, dims=("y", "x"), coords={"y": logits.y, "x": logits.x},
                          attrs={"long_name": "land cover", "class_codes": list(classes.codes),
                                 "class_names": list(classes.names), "_FillValue": classes.nodata,
                                 "class_colors": [v for c in classes.classes for v in c.color]})
        variables["landcover"] = lc
        if options.probabilities:
            probs = logits.copy(data=da.map_blocks(_softmax, logits.data, dtype=np.float32))
            variables["landcover_probability"] = probs.drop_vars("band_name", errors="ignore").rename(band="class").assign_coords(
                **{"class": list(classes.codes), "class_name": ("class", list(classes.names))})
    if "embeddings" in stitched:
        emb = stitched["embeddings"].drop_vars("band_name", errors="ignore").rename(band="embedding", y="y_patch", x="x_patch")
        variables["embeddings"] = emb
    ds = xr.Dataset(variables)
    ds = ds.rio.write_crs(scene.grid.crs)
    ds.attrs.update(scene=scene.name, backbone=options.backbone, profile=norm.profile, window=spec.size,
                    overlap=spec.overlap, geodino_version=geodino.__version__,
                    precision=bundle.load()[0].precision)
    # what geodino.plot needs to draw the scene as the model saw it
    ds.attrs.update(scene_paths=json.dumps(list(scene.paths)), scene_bands=list(scene.bands),
                    normalisation=json.dumps(norm.to_dict()))
    return SceneRun(ds, scene, norm, bundle, tiles, options, classes, hooks)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from blended logits (NaN stays NaN)."""
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


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


def _provenance(run: SceneRun, out: Path) -> dict:
    o = run.options

    def shown(path):  # relative to the output folder: no absolute paths of this machine in tags
        return display_path(path, out) if path else ""

    return {"geodino_version": geodino.__version__, "backbone": shown(o.backbone),
            "canopy_head": shown(o.canopy_head or o.canopy_model), "landcover_head": shown(o.landcover_head),
            "window": o.window, "overlap": o.overlap, "sensor_profile": run.normalisation.profile,
            "normalisation": json.dumps(run.normalisation.to_dict()), **_model_tags(run)}


def _model_tags(run: SceneRun) -> dict:
    """What a reader of the file must know about the models: demo or real, CHMv2's own input."""
    tags = {"demo_model": "true" if is_demo_model(run.options.backbone) else "false"}
    backbone = run.bundle.load()[0]
    tags.update(precision=backbone.precision, precision_detail=backbone.precision_detail)
    chm = run.bundle.load()[2]
    if chm is not None:
        from geodino.sensor import CHMV2_STATS

        tags["canopy_model_normalisation"] = json.dumps({"mean": list(CHMV2_STATS[0]), "std": list(CHMV2_STATS[1]),
                                                         "restandardised_from": chm.input_family})
        tags["canopy_model_precision"] = chm.precision
    return tags


def write_scene(run: SceneRun, out_dir: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Compute the run in one pass and write its COGs, polygons and report; returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds, o = run.dataset, run.options
    tags = _provenance(run, out)
    grid = run.scene.grid
    rasters = []
    stats = {"canopy_height": HeightStats(), "landcover": ClassCounts()}  # filled as blocks are written
    if "canopy_height" in ds:
        rasters.append(RasterOutput(out / "canopy_height.tif", ds["canopy_height"].expand_dims(band=1),
                                    dtype="float32", nodata=float("nan"), descriptions=["canopy height"],
                                    units="m", tags=tags, overview_resampling="average", grid=grid,
                                    observers=[stats["canopy_height"].update]))
    polygons = out / "landcover.gpkg" if "landcover" in ds and o.polygons else None
    if polygons is not None:
        check_writable([polygons], overwrite)
    stack = contextlib.ExitStack()
    # polygons are made from the class COG while the other outputs are still being converted,
    # and appear at their final path only when everything succeeded
    staged = stack.enter_context(atomic_path(polygons)) if polygons is not None else None
    if "landcover" in ds:
        after = functools.partial(_polygons, staged=staged, classes=run.classes, min_area=o.min_polygon_area) \
            if staged is not None else None
        rasters.append(RasterOutput(out / "landcover.tif", ds["landcover"].expand_dims(band=1), dtype="uint8",
                                    nodata=run.classes.nodata, descriptions=["land cover"], tags=tags,
                                    classes=run.classes, overview_resampling="mode", grid=grid, after=after,
                                    observers=[stats["landcover"].update], trace_pixels=after is not None))
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
    if o.crowns:  # refuse before the long part, not after it
        check_writable([out / "trees.gpkg", out / "crowns.tif"], overwrite)
    # styles and the quicklook are outputs too: never replace such files without overwrite
    extras = [out / f"{r.path.stem}.qml" for r in rasters if r.path.stem in ("landcover", "canopy_height")]
    check_writable(extras + ([out / "quicklook.png"] if o.quicklook else []), overwrite)
    total = len(run.tiles)
    beside = None
    if o.quicklook:
        # drawn from the finished COGs while the polygons are traced, put in place with them
        beside = functools.partial(_quicklook, run=run, png=stack.enter_context(atomic_path(out / "quicklook.png")))
    start = time.perf_counter()
    with stack, Progress(f"{run.scene.name}", total=total, enabled=None if not quiet else False) as bar:
        run.hooks.append(bar.advance)
        try:
            with _scheduler(o):
                write_rasters(rasters, overwrite=overwrite, compress=o.compress, beside=beside)
        finally:
            run.hooks.remove(bar.advance)
            run.scene.release_tiles()  # every window is read (or the run failed): free the source tiles
    elapsed = time.perf_counter() - start
    outputs = {r.path.stem: str(r.path.name) for r in rasters}
    if polygons is not None:
        outputs["landcover_polygons"] = polygons.name
    trees = None
    if o.crowns and "canopy_height" in outputs:
        from geodino.trees import crowns

        trees = crowns(out / outputs["canopy_height"], out, overwrite=overwrite, write_report=False,
                       progress=False if quiet else None)
        outputs.update({k: p.name for k, p in trees.outputs.items()})
    from geodino.styles import style_outputs

    outputs.update(style_outputs(out, run.classes, outputs))
    if o.quicklook:
        outputs["quicklook"] = "quicklook.png"
    with stage("report"):
        report = make_report(run, out, elapsed, outputs, stats)
    if trees is not None:
        report["trees"] = {k: v for k, v in trees.report.items() if k not in ("outputs", "canopy_height")}
    report["scene_bands"] = list(run.scene.bands)
    with atomic_path(out / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


@contextlib.contextmanager
def _collection_deferred():
    """Python's cyclic garbage collector off for the block, as it was after (this process's).

    Importing matplotlib and drawing allocate enough objects to set off a full collection,
    which walks the whole heap of a run (~480,000 objects at 8192²): ~0.3 CPU-s on the run's
    last step, for a heap that holds no cycles worth collecting then.
    """
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _quicklook(files: dict[Path, Path], *, run: SceneRun, png: Path) -> None:
    from geodino.quicklook import quicklook

    run.scene.release_tiles()  # every window is read: free the source tiles before drawing
    with stage("quicklook"), _collection_deferred():
        quicklook(png.parent, png, scene=run.scene, stretch=(run.normalisation.lo, run.normalisation.hi),
                  files={final.stem: tmp for final, tmp in files.items()})


def _polygons(cog: Path, *, staged: Path, classes: ClassTable, min_area: float, pixels: Path | None = None) -> None:
    with stage("polygons"):
        polygonize(cog, staged, classes, min_area=min_area, overwrite=True, pixels=pixels)


@contextlib.contextmanager
def local_cluster(processes: int, threads: int):
    """A dask.distributed LocalCluster of ``processes`` workers with ``threads`` threads each,
    their environment set for geodino's work (:func:`geodino.runtime.worker_environ`)."""
    import dask
    from distributed import LocalCluster

    from geodino.runtime import worker_environ

    with dask.config.set(worker_environ()), LocalCluster(n_workers=processes, threads_per_worker=threads,
                                                         processes=True, dashboard_address=None) as cluster:
        yield cluster


@contextlib.contextmanager
def _scheduler(options: RunOptions):
    """threads: dask's local threads; local: a LocalCluster; anything else: a scheduler address."""
    processes = options.processes if options.scheduler == "local" else 1
    workers = options.workers or max(1, (os.cpu_count() or 1) // processes)
    if options.scheduler == "threads":
        with dask.config.set(scheduler="threads", num_workers=workers):
            yield None
        return
    from distributed import Client

    if options.scheduler == "local":
        with local_cluster(options.processes, workers) as cluster, Client(cluster) as client:
            yield client
    else:
        try:
            client = Client(options.scheduler, timeout="10s")
        except OSError as e:
            raise ConfigError(f"cannot reach dask scheduler {options.scheduler} ({e})") from None
        with client:
            yield client


__all__ = ["RunOptions", "load_pipeline", "build_run", "run_scene", "write_scene", "run_scenes"]  # noqa: F822 (run_scenes: module __getattr__)


def __getattr__(name: str):
    # the batch runner lives in geodino.runner (it imports this module)
    if name in ("run_scenes", "is_complete", "scene_out_dir", "OUTPUT_NAMES"):
        import geodino.runner

        return getattr(geodino.runner, name)
    raise AttributeError(f"module 'geodino.pipeline' has no attribute {name!r}")
