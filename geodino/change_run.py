"""Change between dates: every date through the same model on one grid, combined block-wise.

``build_change`` builds each date's lazy run with the engine (:func:`geodino.pipeline.build_run`
on one common grid: the first scene's, a ``--grid`` file's, or the first scene resampled to
``--target-gsd``; later dates are warped onto it by rasterio's WarpedVRT), checks the dates'
co-registration, and combines the dates' maps block by block (:mod:`geodino.change_maps`)
into a lazy, CRS-aware Dataset. ``write_change`` computes all change rasters in one streamed
pass (each window inferred once per date), then derives polygons, the transition matrix and
the report from the written rasters. The Python entry point is :func:`change`
(``geodino.change``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask.array as da
import xarray as xr

import geodino
from geodino.change_maps import (
    CANOPY_CHANGE_CLASSES,
    DEFAULT_GAP_HEIGHT,
    DEFAULT_MIN_HEIGHT_CHANGE,
    canopy_change,
    canopy_change_classes,
    change_steps,
    check_thresholds,
    embedding_change,
    landcover_transitions,
    transition_table,
)
from geodino.classes import ClassTable
from geodino.coregistration import Coregistration, check_coregistration
from geodino.dates import SceneDate, order_warning, scene_dates
from geodino.errors import InputError
from geodino.options import RunOptions
from geodino.pipeline import SceneRun, build_run
from geodino.radiometry import RadiometricMatch, common_normalisations, match_radiometry
from geodino.scene import Grid


class ChangeWarning(UserWarning):
    """Something that makes change maps less trustworthy (e.g. a co-registration shift)."""


@dataclass
class ChangeRun:
    """A lazy change run: the Dataset plus each date's run and what was checked."""

    dataset: xr.Dataset
    runs: list[SceneRun]
    dates: list[SceneDate]
    steps: list[tuple[int, int]]
    options: RunOptions
    coregistration: list[Coregistration]
    transitions: ClassTable | None = None
    warnings: list[str] = field(default_factory=list)
    radiometry: list[RadiometricMatch] = field(default_factory=list)
    min_height_change: float = DEFAULT_MIN_HEIGHT_CHANGE
    gap_height: float = DEFAULT_GAP_HEIGHT

    @property
    def grid(self) -> Grid:
        return self.runs[0].scene.grid

    @property
    def step_labels(self) -> list[str]:
        return [f"{self.dates[i].label} -> {self.dates[j].label}" for i, j in self.steps]


def grid_of(path: str | Path) -> Grid:
    """The grid (CRS, transform, size) of a raster file, for ``--grid``."""
    from geodino.sources import _open_checked

    with _open_checked(str(path)) as src:
        if src.crs is None:
            raise InputError(f"{path}: --grid needs a georeferenced raster (it has no CRS)")
        if src.crs.is_geographic:
            raise InputError(f"{path}: --grid needs a projected CRS (areas are reported in m²); "
                             f"this one is {src.crs.to_string()}")
        return Grid(src.crs, src.transform, src.width, src.height)


def build_change(scenes: Sequence[str | Path], options: RunOptions, *, dates: Sequence[str] | None = None,
                 grid: Grid | str | Path | None = None, progress=None, radiometric_match: bool = True,
                 min_height_change: float = DEFAULT_MIN_HEIGHT_CHANGE, gap_height: float = DEFAULT_GAP_HEIGHT
                 ) -> ChangeRun:
    """Build the lazy change run of ``scenes`` (two or more dates, in the order given).

    ``radiometric_match``: map every date onto the dates' mean radiometry first
    (:mod:`geodino.radiometry`). ``min_height_change`` and ``gap_height`` (m) define the canopy
    change classes (:func:`geodino.change_maps.canopy_change_classes`).
    """
    check_thresholds(min_height_change, gap_height)
    scenes = [str(s) for s in scenes]
    if len(scenes) < 2:
        raise InputError(f"change needs at least two scenes (dates), got {len(scenes)}")
    labels = scene_dates(scenes, dates)
    if grid is not None and not isinstance(grid, Grid):
        grid = grid_of(grid)
    opts = replace(options, embeddings=True, probabilities=False)  # embeddings: the label-free change signal
    first = build_run(scenes[0], opts, progress, grid=grid)
    common = first.scene.grid
    if not common.crs.is_projected:
        raise InputError(f"{scenes[0]}: the processing grid is in {common.crs.to_string()}; change areas need a "
                         "projected CRS (pass --grid with a projected raster)")
    runs = [first] + [build_run(s, opts, progress, grid=common) for s in scenes[1:]]
    matches = []
    if radiometric_match:
        matches = [match_radiometry(first.scene, r.scene) for r in runs[1:]]
        for r in runs:  # the samples' tiles, spread over the scene: not those the pass starts with
            r.scene.release_tiles()
        norms = common_normalisations(first.normalisation, [r.normalisation for r in runs], matches)
        if any(n != r.normalisation for n, r in zip(norms, runs)):  # rebuilt on the common radiometry
            runs = [build_run(s, opts, progress, grid=grid if k == 0 else common,
                              adjust_normalisation=lambda scene, norm, n=norms[k]: n)
                    for k, s in enumerate(scenes)]
            first = runs[0]
    coreg = [check_coregistration(first.scene, r.scene, reference_name=f"{labels[0].label} ({scenes[0]})",
                                  moving_name=f"{labels[k].label} ({scenes[k]})")
             for k, r in enumerate(runs) if k > 0]
    for r in runs:  # nor are the check's (the centre)
        r.scene.release_tiles()
    notes = [c.warning for c in coreg if c.warning]
    notes += [f"radiometry of {labels[k + 1].label} not matched to {labels[0].label}: {m.reason}"
              for k, m in enumerate(matches) if not m.applied]
    if order_warning(labels):
        notes.append(order_warning(labels))
    for note in notes:
        warnings.warn(note, ChangeWarning, stacklevel=2)
    steps = change_steps(len(scenes))
    run = ChangeRun(xr.Dataset(), runs, labels, steps, opts, coreg, warnings=notes, radiometry=matches,
                    min_height_change=min_height_change, gap_height=gap_height)
    run.transitions = transition_table(first.classes) if first.classes is not None else None
    run.dataset = _dataset(run)
    return run


