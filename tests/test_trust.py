"""Trustworthy runs (issue 13): never stale results, honest exit codes, nothing of the user's lost.

Each test here failed on the code before this change (see the closing note of issue 13).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import rasterio
from rasterio.transform import from_origin

from geodino.cli import main
from geodino.errors import ConfigError, InputError, OutputExistsError
from geodino.options import RunOptions, load_pipeline
from geodino.runner import RECORD, BatchError, plan_scenes, run_scenes, scene_out_dirs
from tests.conftest import REPO, realdata
from tests.helpers import random_image, write_raster

DEMO = REPO / "pipelines" / "demo.yaml"


def _options(**kw) -> RunOptions:
    opts = load_pipeline(DEMO)
    opts.window, opts.overlap, opts.batch_size = 128, 32, 4
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two small synthetic scenes (192 x 160 px: 4 windows of 128) and a finished run of the first."""
    from geodino.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("trust")
    a = generate(root / "a", SynthConfig(width=192, height=160, seed=4)).scene
    b = generate(root / "b", SynthConfig(width=192, height=160, seed=5)).scene
    finished = root / "finished"
    run_scenes([str(a)], finished, _options(), log=_quiet, quiet=True)
    return {"a": a, "b": b, "finished": finished, "root": root}


def _copy_finished(scenes, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(scenes["finished"], out)
    return out


# -- resume trusts the run, not the folder ---------------------------------------------


def test_rerun_with_other_options_is_refused_naming_what_differs(scenes, tmp_path):
    out = _copy_finished(scenes, tmp_path)
    stamp = (out / "landcover.tif").stat().st_mtime_ns
    logs = []
    run_scenes([str(scenes["a"])], out, _options(), log=logs.append)
    assert any("skipped" in m for m in logs)  # same scene, options and models
    assert (out / "landcover.tif").stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError, match=r"window 128 -> 256.*--overwrite.*another --out") as e:
        run_scenes([str(scenes["a"])], out, _options(window=256, bands=["3", "2", "1"]), log=_quiet)
    assert "bands none -> [3, 2, 1]" in str(e.value)
    assert json.loads((out / "report.json").read_text())["window"] == 128  # nothing touched
    # performance-only options are not part of the fingerprint
    plan, = plan_scenes([str(scenes["a"])], out, _options(workers=1, chunks=256, batch_size=2))
    assert plan.skip and plan.problem is None


def test_another_scene_into_a_finished_folder_is_refused(scenes, tmp_path):
    out = _copy_finished(scenes, tmp_path)
    assert main(["run", str(scenes["b"]), "--out", str(out), "--pipeline", str(DEMO), "--window", "128",
                 "--overlap", "32"]) == 2
    report = json.loads((out / "report.json").read_text())
    assert report["scene"][0].endswith("a/scene.tif")


def test_overwrite_recomputes_a_finished_identical_run(scenes, tmp_path):
    """``--overwrite`` says "Recompute and replace finished outputs": a folder holding this very
    run's complete outputs is made again, not skipped."""
    out = _copy_finished(scenes, tmp_path)
    stamp = (out / "landcover.tif").stat().st_mtime_ns
    logs = []
    run_scenes([str(scenes["a"])], out, _options(), overwrite=True, log=logs.append)
    assert not any("skipped" in m for m in logs), logs
    assert (out / "landcover.tif").stat().st_mtime_ns != stamp
    assert json.loads((out / "report.json").read_text())["complete"] is True


def test_a_modified_scene_or_model_is_not_skipped(scenes, tmp_path):
    scene = tmp_path / "scene.tif"
    shutil.copy2(scenes["a"], scene)
    model = tmp_path / "landcover_head"
    shutil.copytree(REPO / "data_samples" / "model" / "landcover_head", model)
    out = _copy_finished(scenes, tmp_path)
    opts = _options(landcover_head=str(model))
    report = json.loads((out / "report.json").read_text())
    report["fingerprint"]["models"]["landcover_head"] = \
        plan_scenes([str(scene)], out, opts)[0].fingerprint["models"]["landcover_head"]
    (out / "report.json").write_text(json.dumps(report))
    assert plan_scenes([str(scene)], out, opts)[0].skip  # a copy with the same content and time
    with open(model / "head.safetensors", "r+b") as f:  # retrained in place: same name, new weights
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    problem = plan_scenes([str(scene)], out, opts)[0].problem
    assert isinstance(problem, OutputExistsError) and "landcover_head" in str(problem) and "changed" in str(problem)
    os.utime(scene, ns=(time.time_ns(), time.time_ns()))
    assert "modified since" in str(plan_scenes([str(scene)], out, opts)[0].problem)


def test_options_are_validated_before_any_skip(scenes, tmp_path):
    out = _copy_finished(scenes, tmp_path)
    with pytest.raises(ConfigError, match="unknown sensor profile 'sentinel2'"):
        run_scenes([str(scenes["a"])], out, _options(profile="sentinel2"), log=_quiet)


