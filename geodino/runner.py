"""Running many scenes into an output folder: check everything first, resume only what matches.

A batch goes in two passes. :func:`plan_scenes` checks every scene before any work starts
(exists, readable, georeferenced, bands resolvable, resampling within bounds) and decides
for each one, from the run fingerprint (:mod:`geodino.fingerprint`) recorded in its folder,
whether it is finished (skip), to be made, or in a folder that holds another run's outputs
or files geodino did not write (refused without ``--overwrite``). Then each scene runs; a
failure or an interrupt removes what that scene had put at its final paths, so a folder
holds either a scene's complete outputs with their report or none of them.

Which files are geodino's: those a finished run's ``report.json`` lists, and those the
record of an unfinished run (``.geodino-run.json``, written before a scene starts and removed
when its report is in place) lists. Nothing else in an output folder is ever deleted or
replaced without ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import rasterio

from geodino.errors import ConfigError, GeodinoError, InputError, OutputExistsError
from geodino.export import atomic_path
from geodino.fingerprint import differences, fingerprint
from geodino.options import RunOptions
from geodino.pipeline import build_run, write_scene
from geodino.report import REPORT
from geodino.runtime import gdal_settings

OUTPUT_NAMES = ("canopy_height.tif", "landcover.tif", "landcover_probability.tif", "embeddings.tif",
                "landcover.gpkg", REPORT, "quicklook.png", "landcover.qml", "canopy_height.qml")
RECORD = ".geodino-run.json"  # an unfinished run's fingerprint and planned outputs
MAX_GROWTH = 16  # --target-gsd may grow the processing grid this many times in pixels without --force


def is_complete(out_dir: Path) -> bool:
    """Whether a scene's outputs are all there and readable (a finished earlier run)."""
    data = _read_json(out_dir / REPORT)
    if not data or not data.get("complete"):
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


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def planned_outputs(options: RunOptions) -> tuple[str, ...]:
    """The files a run with ``options`` writes into a scene's folder."""
    names = []
    if options.canopy_head or options.canopy_model:
        names.append("canopy_height.tif")
    if options.landcover_head:
        names.append("landcover.tif")
        if options.probabilities:
            names.append("landcover_probability.tif")
        if options.polygons:
            names.append("landcover.gpkg")
    if options.embeddings:
        names.append("embeddings.tif")
    return tuple(names) + (REPORT,)


def scene_out_dirs(out: Path, scenes: Sequence[str]) -> list[Path]:
    """One folder per scene: ``out`` itself for one scene, else ``out/<file stem>``; scenes
    whose stems collide get as many of their parent folders as tell them apart
    (``a/scene.tif`` -> ``scene_a``), so names depend only on the paths, not on their order."""
    if len(scenes) == 1:
        return [out]
    stems = [Path(s).stem for s in scenes]
    names = list(stems)
    for stem in set(stems):
        group = [i for i, s in enumerate(stems) if s == stem]
        if len(group) < 2:
            continue
        parents = {i: Path(os.path.abspath(scenes[i])).parent.parts[::-1] for i in group}
        for depth in range(1, 1 + max(len(p) for p in parents.values())):
            tails = {i: "_".join(p[:depth][::-1]) for i, p in parents.items()}
            if len(set(tails.values())) == len(group):
                break
        for i in group:
            names[i] = f"{stem}_{tails[i]}".replace(os.sep, "_").strip("_") or stem
    return [out / n for n in names]


def scene_out_dir(out: Path, scene: str, many: bool) -> Path:
    return out / Path(scene).stem if many else out


@dataclass
class ScenePlan:
    """What to do with one scene: run, skip, or nothing (``problem`` says why)."""

    scene: str
    out_dir: Path
    fingerprint: dict | None = None
    skip: bool = False
    geodino_files: tuple[str, ...] = ()  # earlier runs' files here, which a rerun may remove
    problem: GeodinoError | None = None


@dataclass
class Outcome:
    scene: str
    out_dir: Path
    status: str  # done | skipped | failed | not run
    detail: str = ""
    report: dict | None = field(default=None, repr=False)
    internal: bool = False  # failed on a bug rather than on the input


# --------------------------------------------------------------------------------------
# checking before any work


def check_options(options: RunOptions) -> None:
    """Options that are wrong for every scene: refused before anything else happens."""
    from geodino.sensor import get_profile

    options.validate()
    if options.profile is not None:
        try:
            get_profile(options.profile)
        except InputError as e:
            raise ConfigError(str(e)) from None


