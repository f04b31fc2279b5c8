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


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except GeodinoError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
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
