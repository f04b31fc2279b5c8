"""The ``geodino`` command line: a thin layer that composes the stages.

User mistakes raise GeodinoError; ``main`` turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from geodino.errors import GeodinoError
from geodino.options import DEFAULT_BACKBONE

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Georeferenced canopy-height, land-cover and embedding maps with a frozen DINOv3 backbone.")
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        import geodino

        typer.echo(f"geodino {geodino.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the geodino version and exit")) -> None:
    """Georeferenced canopy-height, land-cover and embedding maps with a frozen DINOv3 backbone."""


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder for scene.tif, landcover.tif, canopy_height.tif"),
    size: int = typer.Option(1024, help="Width and height in pixels (unless --width/--height)"),
    width: Optional[int] = typer.Option(None, help="Width in pixels"),
    height: Optional[int] = typer.Option(None, help="Height in pixels"),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same bytes"),
    crs: str = typer.Option("EPSG:32737", help="Projected CRS of the scene"),
    gsd: float = typer.Option(0.6, help="Ground sample distance in metres"),
    sun_elevation: float = typer.Option(55.0, help="Sun elevation in degrees (sets shadow length)"),
    sun_azimuth: float = typer.Option(45.0, help="Sun azimuth in degrees clockwise from north"),
    collar: bool = typer.Option(False, help="Add a rotated nodata collar around the valid footprint"),
    polygons: bool = typer.Option(False, help="Also write land-cover polygons (landcover.gpkg)"),
    overwrite: bool = typer.Option(False, help="Replace existing outputs"),
    change: bool = typer.Option(False, "--change", help="Write a pair of dates (before/, after/: a clear-cut, "
                                "tree growth, a new built-up lot, another sun) and truth rasters of the change"),
) -> None:
    """Generate a synthetic scene with land-cover and canopy-height ground truth."""
    from geodino.progress import Progress
    from geodino.synth import SynthConfig, generate

    try:
        cfg = SynthConfig(width=width or size, height=height or size, seed=seed, crs=crs, gsd=gsd,
                          sun_elevation=sun_elevation, sun_azimuth=sun_azimuth, nodata_collar=collar)
    except ValueError as e:
        raise GeodinoError(str(e)) from None
    if change:
        from geodino.synth_change import generate_pair

        with Progress("synth blocks", unit="blocks") as bar:
            pair = generate_pair(out, cfg, overwrite=overwrite, progress=bar.update_to)
        for p in (pair.before.scene, pair.after.scene, pair.truth_change, pair.truth_canopy_change):
            typer.echo(str(p))
        return
    with Progress("synth blocks", unit="blocks") as bar:
        paths = generate(out, cfg, polygons=polygons, overwrite=overwrite, progress=bar.update_to)
    for p in (paths.scene, paths.landcover, paths.canopy_height, paths.polygons):
        if p is not None:
            typer.echo(str(p))


def _bands(value: Optional[str]):
    return [b.strip() for b in value.split(",")] if value else None


def _default(option: str) -> str:
    """A run option's default as --help shows it (the options are None so a pipeline YAML can set them)."""
    from geodino.options import RunOptions

    value = getattr(RunOptions(), option)
    if option == "profile" and value is None:
        return "the heads' profile, else auto"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "none" if value is None else str(value)


def _expand(scenes: list[str]) -> list[str]:
    """Scenes as given, with glob patterns expanded (quoted globs, or a shell without globbing)."""
    import glob

    out = []
    for s in scenes:
        if any(ch in s for ch in "*?["):
            hits = sorted(glob.glob(s))
            if not hits:
                raise GeodinoError(f"{s}: no file matches this pattern")
            out.extend(hits)
        else:
            out.append(s)
    return out