def check_scene(scene: str, options: RunOptions, *, force: bool = False) -> None:
    """Exists, readable, georeferenced, bands resolvable, resampling within bounds."""
    from geodino.scene import open_scene
    from geodino.sensor import choose_bands, get_profile, profile_hint

    opened = open_scene(scene, bands=options.bands, target_gsd=options.target_gsd)
    if options.bands is None and options.profile is not None:
        chosen = choose_bands(get_profile(options.profile), opened)
        count = len(chosen) if chosen is not None else opened.count
        if count != 3:
            raise InputError(f"{scene}: cannot tell which bands are red, green and blue for profile "
                             f"{options.profile} (bands are {', '.join(opened.band_names)}); "
                             + profile_hint(opened, "pass --bands R,G,B", options.profile))
    elif options.bands is not None and len(options.bands) != 3:
        raise InputError(f"{scene}: the backbone takes 3 bands, {len(options.bands)} given with --bands")
    src, dst = opened.source_grid, opened.grid
    growth = (dst.width * dst.height) / (src.width * src.height)
    if growth > MAX_GROWTH and not force:
        raise InputError(
            f"{scene}: --target-gsd {options.target_gsd} resamples {src.width} x {src.height} px "
            f"({src.res[0]:g} m) to {dst.width} x {dst.height} px, {growth:,.0f}x the pixels (more than "
            f"{MAX_GROWTH}x); choose a coarser --target-gsd, or pass --force to run it anyway")


def _check_out_folder(path: Path, label: str) -> None:
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{label} {path}: {p} is a file, not a folder; give a folder for --out")
            return


def plan_scene(scene: str, out_dir: Path, options: RunOptions, *, overwrite: bool, force: bool) -> ScenePlan:
    plan = ScenePlan(scene, out_dir)
    try:
        _check_out_folder(out_dir, "--out")
        check_scene(scene, options, force=force)
        plan.fingerprint = fingerprint(scene, options, out_dir)
        _decide(plan, options, overwrite)
    except GeodinoError as e:
        plan.problem = e
    return plan


def _decide(plan: ScenePlan, options: RunOptions, overwrite: bool) -> None:
    out = plan.out_dir
    report = _read_json(out / REPORT)
    record = _read_json(out / RECORD)
    ours = set()
    if report is not None and "geodino_version" in report:
        ours |= set(report.get("outputs", {}).values()) | {REPORT}
    if record is not None:
        ours |= set(record.get("outputs", []))
    plan.geodino_files = tuple(sorted(n for n in ours if (out / n).exists()))
    if report is not None and report.get("complete") and REPORT in ours:
        diffs = differences(report.get("fingerprint"), plan.fingerprint)
        if not diffs and is_complete(out) and not overwrite:  # --overwrite recomputes, as it says
            plan.skip = True
            return
        if diffs and not overwrite:
            raise OutputExistsError(
                f"{out} holds the outputs of another run ({'; '.join(diffs)}); pass --overwrite to "
                "replace them, or choose another --out")
    foreign = [n for n in planned_outputs(options) if (out / n).exists() and n not in ours]
    if foreign and not overwrite:
        raise OutputExistsError(
            f"{', '.join(str(out / n) for n in foreign)}: geodino did not write "
            f"{'these' if len(foreign) > 1 else 'this'} (no run record here lists {'them' if len(foreign) > 1 else 'it'}); "
            "pass --overwrite to replace, or choose another --out")


def plan_scenes(scenes: Sequence[str], out: str | Path, options: RunOptions, *, overwrite: bool = False,
                force: bool = False) -> list[ScenePlan]:
    """Check every scene and decide what to do with it; nothing is written."""
    check_options(options)
    if not scenes:
        raise InputError("no scene given")
    out = Path(out)
    _check_out_folder(out, "--out")
    resolved = [os.path.realpath(s) for s in scenes]
    twice = sorted({s for s, r in zip(scenes, resolved) if resolved.count(r) > 1})
    if twice:
        raise InputError(f"{', '.join(twice)}: the same scene is given more than once")
    return [plan_scene(s, d, options, overwrite=overwrite, force=force)
            for s, d in zip(scenes, scene_out_dirs(out, list(scenes)))]


# --------------------------------------------------------------------------------------
# running


def _remove(folder: Path, names) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()