def test_new_options_are_in_the_fingerprint_without_listing_them():
    from geodino.fingerprint import PERFORMANCE_ONLY, option_values

    @dataclasses.dataclass
    class Later(RunOptions):  # an option another change adds
        precision: str = "fp32"

    values = option_values(Later(embeddings=True))
    assert values["precision"] == "fp32" and values["window"] == 512
    assert not set(values) & PERFORMANCE_ONLY and "backbone" not in values


def test_same_file_names_get_unique_stable_folders(scenes, tmp_path):
    a, b = tmp_path / "x" / "scene.tif", tmp_path / "y" / "scene.tif"
    for src, dst in ((scenes["a"], a), (scenes["b"], b)):
        dst.parent.mkdir()
        shutil.copy2(src, dst)
    dirs = scene_out_dirs(tmp_path / "m", [str(a), str(b), str(scenes["a"])])
    assert [d.name for d in dirs] == ["scene_x", "scene_y", "scene_a"]
    assert scene_out_dirs(tmp_path / "m", [str(b), str(a)]) == [dirs[1], dirs[0]]  # order does not matter
    reports = run_scenes([str(a), str(b)], tmp_path / "m", _options(landcover_head=None), log=_quiet, quiet=True)
    assert len(reports) == 2
    for d, name in ((dirs[0], "x"), (dirs[1], "y")):
        assert json.loads((d / "report.json").read_text())["scene"] == [f"../../{name}/scene.tif"]


# -- nothing of the user's lost, nothing half-written left -------------------------------


def test_a_file_geodino_did_not_write_is_kept(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "canopy_height.tif").write_bytes(b"the user's own canopy model")
    with pytest.raises(OutputExistsError, match="geodino did not write"):
        run_scenes([str(scenes["a"])], out, _options(), log=_quiet)
    assert (out / "canopy_height.tif").read_bytes() == b"the user's own canopy model"
    assert sorted(p.name for p in out.iterdir()) == ["canopy_height.tif"]


def test_a_failure_after_rasters_are_in_place_leaves_nothing(scenes, tmp_path, monkeypatch):
    import geodino.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while polygons are made: the rasters are already renamed

    monkeypatch.setattr(geodino.pipeline, "polygonize", interrupted)
    out = tmp_path / "sub" / "out"
    with pytest.raises(KeyboardInterrupt):
        run_scenes([str(scenes["a"])], out, _options(), log=_quiet, quiet=True)
    assert not out.exists() and not out.parent.exists()  # the folders this run made go too
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        run_scenes([str(scenes["a"])], tmp_path / "keep", _options(), log=_quiet, quiet=True)
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["notes.txt"]


def test_an_unfinished_runs_files_are_ours_to_replace(scenes, tmp_path):
    out = _copy_finished(scenes, tmp_path)
    (out / "report.json").unlink()  # killed (SIGKILL) between renaming rasters and the report
    (out / RECORD).write_text(json.dumps({"outputs": ["canopy_height.tif", "landcover.tif", "landcover.gpkg",
                                                      "report.json"]}))
    plan, = plan_scenes([str(scenes["a"])], out, _options())
    assert plan.problem is None and not plan.skip
    assert set(plan.geodino_files) == {"canopy_height.tif", "landcover.tif", "landcover.gpkg"}
    (out / RECORD).unlink()  # without any record, the same files are a user's
    assert isinstance(plan_scenes([str(scenes["a"])], out, _options())[0].problem, OutputExistsError)


# -- batches ------------------------------------------------------------------------------


def _ungeoreferenced(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio's NotGeoreferencedWarning
        with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=3, dtype="uint8") as dst:
            dst.write(random_image(32, 32))
    return path


def test_every_scene_is_checked_before_work_starts(scenes, tmp_path):
    bad = _ungeoreferenced(tmp_path / "plain.tif")
    scene_list = [str(scenes["a"]), str(tmp_path / "missing.tif"), str(bad)]
    with pytest.raises(InputError) as e:
        run_scenes(scene_list, tmp_path / "m", _options(), log=_quiet)
    message = str(e.value)
    assert "2 of 3 scenes cannot run" in message and "missing.tif: file not found" in message
    assert "plain.tif: has no CRS" in message
    assert not (tmp_path / "m").exists()  # nothing was started
    with pytest.raises(InputError, match="band 7 does not exist"):
        run_scenes([str(scenes["a"]), str(scenes["b"])], tmp_path / "m", _options(bands=["7", "2", "1"]),
                   log=_quiet)