@app.command()
def run(
    scenes: list[str] = typer.Argument(..., help="Scene files or glob patterns; each is processed on its own"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (one subfolder per scene when several)"),
    pipeline: Optional[Path] = typer.Option(None, help="Pipeline YAML (pipelines/*.yaml); options below override it"),
    backbone: Optional[str] = typer.Option(None, help="DINOv3 hub id, short name, local folder or Meta .pth", show_default=_default("backbone")),
    canopy_head: Optional[str] = typer.Option(None, help="Canopy-height head folder", show_default=_default("canopy_head")),
    landcover_head: Optional[str] = typer.Option(None, help="Land-cover head folder", show_default=_default("landcover_head")),
    canopy_model: Optional[str] = typer.Option(None, help="CHMv2 canopy model instead of a head: transformers folder, hub id, or Meta's head .pth (with the SAT ViT-L as --backbone)", show_default=_default("canopy_model")),
    profile: Optional[str] = typer.Option(None, help="Sensor profile: rgb8, naip, sentinel2-l2a, landsat-c2-l2, reflectance, auto", show_default=_default("profile")),
    bands: Optional[str] = typer.Option(None, help="Comma-separated R,G,B bands by index or description", show_default=_default("bands")),
    window: Optional[int] = typer.Option(None, help="Window size in pixels (multiple of 16)", show_default=_default("window")),
    overlap: Optional[int] = typer.Option(None, help="Window overlap in pixels (multiple of 16)", show_default=_default("overlap")),
    batch_size: Optional[int] = typer.Option(None, help="Windows per model call", show_default=_default("batch_size")),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto", show_default=_default("device")),
    embeddings: Optional[bool] = typer.Option(None, "--embeddings/--no-embeddings", help="Also write the embedding raster (of --backbone)", show_default=_default("embeddings")),
    probabilities: Optional[bool] = typer.Option(None, "--probabilities/--no-probabilities", help="Also write class probabilities", show_default=_default("probabilities")),
    scheduler: Optional[str] = typer.Option(None, help="threads, local (a LocalCluster) or a scheduler address", show_default=_default("scheduler")),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the backbone", show_default=_default("compile")),
    target_gsd: Optional[float] = typer.Option(None, help="Resample to this pixel size in metres (e.g. 0.6 for SAT)", show_default=_default("target_gsd")),
    polygons: Optional[bool] = typer.Option(None, "--polygons/--no-polygons", help="Write land-cover polygons", show_default=_default("polygons")),
    min_polygon_area: Optional[float] = typer.Option(None, help="Drop polygons smaller than this (m²)", show_default=_default("min_polygon_area")),
    chunks: Optional[int] = typer.Option(None, help="Output block size in pixels, rounded down to whole window strides (memory/parallelism only)", show_default=_default("chunks")),
    workers: Optional[int] = typer.Option(None, help="Threads per process for reading, blending and writing (0: one per CPU core)", show_default=_default("workers")),
    processes: Optional[int] = typer.Option(None, help="Worker processes with --scheduler local", show_default=_default("processes")),
    crowns: Optional[bool] = typer.Option(None, "--crowns/--no-crowns", help="Also find individual trees in the canopy map (trees.gpkg, crowns.tif)", show_default=_default("crowns")),
    quicklook: Optional[bool] = typer.Option(None, "--quicklook/--no-quicklook", help="Write quicklook.png", show_default=_default("quicklook")),
    precision: Optional[str] = typer.Option(None, help="Backbone precision: fp32, bf16 or int8 (default fp32 on a CPU, "
                                            "bf16 on CUDA); recorded in the outputs. See BENCHMARKS.md for speed and quality"),
    overwrite: bool = typer.Option(False, help="Recompute and replace finished outputs"),
    keep_going: bool = typer.Option(False, "--keep-going", help="Run the other scenes when one fails; "
                                    "print a summary table and exit non-zero if any failed"),
    force: bool = typer.Option(False, "--force", help="Allow a --target-gsd that grows the processing grid "
                               "more than 16x in pixels"),
) -> None:
    """Map canopy height and land cover (and embeddings) for one or many scenes."""
    from geodino.options import RunOptions, load_pipeline
    from geodino.runner import run_scenes

    options = load_pipeline(pipeline) if pipeline else RunOptions()
    overrides = dict(backbone=backbone, canopy_head=canopy_head, landcover_head=landcover_head,
                     canopy_model=canopy_model, profile=profile, bands=_bands(bands), window=window, overlap=overlap,
                     batch_size=batch_size, device=device, embeddings=embeddings, probabilities=probabilities,
                     scheduler=scheduler, compile=compile, target_gsd=target_gsd, polygons=polygons,
                     min_polygon_area=min_polygon_area, chunks=chunks, workers=workers, processes=processes,
                     crowns=crowns, quicklook=quicklook, precision=precision)
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    scenes = _expand(scenes)
    options.validate(scene=scenes[0] if len(scenes) == 1 else None, out=str(out))
    reports = run_scenes(scenes, out, options, overwrite=overwrite, keep_going=keep_going, force=force,
                         log=lambda m: err.print(m, highlight=False, soft_wrap=True))
    for scene, r in zip(scenes, reports):
        typer.echo(f"{scene}: {r['windows']} windows, {r['seconds']} s, {r['windows_per_second']} windows/s")


@app.command()
def change(
    scenes: list[str] = typer.Argument(..., help="Two or more scenes, one per date, earliest first"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder"),
    dates: Optional[str] = typer.Option(None, help="Comma-separated ISO dates, one per scene (default: file tags, "
                                        "else a date in the file name, else scene order)"),
    grid: Optional[Path] = typer.Option(None, help="Raster whose grid every date is warped onto (default: the first scene's)"),
    min_height_change: float = typer.Option(5.0, help="Canopy loss/gain where the height changed by at least this (m)"),
    gap_height: float = typer.Option(2.0, help="Canopy loss means the height fell by --min-height-change to below this "
                                     "(m) and, with a land-cover head, the later land cover is no longer tree cover "
                                     "(canopy gone); any other such fall is partial canopy loss"),
    radiometric_match: bool = typer.Option(True, "--radiometric-match/--no-radiometric-match",
                                           help="Map the dates onto their mean radiometry first (per-band gain and "
                                                "offset fitted on unchanged ground)"),
    min_area: Optional[float] = typer.Option(None, help="Drop change polygons smaller than this (m²; default: min_polygon_area)"),
    pipeline: Optional[Path] = typer.Option(None, help="Pipeline YAML (pipelines/*.yaml); options below override it"),
    backbone: Optional[str] = typer.Option(None, help="DINOv3 hub id, short name, local folder or Meta .pth"),
    canopy_head: Optional[str] = typer.Option(None, help="Canopy-height head folder"),
    landcover_head: Optional[str] = typer.Option(None, help="Land-cover head folder"),
    canopy_model: Optional[str] = typer.Option(None, help="CHMv2 canopy model (folder or hub id) instead of a head"),
    profile: Optional[str] = typer.Option(None, help="Sensor profile: rgb8, naip, sentinel2-l2a, landsat-c2-l2, reflectance, auto"),
    bands: Optional[str] = typer.Option(None, help="Comma-separated R,G,B bands by index or description"),
    window: Optional[int] = typer.Option(None, help="Window size in pixels (multiple of 16)"),
    overlap: Optional[int] = typer.Option(None, help="Window overlap in pixels (multiple of 16)"),
    batch_size: Optional[int] = typer.Option(None, help="Windows per model call"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto"),
    scheduler: Optional[str] = typer.Option(None, help="threads, local (a LocalCluster) or a scheduler address"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the backbone"),
    target_gsd: Optional[float] = typer.Option(None, help="Resample the first scene's grid to this pixel size (m)"),
    polygons: Optional[bool] = typer.Option(None, "--polygons/--no-polygons", help="Write change polygons (change.gpkg)"),
    chunks: Optional[int] = typer.Option(None, help="Output block size in pixels (memory/parallelism only)"),
    workers: Optional[int] = typer.Option(None, help="Threads for reading, blending and writing"),
    overwrite: bool = typer.Option(False, help="Replace existing outputs"),
) -> None:
    """Change between dates: canopy loss and gain, land-cover transitions, embedding change."""
    from dataclasses import replace

    from geodino.change_write import run_change
    from geodino.options import RunOptions, load_pipeline

    options = load_pipeline(pipeline) if pipeline else RunOptions()
    overrides = dict(backbone=backbone, canopy_head=canopy_head, landcover_head=landcover_head,
                     canopy_model=canopy_model, profile=profile, bands=_bands(bands), window=window, overlap=overlap,
                     batch_size=batch_size, device=device, scheduler=scheduler, compile=compile,
                     target_gsd=target_gsd, polygons=polygons, chunks=chunks, workers=workers)
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    report = run_change(_expand(scenes), out, options, dates=_bands(dates), grid=grid,
                        min_height_change=min_height_change, gap_height=gap_height,
                        radiometric_match=radiometric_match, min_area=min_area, overwrite=overwrite,
                        log=lambda m: err.print(m, highlight=False, soft_wrap=True))
    typer.echo(str(out / "report.json"))
    for step in report["steps"]:
        canopy = step.get("canopy")
        if canopy:
            typer.echo(f"{step['step']}: canopy loss {canopy['loss_area_m2'] / 1e4:.2f} ha, "
                       f"partial loss {canopy['partial_loss_area_m2'] / 1e4:.2f} ha, "
                       f"gain {canopy['gain_area_m2'] / 1e4:.2f} ha")


@app.command()
def features(
    scene: list[str] = typer.Argument(..., help="Scene file(s) or glob patterns; each is processed on its own "
                                      "(into OUT/<name>/ when several) unless --mosaic"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder"),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="DINOv3 hub id, short name, local folder or Meta .pth "
                                 "(the same default as geodino run)"),
    mosaic: bool = typer.Option(False, "--mosaic", help="Mosaic several files into one scene (tiles of one date; "
                                "never two dates of one place)"),
    profile: str = typer.Option("auto", help="Sensor profile"),
    bands: Optional[str] = typer.Option(None, help="Comma-separated R,G,B bands by index or description"),
    window: int = typer.Option(512, help="Window size in pixels"),
    overlap: int = typer.Option(64, help="Window overlap in pixels"),
    batch_size: int = typer.Option(8, help="Windows per model call"),
    device: str = typer.Option("cpu", help="cpu, cuda or auto"),
    dtype: str = typer.Option("float32", help="float32 (or float16 with rasterio >= 1.5)"),
    overwrite: bool = typer.Option(False, help="Replace existing outputs"),
) -> None:
    """Per-patch DINOv3 embeddings as a georeferenced raster, plus a 3-band PCA picture."""
    from geodino.features import write_features
    from geodino.pipeline import RunOptions

    options = RunOptions(backbone=backbone, profile=profile, bands=_bands(bands), window=window, overlap=overlap,
                         batch_size=batch_size, device=device, embeddings=True, embeddings_dtype=dtype,
                         polygons=False)
    for path in write_features(_expand(scene), out, options, mosaic=mosaic, overwrite=overwrite):
        typer.echo(str(path))


@app.command()
def fit(
    task: str = typer.Argument(..., help="canopy or landcover"),
    scene: str = typer.Option(..., help="Scene to fit on"),
    labels: str = typer.Option(..., help="Label raster (any CRS/resolution) or polygons (GeoPackage, Shapefile)"),
    backbone: str = typer.Option(..., help="DINOv3 hub id, short name, local folder or Meta .pth"),
    out: Path = typer.Option(..., "--out", "-o", help="Head folder to write"),
    head_type: Optional[str] = typer.Option(None, help="canopy: dpt (default) or linear"),
    profile: str = typer.Option("auto", help="Sensor profile"),
    bands: Optional[str] = typer.Option(None, help="Comma-separated R,G,B bands by index or description"),
    class_column: Optional[str] = typer.Option(None, help="Polygons: column with the class code (or height)"),
    name_column: Optional[str] = typer.Option(None, help="Polygons: column with the class name"),
    window: int = typer.Option(256, help="Training window size in pixels"),
    epochs: int = typer.Option(30, help="Passes over the cached features"),
    batch_size: int = typer.Option(4, help="Windows per step"),
    lr: float = typer.Option(2e-3, help="Learning rate (AdamW, cosine schedule)"),
    loss: str = typer.Option("silog", help="canopy: silog, l1 or l2"),
    val_fraction: float = typer.Option(0.2, help="Share of windows held out in spatial blocks"),
    seed: int = typer.Option(0, help="Random seed"),
    cache_dir: Optional[str] = typer.Option(None, help="Feature cache folder (default: OUT/.feature-cache)"),
    device: str = typer.Option("cpu", help="cpu, cuda or auto"),
) -> None:
    """Fit a canopy-height or land-cover head on frozen DINOv3 features of a labelled scene."""
    import json

    from geodino.train import FitConfig
    from geodino.train import fit as fit_head

    cfg = FitConfig(task=task, scene=scene, labels=labels, backbone=backbone, out=str(out), head_type=head_type,
                    profile=profile, bands=_bands(bands), window=window, class_column=class_column,
                    name_column=name_column, epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                    val_fraction=val_fraction, seed=seed, cache_dir=cache_dir, device=device)
    import warnings

    from geodino.train import NoValidationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoValidationWarning)
        result = fit_head(cfg)
    for w in caught:
        if issubclass(w.category, NoValidationWarning):
            err.print(f"[bold yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    typer.echo(json.dumps({"head": str(result.head_dir), "train_windows": result.train_windows,
                           "val_windows": result.val_windows,
                           "metrics": {"training": _brief(result.training_metrics),
                                       "validation": _brief(result.metrics) if result.metrics else None},
                           "baseline": {k: _brief(v) if isinstance(v, dict) else v
                                        for k, v in result.baseline.items()}}, indent=2))


def _brief(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "confusion_matrix"}


@app.command()
def evaluate(
    prediction: str = typer.Argument(..., help="Predicted raster (canopy_height.tif or landcover.tif)"),
    reference: str = typer.Argument(..., help="Reference raster on any grid (aligned by reprojection)"),
    task: str = typer.Option(..., help="canopy or landcover"),
) -> None:
    """Compare a prediction with a reference raster; prints metrics as JSON."""
    import json

    from geodino.metrics import evaluate_rasters

    typer.echo(json.dumps(evaluate_rasters(prediction, reference, task), indent=2))


@app.command("crowns")
def crowns_command(
    canopy: Path = typer.Argument(..., help="Canopy-height raster in metres (geodino's, a lidar CHM, CHMv2's; any CRS)"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for trees.gpkg, crowns.tif and report.json"),
    band: int = typer.Option(1, help="Band holding the heights"),
    min_height: float = typer.Option(2.0, help="Lowest tree top and crown pixel (m)"),
    smooth: float = typer.Option(0.0, help="Gaussian smoothing sigma before the search (m); 0: none"),
    window_intercept: float = typer.Option(1.0, help="Search-window diameter at 0 m height (m)"),
    window_slope: float = typer.Option(0.08, help="Window diameter growth per metre of height"),
    window_min: float = typer.Option(1.0, help="Smallest search-window diameter (m)"),
    window_max: float = typer.Option(10.0, help="Largest search-window diameter (m)"),
    max_crown_radius: float = typer.Option(10.0, help="Largest distance of a crown pixel from its top (m)"),
    crown_fraction: float = typer.Option(0.5, help="Crown pixels are at least this fraction of the top's height"),
    block: int = typer.Option(1024, help="Block size in pixels (memory only; results do not depend on it)"),
    overwrite: bool = typer.Option(False, help="Replace existing outputs"),
) -> None:
    """Individual trees from a canopy-height raster: tree tops, crown polygons, crown ids, summary."""
    from geodino.trees import CrownParams, crowns

    params = CrownParams(min_height=min_height, smoothing_m=smooth, window_intercept_m=window_intercept,
                         window_slope=window_slope, window_min_m=window_min, window_max_m=window_max,
                         max_crown_radius_m=max_crown_radius, crown_fraction=crown_fraction, block=block)
    result = crowns(canopy, out, params, band=band, overwrite=overwrite)
    report = result.report
    typer.echo(f"{report['trees']} trees, {report['density_per_ha']} per ha -> {out}")
    for p in result.outputs.values():
        typer.echo(str(p))


def _data_samples() -> Path:
    here = Path(__file__).resolve().parents[1] / "data_samples"
    if not (here / "scene" / "scene.tif").exists():
        raise GeodinoError(f"the sample data is not at {here}; run the demo from a clone of the geodino repository "
                           "(pip install -e .), or use `geodino run` on your own scene")
    return here


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="Output folder"),
    backbone: Optional[str] = typer.Option(None, help="Run another backbone (e.g. facebook/dinov3-vitl16-pretrain-sat493m "
                                           "or a local copy): then embeddings, plus a canopy model if given"),
    canopy_model: Optional[str] = typer.Option(None, help="CHMv2 canopy model (e.g. facebook/dinov3-vitl16-chmv2-dpt-head)"),
    device: str = typer.Option("cpu", help="cpu, cuda or auto"),
    precision: Optional[str] = typer.Option(None, help="Backbone precision: fp32, bf16 or int8 (default: the device's)"),
    overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite", help="Replace earlier demo outputs"),
) -> None:
    """The full pipeline on the bundled sample scene with the bundled demo model, plus a PNG quicklook."""
    import json

    from geodino.pipeline import build_run, load_pipeline, write_scene

    samples = _data_samples()
    options = load_pipeline(samples.parent / "pipelines" / "demo.yaml")
    options.device = device
    options.precision = precision
    options.quicklook = True
    if backbone:
        # the bundled heads belong to the bundled tiny backbone: another backbone gets embeddings
        options.backbone, options.canopy_head, options.landcover_head = backbone, None, None
        options.embeddings = True
        options.profile = options.profile or "reflectance"
    if canopy_model:
        options.canopy_model, options.canopy_head = canopy_model, None
    run = build_run(str(samples / "scene" / "scene.tif"), options)
    report = write_scene(run, out, overwrite=overwrite)
    png = out / report["outputs"]["quicklook"]  # write_scene draws it
    typer.echo(json.dumps({"outputs": {k: str(out / v) for k, v in report["outputs"].items()},
                           "quicklook": str(png), "report": str(out / "report.json")}, indent=2))