def run_planned(plan: ScenePlan, options: RunOptions, *, overwrite: bool, quiet: bool) -> dict:
    """Run one checked scene; on any failure or interrupt, remove what it put at final paths."""
    out = plan.out_dir
    created = [p for p in (out, *out.parents) if not p.exists()]
    planned = planned_outputs(options)
    # earlier runs' files (ours by their records) make way; anything else stays and is refused
    _remove(out, plan.geodino_files)
    out.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in out.iterdir()}
    with atomic_path(out / RECORD) as tmp:
        tmp.write_text(json.dumps({"fingerprint": plan.fingerprint, "outputs": list(planned)}, indent=2))
    try:
        run = build_run(plan.scene, options)
        run.fingerprint = plan.fingerprint
        report = write_scene(run, out, overwrite=overwrite, quiet=quiet)
    except BaseException:
        # what this attempt put at final paths goes; a user's file there was refused up front
        made = {p.name for p in out.iterdir()} - before
        _remove(out, [n for n in made if n in planned or n in OUTPUT_NAMES])
        _remove(out, [RECORD])
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise
    _remove(out, [RECORD])
    return report


def run_scenes(scenes: Sequence[str], out: str | Path, options: RunOptions, *, overwrite: bool = False,
               keep_going: bool = False, force: bool = False, quiet: bool = False,
               log: Callable[[str], None] = print) -> list[dict]:
    """Run each scene into its own folder (``out`` itself for one scene); skip finished ones.

    Every scene is checked first; without ``keep_going`` any problem stops the batch before
    work starts, with all problems in one message. With ``keep_going``, scenes that fail
    (in the check or while running) are reported in a summary table and the rest run; a
    :class:`BatchError` at the end says how many failed. Returns the reports of the scenes
    done or skipped.
    """
    with gdal_settings():
        plans = plan_scenes(scenes, out, options, overwrite=overwrite, force=force)
        problems = [p for p in plans if p.problem is not None]
        if problems and not keep_going:
            if len(problems) == 1:
                raise problems[0].problem
            raise InputError(f"{len(problems)} of {len(plans)} scenes cannot run (nothing was started):\n"
                             + "\n".join(f"  {p.problem}" for p in problems))
        outcomes = []
        for plan in plans:
            if plan.problem is not None:
                outcomes.append(Outcome(plan.scene, plan.out_dir, "failed", str(plan.problem)))
                continue
            if plan.skip:
                log(f"{plan.scene}: outputs complete in {plan.out_dir} with the same inputs, options and "
                    "models, skipped")
                outcomes.append(Outcome(plan.scene, plan.out_dir, "skipped",
                                        report=_read_json(plan.out_dir / REPORT)))
                continue
            try:
                report = run_planned(plan, options, overwrite=overwrite, quiet=quiet)
            except Exception as e:
                if not keep_going:
                    raise
                outcomes.append(Outcome(plan.scene, plan.out_dir, "failed", _one_line(e),
                                        internal=not isinstance(e, GeodinoError)))
                log(f"{plan.scene}: failed: {_one_line(e)}")
                continue
            log(f"{plan.scene}: {report['windows']} windows in {report['seconds']} s -> {plan.out_dir}")
            outcomes.append(Outcome(plan.scene, plan.out_dir, "done", report=report))
        if keep_going or len(plans) > 1:
            log(summary_table(outcomes))
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            raise BatchError(f"{len(failed)} of {len(outcomes)} scenes failed (see the table above)",
                             internal=any(o.internal for o in failed))
        return [o.report for o in outcomes]


class BatchError(GeodinoError):
    """Some scenes of a --keep-going batch failed (exit 2; 1 if any failure was a bug)."""

    def __init__(self, message: str, internal: bool = False) -> None:
        super().__init__(message)
        self.exit_code = 1 if internal else 2


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def summary_table(outcomes: Sequence[Outcome]) -> str:
    rows = [("scene", "status", "folder", "detail")]
    rows += [(o.scene, o.status, str(o.out_dir), o.detail if o.status == "failed" else
              (f"{o.report['windows']} windows" if o.report else "")) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    lines.append(f"{done} done, {skipped} skipped, {failed} failed")
    return "\n".join(lines)


__all__ = [
    "OUTPUT_NAMES",
    "RECORD",
    "BatchError",
    "check_options",
    "check_scene",
    "is_complete",
    "plan_scenes",
    "planned_outputs",
    "run_scenes",
    "scene_out_dir",
    "scene_out_dirs",
    "summary_table",
]
