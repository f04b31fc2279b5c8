from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

import geodino
from geodino.cli import main
from geodino.errors import ConfigError
from geodino.pipeline import RunOptions, load_pipeline, run_scenes
from tests.conftest import REPO, realdata

MODEL = REPO / "data_samples" / "model"
SAMPLE = REPO / "data_samples" / "scene" / "scene.tif"


def _demo_options(**kw) -> RunOptions:
    opts = load_pipeline(REPO / "pipelines" / "demo.yaml")
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


def test_demo_from_the_readme(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    for name in ("canopy_height.tif", "landcover.tif"):
        assert cog_validate(str(out / name))[0]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["windows"] == 4 and report["footprint_area_km2"] == pytest.approx(0.212, abs=0.001)
    assert set(report["landcover_area_km2"]) == {"Tree cover", "Shrubland", "Grassland", "Cropland", "Built-up",
                                                 "Bare / sparse vegetation", "Permanent water bodies"}
    assert 0 < report["canopy_height_m"]["max"] <= 80
    import geopandas as gpd

    polys = gpd.read_file(out / "landcover.gpkg")
    assert len(polys) > 0 and polys["area_m2"].min() >= 10.0
    assert (out / "quicklook.png").read_bytes()[:4] == b"\x89PNG"
    assert printed["quicklook"].endswith("quicklook.png")
    # the demo model is better than nothing on its own sample: land cover against ground truth
    m = json.loads((MODEL / "quality.json").read_text())
    assert m["landcover"]["model"]["overall_accuracy"] > m["landcover"]["baseline_majority_class"]["overall_accuracy"]
    assert m["canopy"]["model"]["rmse"] < m["canopy"]["baseline_training_mean"]["rmse"]


def test_pipeline_config_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: x\nwindwo: 512\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) windwo"):
        load_pipeline(bad)
    bad.write_text("backbone: x\nembeddings: true\nwindow: large\n")
    with pytest.raises(ConfigError, match="window must be int"):
        load_pipeline(bad)
    bad.write_text("backbone: x\nembeddings: true\noverlap: 608\n")
    with pytest.raises(ConfigError, match="overlap 608 must be smaller"):
        load_pipeline(bad)
    bad.write_text("backbone: x\n")
    with pytest.raises(ConfigError, match="nothing to compute"):
        load_pipeline(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_pipeline(bad)
    opts = load_pipeline(REPO / "pipelines" / "demo.yaml")
    assert opts.backbone == str(MODEL / "backbone")  # relative to the YAML file
    for name in ("canopy_landcover.yaml", "chmv2_canopy.yaml"):
        assert load_pipeline(REPO / "pipelines" / name).window == 512


def test_cli_run_with_pipeline_and_bad_key(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("backbone: x\nbatchsize: 4\n")
    assert main(["run", str(SAMPLE), "--out", str(tmp_path / "o"), "--pipeline", str(bad)]) == 2
    assert "unknown key(s) batchsize" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none*.tif"), "--out", str(tmp_path / "o"), "--pipeline",
                 str(REPO / "pipelines" / "demo.yaml")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_python_api_is_lazy_and_crs_aware():
    ds = geodino.run_scene(SAMPLE, backbone=str(MODEL / "backbone"), landcover_head=str(MODEL / "landcover_head"))
    assert ds["landcover"].chunks is not None  # nothing computed yet
    with rasterio.open(SAMPLE) as src:
        assert ds.rio.crs == src.crs
        lc = ds["landcover"].values
        np.testing.assert_array_equal(lc == 0, src.dataset_mask() == 0)


def test_class_map_is_the_argmax_of_the_blended_logits_whatever_the_chunks():
    """The codes made with the interpolation (geodino.upsample) are those of the float logits
    (as the map was made before: argmax of the upsampled block), for several chunkings, with
    the probabilities output still made from those logits."""
    import dask

    from geodino.pipeline import build_run
    from geodino.stitch import stitch

    maps = []
    for chunks, batch in ((128, 2), (300, 3), (2048, 8)):
        opts = _demo_options(canopy_head=None, window=128, overlap=32, chunks=chunks, batch_size=batch,
                             probabilities=True)
        run = build_run(str(SAMPLE), opts)
        logits = stitch(run.scene, run.normalisation, run.tiles, run.bundle, run.bundle.outputs(), overlap=32,
                        batch_size=batch, chunks=chunks)["landcover"]
        with dask.config.set(scheduler="threads"):
            lc, probs, logits = dask.compute(run.dataset["landcover"].data, run.dataset["landcover_probability"].data,
                                             logits.data)
        best, top = np.zeros(lc.shape, np.uint8), logits[0].copy()
        for k in range(1, len(logits)):  # the argmax as geodino.pipeline took it before
            best[logits[k] > top] = k
            np.maximum(top, logits[k], out=top)
        ref = np.asarray(run.classes.codes, np.uint8)[best]
        ref[np.isnan(top)] = run.classes.nodata
        np.testing.assert_array_equal(lc, ref, err_msg=str(chunks))
        np.testing.assert_array_equal(np.isnan(probs[0]), lc == run.classes.nodata)
        maps.append(lc)
    assert len(np.unique(maps[0])) > 2
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(maps[0], maps[2])


@pytest.mark.parametrize("name, extra", [
    ("RGB.byte.tif", dict(profile="rgb8")),
    ("OSBS_029.tif", dict(profile="rgb8")),
    ("LE70220492002106EDC00_stack.gtif",
     dict(profile="reflectance", bands=["band 3 reflectance", "band 2 reflectance", "band 1 reflectance"])),
])
def test_run_on_real_rasters(tmp_path, name, extra):
    path = realdata(name)
    reports = run_scenes([str(path)], tmp_path, _demo_options(window=256, **extra), log=lambda m: None)
    with rasterio.open(path) as src:
        valid = src.dataset_mask() > 0
        grid = (src.crs, src.transform, src.shape)
    for out in ("canopy_height.tif", "landcover.tif"):
        with rasterio.open(tmp_path / out) as d:
            assert (d.crs, d.transform, d.shape) == grid
            data = d.read(1)
        invalid = np.isnan(data) if out.startswith("canopy") else data == 0
        np.testing.assert_array_equal(invalid, ~valid)
    assert reports[0]["complete"]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory):
    from geodino.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("two")
    a = generate(root / "a", SynthConfig(width=300, height=280, seed=8))
    b = generate(root / "b", SynthConfig(width=260, height=320, seed=25, nodata_collar=True))
    (root / "a.tif").symlink_to(a.scene)
    (root / "b.tif").symlink_to(b.scene)
    return [str(root / "a.tif"), str(root / "b.tif")]


def test_local_cluster_gives_the_same_bytes(two_scenes, tmp_path):
    one = tmp_path / "one_by_one"
    for scene in two_scenes:
        run_scenes([scene], one / scene.split("/")[-1][:-4], _demo_options(window=128, overlap=32), log=print)
    cluster = tmp_path / "cluster"
    run_scenes(two_scenes, cluster, _demo_options(window=128, overlap=32, scheduler="local", workers=2), log=print)
    for stem in ("a", "b"):
        for name in ("canopy_height.tif", "landcover.tif"):
            assert _digest(one / stem / name) == _digest(cluster / stem / name), (stem, name)


def test_killed_run_resumes_without_redoing_finished_scenes(two_scenes, tmp_path, monkeypatch):
    import geodino.runner as pipeline  # the runner calls write_scene

    real = pipeline.write_scene
    calls = []

    def dies_on_second(run, out, **kw):
        calls.append(str(out))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(run, out, **kw)

    monkeypatch.setattr(pipeline, "write_scene", dies_on_second)
    opts = _demo_options(window=128, overlap=32)
    with pytest.raises(KeyboardInterrupt):
        run_scenes(two_scenes, tmp_path, opts, log=print)
    assert (tmp_path / "a" / "report.json").exists() and not (tmp_path / "b" / "report.json").exists()
    stamp = (tmp_path / "a" / "canopy_height.tif").stat().st_mtime_ns
    (tmp_path / "b").mkdir(exist_ok=True)
    (tmp_path / "b" / "my_own_notes.tif").write_text("a user's file in the output folder stays")
    monkeypatch.setattr(pipeline, "write_scene", real)
    logs = []
    reports = run_scenes(two_scenes, tmp_path, opts, log=logs.append)
    assert any("a.tif: outputs complete" in m and "skipped" in m for m in logs)
    assert (tmp_path / "a" / "canopy_height.tif").stat().st_mtime_ns == stamp
    assert (tmp_path / "b" / "report.json").exists() and len(reports) == 2
    assert (tmp_path / "b" / "my_own_notes.tif").exists()
    # a damaged output is noticed and its scene redone
    (tmp_path / "b" / "landcover.tif").write_bytes(b"truncated")
    logs.clear()
    run_scenes(two_scenes, tmp_path, opts, log=logs.append)
    assert any("b.tif" in m and "windows" in m for m in logs)
    assert cog_validate(str(tmp_path / "b" / "landcover.tif"))[0]


def test_demo_model_is_small_and_documented():
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size < 5_000_000
    text = (REPO / "data_samples" / "README.md").read_text()
    assert "not DINOv3 weights" in text
    assert shutil.which("geodino") or True


_RUN_RSS = """
import json, resource, sys
from geodino.pipeline import RunOptions, build_run, write_scene
from geodino.synth import SynthConfig, generate
n, root, backbone, head = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
scene = generate(root + "/scene", SynthConfig(width=n, height=n, seed=1)).scene
opts = RunOptions(backbone=backbone, landcover_head=head, profile="reflectance", window=256, overlap=32,
                  chunks=512, polygons=False)
write_scene(build_run(str(scene), opts), root + "/out", quiet=True)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


@pytest.mark.slow
def test_pipeline_memory_does_not_grow_with_scene_area(tmp_path):
    """DESIGN invariant 6 on the whole pipeline: 6x the area, about the same peak RSS."""
    import subprocess
    import sys

    rss = {}
    for n in (1024, 2560):
        out = subprocess.run([sys.executable, "-c", _RUN_RSS, str(n), str(tmp_path / str(n)),
                              str(MODEL / "backbone"), str(MODEL / "landcover_head")],
                             check=True, capture_output=True, text=True)
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert rss[2560] < 1.3 * rss[1024], rss


def test_chmv2_canopy_model_through_the_pipeline(tmp_path):
    """Meta's canopy model class (transformers CHMv2ForDepthEstimation), tiny and random."""
    from geodino.backbone import save_tiny_chmv2

    chm = save_tiny_chmv2(tmp_path / "chmv2")
    opts = _demo_options(canopy_head=None, landcover_head=None, canopy_model=str(chm), window=256, overlap=32,
                         polygons=False)
    reports = run_scenes([str(SAMPLE)], tmp_path / "out", opts, log=lambda m: None)
    with rasterio.open(tmp_path / "out" / "canopy_height.tif") as d, rasterio.open(SAMPLE) as src:
        chm_m = d.read(1)
        valid = src.dataset_mask() > 0
        assert d.tags()["canopy_head"] == "../chmv2" and d.units == ("m",)  # relative to the output folder
        # CHMv2's own input normalisation and its precision are recorded with the map
        assert json.loads(d.tags()["canopy_model_normalisation"])["mean"] == [0.42, 0.411, 0.296]
        assert d.tags()["canopy_model_precision"] == "float32"
    np.testing.assert_array_equal(np.isnan(chm_m), ~valid)
    assert (chm_m[valid] >= 0).all() and chm_m[valid].std() > 0
    assert reports[0]["models"]["canopy_model"] == "../chmv2"


def test_cli_run_resampled_to_a_target_gsd(tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["run", str(SAMPLE), "--out", str(out), "--pipeline", str(REPO / "pipelines" / "demo.yaml"),
                 "--target-gsd", "1.2", "--no-polygons", "--chunks", "256"]) == 0
    assert "windows/s" in capsys.readouterr().out
    with rasterio.open(out / "landcover.tif") as d, rasterio.open(SAMPLE) as src:
        assert d.res == (1.2, 1.2) and d.crs == src.crs
        # the grid is snapped outwards onto multiples of 1.2 m: at most one extra row or column
        assert abs(d.width * 1.2 - src.width * 0.6) < 1.21 and abs(d.height * 1.2 - src.height * 0.6) < 1.21
        assert (d.read(1) > 0).mean() > 0.5
    report = json.loads((out / "report.json").read_text())
    assert "landcover_polygons" not in report["outputs"] and report["width"] == 384


def test_demo_with_another_backbone_and_canopy_model(tmp_path, capsys):
    """The README's way to run the sample with real weights, here with tiny random stand-ins."""
    from geodino.backbone import save_tiny_backbone, save_tiny_chmv2

    backbone = save_tiny_backbone(tmp_path / "dinov3-vitl16-pretrain-sat493m", hidden_size=64, heads=2)
    chm = save_tiny_chmv2(tmp_path / "chmv2")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--backbone", str(backbone), "--canopy-model", str(chm)]) == 0
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    assert set(outputs) == {"canopy_height", "embeddings", "canopy_height_style", "quicklook"}
    with rasterio.open(out / "embeddings.tif") as d:
        assert d.count == 64 and d.tags()["backbone"] == f"../{backbone.name}"  # relative to the output folder
    assert (out / "quicklook.png").exists()


def test_quicklook_and_polygons_run_side_by_side_and_land_together(tmp_path, monkeypatch):
    """The quicklook is drawn from the finished COGs at their temporary paths while the
    polygons are traced; if the polygons fail, no COG, polygon file or quicklook is in place."""
    import threading

    import geodino.pipeline as pipeline
    import geodino.quicklook

    from geodino.pipeline import build_run, write_scene

    drawn, tracing = [], threading.Event()
    real_quicklook, real_polygons = geodino.quicklook.quicklook, pipeline._polygons

    def spy_quicklook(out_dir, png, **kw):
        assert tracing.wait(30)  # the polygons are being traced meanwhile
        drawn.append(sorted(p.name for p in kw["files"].values()))
        return real_quicklook(out_dir, png, **kw)

    def slow_polygons(cog, **kw):
        tracing.set()
        return real_polygons(cog, **kw)

    monkeypatch.setattr(geodino.quicklook, "quicklook", spy_quicklook)
    monkeypatch.setattr(pipeline, "_polygons", slow_polygons)
    opts = _demo_options(window=128, overlap=32)
    write_scene(build_run(str(SAMPLE), opts), tmp_path / "ok", quiet=True)
    assert len(drawn) == 1 and all(".partial-" in name for name in drawn[0])
    assert (tmp_path / "ok" / "quicklook.png").read_bytes()[:4] == b"\x89PNG"

    def failing_polygons(cog, **kw):
        raise RuntimeError("disk full while tracing")

    monkeypatch.setattr(pipeline, "_polygons", failing_polygons)
    monkeypatch.setattr(geodino.quicklook, "quicklook", real_quicklook)
    with pytest.raises(RuntimeError, match="disk full"):
        write_scene(build_run(str(SAMPLE), opts), tmp_path / "failed", quiet=True)
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == []


def test_local_cluster_workers_keep_glibcs_adaptive_mmap_threshold():
    """distributed spawns workers with MALLOC_TRIM_THRESHOLD_=65536, which in glibc also fixes
    the mmap threshold: every window-sized array is mmapped and faulted in again, and the
    worker spent ~1.7x the threaded run's CPU on blending and class codes. Workers a run starts
    itself get neither that nor more than one malloc arena."""
    import os

    from geodino.pipeline import _scheduler

    def seen():
        import dask

        return dict(os.environ), dask.config.get("distributed.worker.profile.enabled")

    with _scheduler(_demo_options(scheduler="local", processes=1, workers=1)) as client:
        environ, profiling = next(iter(client.run(seen).values()))
    assert "MALLOC_TRIM_THRESHOLD_" not in environ
    assert profiling is False  # no dashboard shows it; sampling every thread each 10 ms costs CPU
    assert environ["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert environ["MALLOC_ARENA_MAX"] == os.environ.get("MALLOC_ARENA_MAX", "1")


def test_worker_environ_keeps_what_the_user_chose(monkeypatch):
    import dask

    from geodino.runtime import worker_environ

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    key = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({key: {"MALLOC_TRIM_THRESHOLD_": 65536, "OMP_NUM_THREADS": 1}}):
        assert worker_environ()[key] == {"OMP_NUM_THREADS": 1, "MALLOC_ARENA_MAX": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with dask.config.set({key: {"MALLOC_TRIM_THRESHOLD_": 1 << 20}}):  # the user's own threshold
        assert worker_environ()[key] == {"MALLOC_TRIM_THRESHOLD_": 1 << 20, "MALLOC_ARENA_MAX": "1",
                                         "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with dask.config.set({key: {"MALLOC_TRIM_THRESHOLD_": 65536}}):
        assert worker_environ()[key] == {"MALLOC_TRIM_THRESHOLD_": 65536}