def test_keep_going_runs_the_rest_and_says_what_failed(scenes, tmp_path, monkeypatch):
    logs = []
    scene_list = [str(tmp_path / "missing.tif"), str(scenes["a"])]
    with pytest.raises(BatchError, match="1 of 2 scenes failed") as e:
        run_scenes(scene_list, tmp_path / "m", _options(), keep_going=True, log=logs.append, quiet=True)
    assert e.value.exit_code == 2
    assert (tmp_path / "m" / "scene" / "report.json").exists()
    table = logs[-1]
    assert "missing.tif  failed" in table and "done" in table and "1 done, 0 skipped, 1 failed" in table
    # a bug (not an input problem) in one scene: the batch still ends, with exit status 1
    import geodino.runner

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(geodino.runner, "build_run", broken)
    with pytest.raises(BatchError) as e:
        run_scenes([str(scenes["b"])], tmp_path / "n", _options(), keep_going=True, log=logs.append)
    assert e.value.exit_code == 1 and "a bug" in logs[-1]


# -- clear messages instead of tracebacks ---------------------------------------------------


def test_cli_bad_inputs_get_one_line_and_exit_2(scenes, tmp_path, capsys):
    a = str(scenes["a"])
    afile = tmp_path / "README.md"
    afile.write_text("not a folder")
    assert main(["run", a, "--out", str(afile), "--pipeline", str(DEMO)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    yaml = tmp_path / "p.yaml"
    yaml.write_text(DEMO.read_text().replace("scheduler: threads", "scheduler: thread")
                    .replace("../data_samples", str(REPO / "data_samples")))
    assert main(["run", a, "--out", str(tmp_path / "o"), "--pipeline", str(yaml)]) == 2
    assert "scheduler 'thread' is not threads, local or a scheduler address" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["run", a, "--out", str(tmp_path / "o"), "--pipeline", str(DEMO), "--device", "gpu"]) == 2
    assert "device 'gpu' is not one of cpu, cuda" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["run", a, "--out", str(tmp_path / "o"), "--pipeline", str(DEMO), "--device", "cuda"]) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_target_gsd_that_multiplies_the_pixels_is_refused(tmp_path, capsys):
    scene = write_raster(tmp_path / "coarse.tif", random_image(48, 40, 3, "uint8"),
                         transform=from_origin(500000.0, 4000000.0, 30.0, 30.0))
    args = ["run", str(scene), "--out", str(tmp_path / "o"), "--pipeline", str(DEMO), "--profile", "rgb8",
            "--window", "128", "--overlap", "32"]
    assert main(args + ["--target-gsd", "5"]) == 2
    err = capsys.readouterr().err
    assert "resamples 40 x 48 px (30 m) to 240 x 288 px, 36x the pixels" in err and "--force" in err
    assert not (tmp_path / "o").exists()
    assert main(args + ["--target-gsd", "5", "--force"]) == 0
    with rasterio.open(tmp_path / "o" / "landcover.tif") as src:
        assert (src.width, src.height) == (240, 288)


def test_warping_shows_progress(tmp_path, capsys):
    from geodino.scene import open_scene

    scene = write_raster(tmp_path / "s.tif", random_image(64, 64, 3, "uint8"),
                         transform=from_origin(500000.0, 4000000.0, 10.0, 10.0))
    opened = open_scene(scene, target_gsd=0.25)
    capsys.readouterr()
    opened.read_overview(256)
    import re

    assert re.search(r"s: warping for statistics: (\d+)/\1 block rows \(100%\)", capsys.readouterr().err)

# -- reports and tags -----------------------------------------------------------------------


def test_report_and_tags_hold_no_absolute_paths_and_say_what_was_used(tmp_path, monkeypatch):
    scene = realdata("RGB.byte.tif")
    monkeypatch.chdir(REPO)
    opts = load_pipeline("pipelines/demo.yaml")
    assert opts.backbone == "data_samples/model/backbone"  # as typed, not expanded
    opts.profile, opts.min_polygon_area = "rgb8", 1e5
    out = tmp_path / "rgb"
    report, = run_scenes([str(scene)], out, opts, log=_quiet, quiet=True)
    recorded = json.loads((out / "report.json").read_text())
    with rasterio.open(out / "landcover.tif") as src:
        tags = src.tags()
    assert not [s for s in _strings(recorded) + list(tags.values()) if s.startswith(("/", "~"))]
    assert tags["backbone"] == recorded["models"]["backbone"] == \
        os.path.relpath(REPO / "data_samples/model/backbone", out)
    assert recorded["scene"] == [os.path.relpath(scene, out)]
    # RGB.byte.tif: 791 x 718 px of ~300 m, 67% valid inside a rotated footprint
    assert report["footprint_area_km2"] == pytest.approx(51128, rel=2e-3)
    assert report["valid_area_km2"] == pytest.approx(34489, rel=2e-3)
    assert report["bands_used"] == {"indexes": [1, 2, 3], "names": ["band 1", "band 2", "band 3"]}
    assert report["sensor_profile"] == "rgb8" and report["demo_model"] is True
    assert report["min_polygon_area_m2"] == 1e5
    assert report["fingerprint"]["options"]["window"] == 512


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []
