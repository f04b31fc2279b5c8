"""Trustworthy runs (issue 13): never stale results, honest exit codes, nothing of the user's lost.

Each test here failed on the code before this change (see the closing note of issue 13).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
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


# -- exit codes and signals -----------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", "from geodino.cli import entry; entry()", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory):
    from geodino.synth import SynthConfig, generate

    return generate(tmp_path_factory.mktemp("big"), SynthConfig(width=768, height=512, seed=6)).scene


def test_sigint_and_sigterm_exit_130_and_143_leaving_nothing(big_scene, tmp_path):
    import signal

    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        out.mkdir()
        (out / "mine.txt").write_text("a user's file")
        runs[sig] = (out, _cli("run", str(big_scene), "--out", str(out), "--pipeline", str(DEMO),
                               "--window", "128", "--overlap", "32"))
    deadline = time.monotonic() + 240
    pending = dict(runs)
    while pending and time.monotonic() < deadline:
        for sig, (out, proc) in list(pending.items()):
            # computing: blocks stream into partial files beside the final paths
            if list(out.glob(".*.partial-*")):
                time.sleep(0.3)
                proc.send_signal(sig)
                del pending[sig]
            assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    assert not pending, "the runs never started computing"
    for sig, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("interrupted (SIGINT)" if sig == signal.SIGINT else "terminated (SIGTERM)")
        assert "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_a_damaged_tile_mid_scene_names_the_window(tmp_path, capsys):
    from rasterio.enums import Resampling

    # 2048 x 256 px with overviews: the statistics read the overview, so the damaged full-resolution
    # tile is met only while windows are computed, after other windows were done
    path = write_raster(tmp_path / "damaged.tif", (random_image(256, 2048, 3, "uint16", seed=2) // 4),
                        compress="deflate")
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4], Resampling.average)
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_5_0", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_5_0", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--pipeline", str(DEMO), "--window", "256",
                 "--overlap", "32", "--profile", "reflectance"]) == 2
    err = capsys.readouterr().err
    assert "damaged.tif: cannot read the pixels of window col" in err and "may be damaged" in err
    assert not out.exists()


# -- no side effects on import --------------------------------------------------------------


def test_importing_geodino_changes_nothing_outside_it():
    code = ("import json, os\n"
            "from rasterio.env import get_gdal_config\n"
            "before, cache = dict(os.environ), get_gdal_config('GDAL_CACHEMAX')\n"
            "import geodino, geodino.cli, geodino.runner, geodino.pipeline\n"
            "print(json.dumps({'env_changed': sorted(set(os.environ.items()) ^ set(before.items())),"
            " 'cache': get_gdal_config('GDAL_CACHEMAX') == cache}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GDAL_CACHEMAX", "MALLOC_ARENA_MAX")}
    env["PYTHONPATH"] = str(REPO)
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                       check=True).stdout.strip().splitlines()[-1])
    assert result == {"env_changed": [], "cache": True}


def test_runs_apply_the_gdal_cache_and_restore_it(scenes, tmp_path, monkeypatch):
    from rasterio.env import get_gdal_config

    import geodino.runner

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    seen = []
    real = geodino.runner.write_scene

    def spy(*args, **kwargs):
        seen.append(get_gdal_config("GDAL_CACHEMAX"))
        return real(*args, **kwargs)

    monkeypatch.setattr(geodino.runner, "write_scene", spy)
    before = get_gdal_config("GDAL_CACHEMAX")
    run_scenes([str(scenes["a"])], tmp_path / "o", _options(polygons=False), log=_quiet, quiet=True)
    assert seen and int(seen[0]) in (16, 16 * 2**20)
    assert get_gdal_config("GDAL_CACHEMAX") == before


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


# -- honest metrics -------------------------------------------------------------------------


def test_evaluate_refuses_disjoint_tiny_and_mismatched_rasters(tmp_path, capsys):
    from geodino.metrics import evaluate_rasters

    heights = np.random.default_rng(0).random((64, 64), dtype=np.float32) * 30
    pred = write_raster(tmp_path / "pred.tif", heights, nodata=float("nan"))
    far = write_raster(tmp_path / "far.tif", heights, nodata=float("nan"),
                       transform=from_origin(600000.0, 4000000.0, 10.0, 10.0))
    corner = write_raster(tmp_path / "corner.tif", heights, nodata=float("nan"),
                          transform=from_origin(500000.0 + 59 * 10, 4000000.0 - 59 * 10, 10.0, 10.0))
    assert main(["evaluate", str(pred), str(far), "--task", "canopy"]) == 2
    assert "do not overlap" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"overlap on 25 prediction pixels, 0.0025 km².*fewer than 100"):
        evaluate_rasters(pred, corner, "canopy")
    classes = write_raster(tmp_path / "classes.tif", (heights // 10 + 1).astype(np.uint8), nodata=0)
    with rasterio.open(classes, "r+") as dst:
        dst.write_colormap(1, {1: (0, 100, 0, 255), 2: (250, 0, 0, 255), 3: (0, 0, 200, 255)})
    with pytest.raises(InputError, match="class raster .* not heights"):
        evaluate_rasters(classes, pred, "canopy")
    with pytest.raises(InputError, match="float32 values \\(heights\\?\\), not class codes"):
        evaluate_rasters(pred, classes, "landcover")
    assert evaluate_rasters(pred, pred, "canopy")["mae"] == 0.0


def test_fit_names_training_and_validation_metrics_and_warns_without_validation(tmp_path, tiny_models):
    from geodino.synth import SynthConfig, generate
    from geodino.train import FitConfig, NoValidationWarning, fit

    s = generate(tmp_path / "s", SynthConfig(width=128, height=128, seed=2))
    cfg = FitConfig(task="landcover", scene=str(s.scene), labels=str(s.landcover), backbone=tiny_models["backbone"],
                    out=str(tmp_path / "head"), window=64, epochs=1, val_fraction=0.0, profile="reflectance")
    with pytest.warns(NoValidationWarning, match="NO VALIDATION DATA"):
        result = fit(cfg, progress=False)
    assert result.val_windows == 0 and result.metrics is None
    assert result.training_metrics["pixels"] == 128 * 128
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["metrics"]["validation"] is None and meta["metrics"]["training"]["pixels"] == 128 * 128


def test_polygon_class_names_are_taken_from_their_text_column(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from geodino.scene import open_scene
    from geodino.train import Labels

    scene = open_scene(write_raster(tmp_path / "s.tif", random_image(32, 32, 3, "uint8")))
    polys = gpd.GeoDataFrame({"id": [1, 2], "class": ["forest", "water"]},
                             geometry=[box(500000, 3999840, 500160, 4000000), box(500160, 3999680, 500320, 3999840)],
                             crs="EPSG:32633")
    polys.to_file(tmp_path / "p.gpkg")
    labels = Labels(str(tmp_path / "p.gpkg"), scene, "landcover")
    assert labels.classes.codes == [1, 2] and labels.classes.names == ["forest", "water"]


def test_real_polygons_name_their_classes_without_being_told_the_column(tmp_path):
    from geodino.scene import open_scene
    from geodino.train import Labels

    scene = open_scene(realdata("LE70220492002106EDC00_stack.gtif"))
    with pytest.warns(UserWarning, match="several names"):  # the file has two mislabelled polygons
        labels = Labels(str(realdata("training_polygons/training_data.shp")), scene, "landcover")
    assert labels.column == "id"
    assert labels.classes.names == ["forest", "water", "herbaceous", "barren", "urban"]
