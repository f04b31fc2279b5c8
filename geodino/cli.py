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

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Georeferenced canopy-height, land-cover and embedding maps with a frozen DINOv3 backbone.")
err = Console(stderr=True)


@app.callback()
def _root() -> None:
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
) -> None:
    """Generate a synthetic scene with land-cover and canopy-height ground truth."""
    from geodino.progress import Progress
    from geodino.synth import SynthConfig, generate

    try:
        cfg = SynthConfig(width=width or size, height=height or size, seed=seed, crs=crs, gsd=gsd,
                          sun_elevation=sun_elevation, sun_azimuth=sun_azimuth, nodata_collar=collar)
    except ValueError as e:
        raise GeodinoError(str(e)) from None
    with Progress("synth blocks", unit="blocks") as bar:
        paths = generate(out, cfg, polygons=polygons, overwrite=overwrite, progress=bar.update_to)
    for p in (paths.scene, paths.landcover, paths.canopy_height, paths.polygons):
        if p is not None:
            typer.echo(str(p))


def _bands(value: Optional[str]):
    return [b.strip() for b in value.split(",")] if value else None


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
    embeddings: Optional[bool] = typer.Option(None, "--embeddings/--no-embeddings", help="Also write the embedding raster"),
    probabilities: Optional[bool] = typer.Option(None, "--probabilities/--no-probabilities", help="Also write class probabilities"),
    scheduler: Optional[str] = typer.Option(None, help="threads, local (a LocalCluster) or a scheduler address"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the backbone"),
    target_gsd: Optional[float] = typer.Option(None, help="Resample to this pixel size in metres (e.g. 0.6 for SAT)"),
    polygons: Optional[bool] = typer.Option(None, "--polygons/--no-polygons", help="Write land-cover polygons"),
    min_polygon_area: Optional[float] = typer.Option(None, help="Drop polygons smaller than this (m²)"),
    chunks: Optional[int] = typer.Option(None, help="Output block size in pixels, rounded down to whole window strides (memory/parallelism only)"),
    workers: Optional[int] = typer.Option(None, help="Threads for reading, blending and writing"),
    precision: Optional[str] = typer.Option(None, help="Backbone precision: fp32, bf16 or int8 (default fp32 on a CPU, "
                                            "bf16 on CUDA); recorded in the outputs. See BENCHMARKS.md for speed and quality"),
    overwrite: bool = typer.Option(False, help="Recompute and replace finished outputs"),
) -> None:
    """Map canopy height and land cover (and embeddings) for one or many scenes."""
    from geodino.options import RunOptions, load_pipeline
    from geodino.runner import run_scenes

    options = load_pipeline(pipeline) if pipeline else RunOptions()
    overrides = dict(backbone=backbone, canopy_head=canopy_head, landcover_head=landcover_head,
                     canopy_model=canopy_model, profile=profile, bands=_bands(bands), window=window, overlap=overlap,
                     batch_size=batch_size, device=device, embeddings=embeddings, probabilities=probabilities,
                     scheduler=scheduler, compile=compile, target_gsd=target_gsd, polygons=polygons,
                     min_polygon_area=min_polygon_area, chunks=chunks, workers=workers, precision=precision)
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    reports = run_scenes(_expand(scenes), out, options, overwrite=overwrite, log=lambda m: err.print(m, highlight=False))
    for r in reports:
        typer.echo(f"{r['scene'][0]}: {r['windows']} windows, {r['seconds']} s, {r['windows_per_second']} windows/s")


@app.command()
def features(
    scene: list[str] = typer.Argument(..., help="Scene file(s): several are mosaicked"),
    backbone: str = typer.Option(..., help="DINOv3 hub id, short name, local folder or Meta .pth"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder"),
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
    from geodino.features import pca_picture
    from geodino.pipeline import RunOptions, build_run, write_scene

    options = RunOptions(backbone=backbone, profile=profile, bands=_bands(bands), window=window, overlap=overlap,
                         batch_size=batch_size, device=device, embeddings=True, embeddings_dtype=dtype,
                         polygons=False)
    from geodino.export import check_writable

    check_writable([out / "embeddings.tif", out / "embeddings_pca.tif"], overwrite)
    run = build_run(scene, options)
    write_scene(run, out, overwrite=overwrite)
    pca_picture(out / "embeddings.tif", out / "embeddings_pca.tif", overwrite=overwrite)
    typer.echo(str(out / "embeddings.tif"))
    typer.echo(str(out / "embeddings_pca.tif"))


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

    from geodino.train import FitConfig, fit as fit_head

    cfg = FitConfig(task=task, scene=scene, labels=labels, backbone=backbone, out=str(out), head_type=head_type,
                    profile=profile, bands=_bands(bands), window=window, class_column=class_column,
                    name_column=name_column, epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                    val_fraction=val_fraction, seed=seed, cache_dir=cache_dir, device=device)
    result = fit_head(cfg)
    typer.echo(json.dumps({"head": str(result.head_dir), "train_windows": result.train_windows,
                           "val_windows": result.val_windows, "metrics": _brief(result.metrics),
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
    from geodino.quicklook import quicklook

    samples = _data_samples()
    options = load_pipeline(samples.parent / "pipelines" / "demo.yaml")
    options.device = device
    options.precision = precision
    if backbone:
        # the bundled heads belong to the bundled tiny backbone: another backbone gets embeddings
        options.backbone, options.canopy_head, options.landcover_head = backbone, None, None
        options.embeddings = True
        options.profile = options.profile or "reflectance"
    if canopy_model:
        options.canopy_model, options.canopy_head = canopy_model, None
    run = build_run(str(samples / "scene" / "scene.tif"), options)
    report = write_scene(run, out, overwrite=overwrite)
    png = quicklook((samples / "scene" / "scene.tif", [3, 2, 1]), out, out / "quicklook.png")
    typer.echo(json.dumps({"outputs": {k: str(out / v) for k, v in report["outputs"].items()},
                           "quicklook": str(png), "report": str(out / "report.json")}, indent=2))


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except GeodinoError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted; partial outputs were removed")
        return 130
    except Exception as e:
        # typer's (vendored) click signals usage errors and --help through exceptions
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return e.exit_code
        if type(e).__name__ == "Exit":
            return getattr(e, "exit_code", 0)
        raise
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
