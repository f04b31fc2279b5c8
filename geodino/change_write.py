"""Writing a change run: COGs in one streamed pass, then polygons, the transition matrix and the report.

Outputs (those the heads allow; embedding change always):
``canopy_change.tif``, ``canopy_change_class.tif`` (no change / canopy loss / partial canopy
loss / gain, :func:`geodino.change_maps.canopy_change_classes`), ``landcover_transition.tif``,
``embedding_change.tif`` (one band per step), ``change.gpkg``, ``transitions.csv`` / ``transitions.json`` and ``report.json``, which
is written last and marks the set complete.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import geodino
from geodino.change_maps import (
    CANOPY_CHANGE_CLASSES,
    DEFAULT_GAP_HEIGHT,
    DEFAULT_MIN_HEIGHT_CHANGE,
    canopy_change_classes,
    check_thresholds,
    tree_codes,
)
from geodino.change_run import ChangeRun
from geodino.change_vectors import Step, change_tables, embedding_summary
from geodino.export import RasterOutput, atomic_path, check_writable, write_rasters
from geodino.progress import Progress
from geodino.units import pixel_area_m2

OUTPUTS = ("canopy_change.tif", "canopy_change_class.tif", "landcover_transition.tif", "embedding_change.tif", "change.gpkg",
           "transitions.csv", "transitions.json", "report.json")


def _provenance(run: ChangeRun) -> dict:
    o = run.options
    return {"geodino_version": geodino.__version__, "backbone": o.backbone,
            "canopy_head": o.canopy_head or o.canopy_model or "", "landcover_head": o.landcover_head or "",
            "window": o.window, "overlap": o.overlap,
            "sensor_profile": ",".join(r.normalisation.profile for r in run.runs),
            "normalisation": json.dumps([r.normalisation.to_dict() for r in run.runs]),
            "scenes": json.dumps([r.scene.paths[0] for r in run.runs]),
            "dates": ",".join(d.label for d in run.dates), "date_sources": ",".join(d.source for d in run.dates),
            "coregistration_shift_px": json.dumps([c.to_dict()["shift_px"] for c in run.coregistration]),
            "min_height_change_m": run.min_height_change, "gap_height_m": run.gap_height,
            "radiometric_match": json.dumps([m.to_dict() for m in run.radiometry])}


def distinct_windows(run: ChangeRun) -> int:
    """Windows inferred: a scene given for two dates is inferred once (same graph keys)."""
    return sum(len(r.tiles) for r in {r.scene: r for r in run.runs}.values())


def planned_outputs(run: ChangeRun, out: Path, polygons: bool) -> dict[str, Path]:
    ds = run.dataset
    names = {"embedding_change": "embedding_change.tif"}
    if "canopy_change" in ds:
        names["canopy_change"] = "canopy_change.tif"
        names["canopy_change_class"] = "canopy_change_class.tif"
    if "landcover_transition" in ds:
        names["landcover_transition"] = "landcover_transition.tif"
        names["transitions_csv"] = "transitions.csv"
        names["transitions_json"] = "transitions.json"
    if polygons and ("canopy_change" in ds or "landcover_transition" in ds):
        names["polygons"] = "change.gpkg"
    names["report"] = "report.json"
    return {k: out / v for k, v in names.items()}


def with_thresholds(run: ChangeRun, min_height_change: float | None, gap_height: float | None) -> ChangeRun:
    """``run`` with its canopy change classes made with these thresholds (None: keep the run's)."""
    mhc = run.min_height_change if min_height_change is None else float(min_height_change)
    gap = run.gap_height if gap_height is None else float(gap_height)
    check_thresholds(mhc, gap)
    if (mhc, gap) == (run.min_height_change, run.gap_height) or "canopy_change_class" not in run.dataset:
        return run
    ds = run.dataset.copy()
    cls = ds["canopy_change_class"]
    heights = [ds["canopy_height"].data[k] for k in range(len(run.dates))]
    labels = [ds["landcover"].data[k] for k in range(len(run.dates))] if "landcover" in ds else None
    ds["canopy_change_class"] = cls.copy(data=canopy_change_classes(heights, run.steps, mhc, gap, labels=labels,
                                                                    classes=run.runs[0].classes))
    ds["canopy_change_class"].attrs.update(min_height_change_m=mhc, gap_height_m=gap)
    return replace(run, dataset=ds, min_height_change=mhc, gap_height=gap)


def write_change(run: ChangeRun, out_dir: str | Path, *, min_height_change: float | None = None,
                 gap_height: float | None = None, min_area: float | None = None, polygons: bool = True,
                 overwrite: bool = False, quiet: bool = False) -> dict:
    """Compute and write every change output of ``run`` into ``out_dir``; returns the report.

    ``min_height_change`` / ``gap_height`` (m): the canopy change classes' thresholds (None: the
    run's, :data:`DEFAULT_MIN_HEIGHT_CHANGE` and :data:`DEFAULT_GAP_HEIGHT` unless built otherwise).
    """
    from geodino.pipeline import _scheduler

    run = with_thresholds(run, min_height_change, gap_height)
    out = Path(out_dir)
    paths = planned_outputs(run, out, polygons)
    check_writable(paths.values(), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    min_area = run.options.min_polygon_area if min_area is None else min_area
    ds, grid, o = run.dataset, run.grid, run.options
    tags = _provenance(run)
    labels = run.step_labels
    rasters = []
    if "canopy_change" in ds:
        rasters.append(RasterOutput(paths["canopy_change"], ds["canopy_change"], dtype="float32", nodata=float("nan"),
                                    descriptions=[f"canopy change {s}" for s in labels], units="m", tags=tags,
                                    overview_resampling="average", grid=grid))
        rasters.append(RasterOutput(paths["canopy_change_class"], ds["canopy_change_class"], dtype="uint8", nodata=0,
                                    descriptions=[f"canopy change class {s}" for s in labels], tags=tags,
                                    classes=CANOPY_CHANGE_CLASSES, overview_resampling="mode", grid=grid))
    if "landcover_transition" in ds:
        rasters.append(RasterOutput(paths["landcover_transition"], ds["landcover_transition"], dtype="uint8",
                                    nodata=0, descriptions=[f"land-cover transition {s}" for s in labels], tags=tags,
                                    classes=run.transitions, overview_resampling="mode", grid=grid))
    rasters.append(RasterOutput(paths["embedding_change"], ds["embedding_change"], dtype="float32",
                                nodata=float("nan"), descriptions=[f"embedding change {s}" for s in labels],
                                units="1 - cosine similarity", tags=tags, overview_resampling="average",
                                grid=grid.coarsen(run.runs[0].bundle.patch_size)))
    start = time.perf_counter()
    with Progress(f"change {len(run.runs)} dates", total=distinct_windows(run),
                  enabled=None if not quiet else False) as bar:
        for r in run.runs:  # a scene given twice shares its batch tasks: counted once whichever runs
            r.hooks.append(bar.advance)
        try:
            with _scheduler(o):
                write_rasters(rasters, overwrite=overwrite, compress=o.compress)
        finally:
            for r in run.runs:
                r.hooks.remove(bar.advance)
                r.scene.release_tiles()  # every window is read: the source tiles are not needed by the tables
    steps = [Step(k + 1, run.dates[i].label, run.dates[j].label) for k, (i, j) in enumerate(run.steps)]
    # the summaries, the transition matrix and the polygons in one pass over the rasters
    tables, gdf = change_tables(steps, canopy=paths.get("canopy_change"),
                                canopy_classes=paths.get("canopy_change_class"),
                                transitions=paths.get("landcover_transition"), classes=run.runs[0].classes,
                                min_area=min_area, polygons="polygons" in paths)
    report = _report(run, paths, steps, tables, min_area)
    if gdf is not None:
        with atomic_path(paths["polygons"]) as tmp:
            gdf.to_file(tmp, driver="GPKG", layer="change")
        _polygon_summary(report, gdf)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["outputs"] = {k: p.name for k, p in paths.items() if k != "report"}
    report["complete"] = True
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


def run_change(scenes, out_dir: str | Path, options, *, dates=None, grid=None,
               min_height_change: float = DEFAULT_MIN_HEIGHT_CHANGE, gap_height: float = DEFAULT_GAP_HEIGHT,
               radiometric_match: bool = True, min_area: float | None = None,
               overwrite: bool = False, quiet: bool = False, log=print) -> dict:
    """Build and write a change run (what ``geodino change`` does); warnings go to ``log``."""
    import warnings

    from geodino.change_run import ChangeWarning, build_change

    out = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChangeWarning)  # logged below, once, and kept in the report
        run = build_change(scenes, options, dates=dates, grid=grid, radiometric_match=radiometric_match,
                           min_height_change=min_height_change, gap_height=gap_height)
    # refuse before any work if outputs exist (and never touch files we did not plan to write)
    check_writable(planned_outputs(run, out, options.polygons).values(), overwrite)
    for note in run.warnings:
        log(f"warning: {note}")
    report = write_change(run, out, min_area=min_area, polygons=options.polygons, overwrite=overwrite, quiet=quiet)
    log(f"{len(run.runs)} dates ({', '.join(d.label for d in run.dates)}) -> {out} in {report['seconds']} s")
    return report


def _report(run: ChangeRun, paths: dict, steps: list[Step], tables: list, min_area: float) -> dict:
    grid = run.grid
    px = pixel_area_m2(grid.crs, grid.transform)  # m², whatever the CRS's unit
    o = run.options
    report = {
        "scenes": [r.scene.paths[0] for r in run.runs], "dates": [d.label for d in run.dates],
        "date_sources": [d.source for d in run.dates], "geodino_version": geodino.__version__,
        "crs": grid.crs.to_string(), "width": grid.width, "height": grid.height,
        "transform": list(grid.transform)[:6], "pixel_area_m2": px,
        "models": {"backbone": o.backbone, "canopy_head": o.canopy_head, "landcover_head": o.landcover_head,
                   "canopy_model": o.canopy_model},
        "sensor_profiles": [r.normalisation.profile for r in run.runs], "window": o.window, "overlap": o.overlap,
        "windows": distinct_windows(run),
        "min_height_change_m": run.min_height_change, "gap_height_m": run.gap_height, "min_area_m2": min_area,
        "canopy_classes": _class_definitions(run),
        "radiometric_match": [m.to_dict() for m in run.radiometry],
        "coregistration": [c.to_dict() for c in run.coregistration], "warnings": list(run.warnings),
        "steps": [],
    }
    matrices = []
    for step, table in zip(steps, tables):
        entry = {"step": step.label, "date_from": step.date_from, "date_to": step.date_to}
        if "canopy_change" in paths:
            s = table.canopy_summary()
            entry["canopy"] = {"valid_area_m2": s["valid_pixels"] * px, "loss_area_m2": s["loss_pixels"] * px,
                               "partial_loss_area_m2": s["partial_loss_pixels"] * px,
                               "gain_area_m2": s["gain_pixels"] * px, "mean_change_m": s["mean_change_m"],
                               "mean_loss_m": s["mean_loss_m"], "mean_partial_loss_m": s["mean_partial_loss_m"],
                               "mean_gain_m": s["mean_gain_m"]}
        if "landcover_transition" in paths:
            classes = run.runs[0].classes
            m = table.transitions[1:].reshape(len(classes), len(classes)) * px / 1e6
            matrices.append((step, m))
            pairs = [(m[i, j], f"{a} -> {b}") for i, a in enumerate(classes.names)
                     for j, b in enumerate(classes.names) if i != j and m[i, j] > 0]
            entry["landcover"] = {"changed_area_km2": float(sum(a for a, _ in pairs)),
                                  "unchanged_area_km2": float(m.trace()),
                                  "largest_transitions_km2": {n: float(a) for a, n in sorted(pairs, reverse=True)[:10]}}
        entry["embedding_change"] = embedding_summary(paths["embedding_change"], step.band)
        report["steps"].append(entry)
    if matrices:
        _write_matrices(run, paths, matrices)
    return report


def _class_definitions(run: ChangeRun) -> dict:
    trees = tree_codes(run.runs[0].classes) if "landcover" in run.dataset else ()
    names = [c.name for c in run.runs[0].classes.classes if c.code in trees] if trees else []
    cover = f" and the later land cover is no longer {' / '.join(names)}" if trees else ""
    return {"canopy loss": f"height fell by >= {run.min_height_change:g} m to below {run.gap_height:g} m{cover} "
                           "(canopy gone: clear-cut, windthrow, new gap)",
            "partial canopy loss": f"any other fall of >= {run.min_height_change:g} m (a canopy left, or trees "
                                   "still seen)",
            "canopy gain": f"height rose by >= {run.min_height_change:g} m"}


def _write_matrices(run: ChangeRun, paths: dict, matrices: list) -> None:
    names = run.runs[0].classes.names
    doc = {"units": "km2", "classes": names, "rows": "from (earlier date)", "columns": "to (later date)",
           "valid_pixels_only": True, "steps": []}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["step", "date_from", "date_to", "from \\ to (km2)", *names])
    for step, m in matrices:
        doc["steps"].append({"step": step.label, "date_from": step.date_from, "date_to": step.date_to,
                             "matrix": [[round(float(v), 9) for v in row] for row in m]})
        for name, row in zip(names, m):
            writer.writerow([step.label, step.date_from, step.date_to, name, *[f"{v:.9g}" for v in row]])
    with atomic_path(paths["transitions_csv"]) as tmp:
        tmp.write_text(text.getvalue())
    with atomic_path(paths["transitions_json"]) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))


def _polygon_summary(report: dict, gdf) -> None:
    for entry in report["steps"]:
        rows = gdf[gdf["step"] == entry["step"]]
        counts = {}
        for kind, group in rows.groupby("type"):
            counts[kind] = {"polygons": len(group), "area_m2": float(group["area_m2"].sum())}
        entry["polygons"] = counts


__all__ = ["DEFAULT_GAP_HEIGHT", "DEFAULT_MIN_HEIGHT_CHANGE", "OUTPUTS", "planned_outputs", "run_change",
           "with_thresholds", "write_change"]