def _dataset(run: ChangeRun) -> xr.Dataset:
    dsets = [r.dataset for r in run.runs]
    first = dsets[0]
    date_labels = [d.label for d in run.dates]
    step_coords = {"step": run.step_labels, "date_from": ("step", [run.dates[i].label for i, _ in run.steps]),
                   "date_to": ("step", [run.dates[j].label for _, j in run.steps])}
    variables = {}
    if "canopy_height" in first:
        heights = [d["canopy_height"].data for d in dsets]
        y, x = first["canopy_height"].y, first["canopy_height"].x
        variables["canopy_height"] = xr.DataArray(da.stack(heights), dims=("date", "y", "x"),
                                                  coords={"date": date_labels, "y": y, "x": x},
                                                  attrs={"units": "m", "long_name": "canopy height"})
        variables["canopy_change"] = xr.DataArray(
            canopy_change(heights, run.steps), dims=("step", "y", "x"), coords={**step_coords, "y": y, "x": x},
            attrs={"units": "m", "long_name": "canopy height change (later minus earlier)"})
        variables["canopy_change_class"] = xr.DataArray(
            canopy_change_classes(heights, run.steps, run.min_height_change, run.gap_height,
                                  labels=[d["landcover"].data for d in dsets] if "landcover" in first else None,
                                  classes=run.runs[0].classes),
            dims=("step", "y", "x"), coords={**step_coords, "y": y, "x": x},
            attrs={"long_name": "canopy change class", "class_codes": list(CANOPY_CHANGE_CLASSES.codes),
                   "class_names": list(CANOPY_CHANGE_CLASSES.names), "_FillValue": 0,
                   "min_height_change_m": run.min_height_change, "gap_height_m": run.gap_height})
    if "landcover" in first:
        labels = [d["landcover"].data for d in dsets]
        classes = run.runs[0].classes
        y, x = first["landcover"].y, first["landcover"].x
        variables["landcover"] = xr.DataArray(da.stack(labels), dims=("date", "y", "x"),
                                              coords={"date": date_labels, "y": y, "x": x},
                                              attrs=dict(first["landcover"].attrs))
        variables["landcover_transition"] = xr.DataArray(
            landcover_transitions(labels, run.steps, classes), dims=("step", "y", "x"),
            coords={**step_coords, "y": y, "x": x},
            attrs={"long_name": "land-cover transition", "transition_codes": run.transitions.codes,
                   "transition_names": run.transitions.names, "_FillValue": 0})
    emb = first["embeddings"]
    variables["embedding_change"] = xr.DataArray(
        embedding_change([d["embeddings"].data for d in dsets], run.steps), dims=("step", "y_patch", "x_patch"),
        coords={**step_coords, "y_patch": emb.y_patch, "x_patch": emb.x_patch},
        attrs={"long_name": "embedding change (1 - cosine similarity)", "units": "1"})
    ds = xr.Dataset(variables).rio.write_crs(run.grid.crs)
    ds.attrs.update(scenes=[r.scene.paths[0] for r in run.runs], dates=date_labels,
                    date_sources=[d.source for d in run.dates], backbone=run.options.backbone,
                    window=run.options.window, overlap=run.options.overlap, geodino_version=geodino.__version__,
                    coregistration_shift_px=[list(c.to_dict()["shift_px"]) for c in run.coregistration],
                    radiometric_match=json.dumps([m.to_dict() for m in run.radiometry]),
                    warnings=list(run.warnings))
    return ds


def change(scenes: Sequence[str | Path], *, backbone: str, canopy_head: str | None = None,
           landcover_head: str | None = None, dates: Sequence[str] | None = None,
           grid: Grid | str | Path | None = None, radiometric_match: bool = True,
           min_height_change: float = DEFAULT_MIN_HEIGHT_CHANGE, gap_height: float = DEFAULT_GAP_HEIGHT,
           **options) -> xr.Dataset:
    """Change between dates as a lazy, CRS-aware xarray Dataset (computed when accessed).

    Variables: ``canopy_change``, ``canopy_change_class`` and ``landcover_transition`` (step, y,
    x), ``embedding_change`` (step, y_patch, x_patch), and each date's ``canopy_height`` /
    ``landcover`` (date, y, x), as far as the heads given allow; embeddings need no head.
    ``options``: any :class:`geodino.RunOptions` field (profile, bands, window, target_gsd, ...).
    """
    opts = RunOptions.from_mapping(dict(backbone=backbone, canopy_head=canopy_head, landcover_head=landcover_head,
                                        embeddings=True, **options), source="change")
    return build_change(scenes, opts, dates=dates, grid=grid, radiometric_match=radiometric_match,
                        min_height_change=min_height_change, gap_height=gap_height).dataset


__all__ = ["ChangeRun", "ChangeWarning", "build_change", "change", "grid_of"]