def _embedding_options(backbone, profile, bands, window, overlap, batch_size, device) -> dict:
    """Run options for computing embeddings from a scene (none when SCENE already is embeddings)."""
    options = dict(profile=profile, bands=_bands(bands), window=window, overlap=overlap, batch_size=batch_size,
                   device=device)
    if backbone:
        options["backbone"] = backbone
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def similar(
    scene: str = typer.Argument(..., help="Scene file, or embeddings.tif / an output folder that has one"),
    exemplar: str = typer.Option(..., help="x,y in the scene's CRS, or a vector file (points or polygons)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (similarity.tif; embeddings.tif for a scene)"),
    backbone: Optional[str] = typer.Option(None, help="DINOv3 backbone, needed when SCENE is a scene"),
    profile: Optional[str] = typer.Option(None, help="Sensor profile (default auto)"),
    bands: Optional[str] = typer.Option(None, help="Comma-separated R,G,B bands by index or description"),
    window: Optional[int] = typer.Option(None, help="Window size in pixels"),
    overlap: Optional[int] = typer.Option(None, help="Window overlap in pixels"),
    batch_size: Optional[int] = typer.Option(None, help="Windows per model call"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto"),
    overwrite: bool = typer.Option(False, help="Replace existing outputs"),
) -> None:
    """Cosine similarity of every patch embedding to an exemplar's mean embedding (similarity.tif)."""
    from geodino.analysis import parse_exemplar, write_similarity

    opts = _embedding_options(backbone, profile, bands, window, overlap, batch_size, device)
    typer.echo(str(write_similarity(scene, parse_exemplar(exemplar), out, overwrite=overwrite, **opts)))


@app.command()
def cluster(
    scene: str = typer.Argument(..., help="Scene file, or embeddings.tif / an output folder that has one"),
    k: int = typer.Option(8, "--k", "-k", help="Number of clusters (2-254)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (clusters.tif, clusters.qml)"),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same clusters"),
    backbone: Optional[str] = typer.Option(None, help="DINOv3 backbone, needed when SCENE is a scene"),
    profile: Optional[str] = typer.Option(None, help="Sensor profile (default auto)"),
    bands: Optional[str] = typer.Option(None, help="Comma-separated R,G,B bands by index or description"),
    window: Optional[int] = typer.Option(None, help="Window size in pixels"),
    overlap: Optional[int] = typer.Option(None, help="Window overlap in pixels"),
    batch_size: Optional[int] = typer.Option(None, help="Windows per model call"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto"),
    overwrite: bool = typer.Option(False, help="Replace existing outputs"),
) -> None:
    """Streaming k-means of the patch embeddings: a cluster map COG with a colour table."""
    from geodino.analysis import cluster as run_cluster

    opts = _embedding_options(backbone, profile, bands, window, overlap, batch_size, device)
    result = run_cluster(scene, k, seed=seed, out=out, overwrite=overwrite, progress=None, **opts)
    typer.echo(str(result.path))


@app.command()
def explore(
    out_dir: Path = typer.Argument(..., help="Output folder of `geodino run` (or a scene's subfolder)"),
    html: Path = typer.Option(..., "--html", help="Standalone HTML file to write"),
    max_size: int = typer.Option(1024, help="Largest side of each raster layer in pixels (bounds the file size)"),
    basemap: bool = typer.Option(True, "--basemap/--no-basemap", help="Add an OpenStreetMap layer (loads when online)"),
    overwrite: bool = typer.Option(False, help="Replace an existing HTML file"),
) -> None:
    """An interactive web map of a run's outputs (layers, legends, click to read values) as one HTML file."""
    from geodino.webmap import save_html

    typer.echo(str(save_html(out_dir, html, max_size=max_size, basemap=basemap, overwrite=overwrite)))


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0 done, 2 a user error (one line, no traceback),
    130 interrupted (SIGINT), 143 terminated (SIGTERM), 1 a bug (with its traceback)."""
    from geodino.runtime import exit_code_for, gdal_settings, signals_as_interrupts

    with signals_as_interrupts() as signals, gdal_settings():
        try:
            status = app(args=argv, standalone_mode=False)
        except GeodinoError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            return e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            status = 130
        except Exception as e:
            # typer's (vendored) click signals usage errors and --help through exceptions
            if hasattr(e, "show") and hasattr(e, "exit_code"):
                e.show()
                return e.exit_code
            if type(e).__name__ == "Exit":
                return getattr(e, "exit_code", 0)
            raise
    # typer turns KeyboardInterrupt into Exit(130) and, outside standalone mode, returns its code
    if status == 130 or signals.received is not None:
        code = exit_code_for(signals.received)
        name = "terminated (SIGTERM)" if code == 143 else "interrupted (SIGINT)"
        err.print(f"{name}: stopped; what was in progress was not left at its final paths", highlight=False,
                  soft_wrap=True)
        return code
    return status if isinstance(status, int) else 0


def entry() -> None:
    from geodino.runtime import limit_malloc_arenas

    limit_malloc_arenas()  # this process is geodino's own (a library user's is not: geodino.runtime)
    sys.exit(main())


if __name__ == "__main__":
    entry()
