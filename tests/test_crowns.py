"""Individual trees from canopy height (geodino.crowns): accuracy on synthetic truth, block
invariance, real lidar, pixel sizes, CRSs, bad input, and the `run --crowns` hook."""

from __future__ import annotations

import json
import math

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.transform import from_origin

from geodino.errors import ConfigError, GeodinoError, InputError
from geodino.synth import SynthConfig, crown_table, render_block, render_canopy
from geodino.trees import CrownParams, crowns
from geodino.trees.match import score_trees
from tests.conftest import realdata
from tests.helpers import write_raster


def _write_canopy(path, canopy, cfg: SynthConfig, res=None, crs=None, transform=None):
    res = res or cfg.gsd
    transform = transform or from_origin(cfg.origin_x, cfg.origin_y, res, res)
    return write_raster(path, canopy.astype(np.float32), crs=crs or cfg.crs, transform=transform, nodata=float("nan"))


def _trees(out):
    tops = pyogrio.read_dataframe(out / "trees.gpkg", layer="treetops").sort_values("id").reset_index(drop=True)
    polys = pyogrio.read_dataframe(out / "trees.gpkg", layer="crowns").sort_values("id").reset_index(drop=True)
    with rasterio.open(out / "crowns.tif") as src:
        ids = src.read(1)
    return tops, polys, ids


@pytest.fixture(scope="module")
def truth_scene(tmp_path_factory):
    """The truth canopy raster of a 1024 x 1024 synthetic scene and its crown table."""
    cfg = SynthConfig(width=1024, height=1024, seed=0)
    path = _write_canopy(tmp_path_factory.mktemp("truth") / "canopy_height.tif",
                         render_canopy(cfg, 0, 0, 1024, 1024), cfg)
    return cfg, path, crown_table(cfg)


def test_canopy_only_render_and_crown_table_match_the_generator():
    cfg = SynthConfig(width=300, height=260, seed=3, nodata_collar=True)
    full = render_block(cfg, 0, 0, 260, 300)[2]
    assert np.array_equal(render_canopy(cfg, 0, 0, 260, 300), full, equal_nan=True)
    table = crown_table(cfg)
    vis = table["apex_visible"]
    assert vis.sum() > 100 and (~vis).any()  # some crowns are hidden under taller ones or the collar
    r, c = np.floor(table["row"][vis]).astype(int), np.floor(table["col"][vis]).astype(int)
    # the dome's apex is at the centre: the pixel holding it is within a few cm of the height
    assert np.all(np.abs(full[r, c] - table["height_m"][vis]) < 0.1 * table["height_m"][vis])
    assert np.all(table["visible_area_m2"] <= table["area_m2"] * 1.25 + 1.0)
    assert np.all((table["row"] >= 0) & (table["row"] < 260) & (table["col"] >= 0) & (table["col"] < 300))


def test_trees_match_the_synthetic_truth(truth_scene, tmp_path):
    _, path, truth = truth_scene
    result = crowns(path, tmp_path / "out", progress=False)
    tops, polys, _ = _trees(tmp_path / "out")
    assert result.trees == len(tops) == len(polys) > 1000
    det = np.c_[tops.geometry.x, tops.geometry.y]
    vis = truth["apex_visible"]
    visible = score_trees(det, np.c_[truth["x"], truth["y"]][vis], max_distance=1.5, det_height=tops.height_m,
                          ref_height=truth["height_m"][vis], det_area=tops.crown_area_m2,
                          ref_area=truth["visible_area_m2"][vis])
    assert visible["f1"] >= 0.9, visible
    assert visible["height_abs_error_median_m"] <= 0.5, visible
    assert visible["crown_area_rel_error_median"] < 0.2, visible
    # against every crown the generator drew, hidden ones included, and its full disk area
    every = score_trees(det, np.c_[truth["x"], truth["y"]], det_area=tops.crown_area_m2, ref_area=truth["area_m2"])
    assert every["f1"] >= 0.9, every
    assert every["crown_area_rel_error_median"] < 0.25, every


def test_outputs_agree_and_are_cogs(truth_scene, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    _, path, _ = truth_scene
    crowns(path, tmp_path, progress=False)
    tops, polys, ids = _trees(tmp_path)
    assert cog_validate(str(tmp_path / "crowns.tif"))[0]
    with rasterio.open(tmp_path / "crowns.tif") as src, rasterio.open(path) as chm:
        assert src.dtypes[0] == "uint32" and src.nodata == 0 and src.overviews(1)
        assert src.transform == chm.transform and src.crs == chm.crs
        assert src.descriptions[0] == "tree crown id"
        heights = chm.read(1)
    n = len(tops)
    assert np.array_equal(tops.id.to_numpy(), np.arange(1, n + 1)) and np.array_equal(polys.id, tops.id)
    # the id raster, the polygons and the attribute table describe the same crowns
    px = np.bincount(ids.ravel(), minlength=n + 1)[1:]
    np.testing.assert_allclose(px * 0.36, tops.crown_area_m2, atol=1e-3)
    np.testing.assert_allclose(polys.area, tops.crown_area_m2, atol=1e-3)
    np.testing.assert_allclose(tops.crown_diameter_m, 2 * np.sqrt(tops.crown_area_m2 / math.pi), atol=1e-3)
    assert polys.geometry.is_valid.all() and (polys.geom_type == "Polygon").all()
    assert polys.geometry.contains(tops.geometry).all()  # each top lies in its own crown
    # crowns never reach below min_height nor below half their top's height
    top_h = np.concatenate([[0], tops.height_m])
    crown_px = ids > 0
    assert np.all(heights[crown_px] >= 2.0)
    assert np.all(heights[crown_px] >= 0.5 * top_h[ids[crown_px]] - 1e-3)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["trees"] == n
    area_ha = np.isfinite(heights).sum() * 0.36 / 1e4
    assert report["density_per_ha"] == pytest.approx(n / area_ha, rel=1e-3)
    assert report["height_m"]["p50"] == pytest.approx(np.median(tops.height_m), abs=0.1)
    assert sum(report["height_histogram"]["trees"]) == n


def _assert_same_trees(a, b):
    tops_a, polys_a, ids_a = a
    tops_b, polys_b, ids_b = b
    assert np.array_equal(ids_a, ids_b)
    assert tops_a.drop(columns="geometry").equals(tops_b.drop(columns="geometry"))
    assert tops_a.geometry.equals(tops_b.geometry)
    assert polys_a.geometry.to_wkb().equals(polys_b.geometry.to_wkb())  # same coordinates, to the bit


def test_result_does_not_depend_on_block_size(tmp_path):
    """Three block sizes, smoothing on (the largest halos), trees near every block border."""
    cfg = SynthConfig(width=700, height=520, seed=4, gsd=0.4)
    path = _write_canopy(tmp_path / "chm.tif", render_canopy(cfg, 0, 0, 520, 700), cfg)
    results = []
    for block in (128, 208, 1024):
        crowns(path, tmp_path / str(block), block=block, smoothing_m=0.3, progress=False)
        results.append(_trees(tmp_path / str(block)))
    assert len(results[0][0]) > 300
    for other in results[1:]:
        _assert_same_trees(results[0], other)
    # no tree is counted twice: tops are distinct pixels, and each crown is one polygon
    tops = results[0][0]
    assert not tops.geometry.to_wkb().duplicated().any()


def test_real_lidar_heights_are_local_maxima_and_crowns_stay_inside(tmp_path):
    path = realdata("hag.tif")
    with rasterio.open(path) as src:
        heights = src.read(1)
        valid = heights != src.nodata
        bounds, transform = src.bounds, src.transform
    for name, options in (("plain", {}), ("smoothed", {"smoothing_m": 2.0}), ("blocks", {"block": 64})):
        out = tmp_path / name
        crowns(path, out, progress=False, **options)
        tops, polys, ids = _trees(out)
        assert len(tops) > 500, name
        rows, cols = rasterio.transform.rowcol(transform, tops.geometry.x, tops.geometry.y)
        rows, cols = np.asarray(rows), np.asarray(cols)
        np.testing.assert_allclose(tops.height_m, heights[rows, cols], atol=1e-3)
        padded = np.pad(np.where(valid, heights, -np.inf), 1, constant_values=-np.inf)
        neighbours = np.max([padded[rows + 1 + dy, cols + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                             if dy or dx], axis=0)
        assert np.all(tops.height_m >= neighbours - 1e-3), name  # each height is a local maximum
        assert np.all(tops.height_m >= 2.0)
        assert not (ids[~valid] > 0).any(), name  # no crown over nodata
        total = polys.geometry.union_all().bounds
        assert (total[0] >= bounds.left and total[1] >= bounds.bottom and total[2] <= bounds.right
                and total[3] <= bounds.top), name
    plain = _trees(tmp_path / "plain")
    _assert_same_trees(plain, _trees(tmp_path / "blocks"))
    assert len(_trees(tmp_path / "smoothed")[0]) < len(plain[0])  # smoothing merges noisy tops


def test_half_metre_and_one_metre_versions_give_the_same_trees(tmp_path):
    cfg = SynthConfig(width=512, height=512, seed=4, gsd=0.5)
    fine = render_canopy(cfg, 0, 0, 512, 512)
    coarse = fine.reshape(256, 2, 256, 2).mean(axis=(1, 3))  # what a 1 m sensor sees: the area mean
    found = {}
    for name, canopy, res in (("fine", fine, 0.5), ("coarse", coarse, 1.0)):
        path = _write_canopy(tmp_path / f"{name}.tif", canopy, cfg, res=res)
        crowns(path, tmp_path / name, progress=False)
        found[name] = _trees(tmp_path / name)[0]
    a, b = found["fine"], found["coarse"]
    assert len(a) > 300
    s = score_trees(np.c_[b.geometry.x, b.geometry.y], np.c_[a.geometry.x, a.geometry.y], det_height=b.height_m,
                    ref_height=a.height_m, det_area=b.crown_area_m2, ref_area=a.crown_area_m2)
    assert s["f1"] >= 0.9, s
    assert s["height_abs_error_median_m"] <= 0.5, s
    assert s["crown_area_rel_error_median"] <= 0.2, s


def test_tenth_of_a_metre_pixels_find_the_trees_of_the_same_canopy_at_0_6_m(tmp_path):
    """The finest pixel size the issue names: the canopy upsampled 6x (bilinear) to 0.1 m."""
    from scipy import ndimage

    cfg = SynthConfig(width=192, height=192, seed=3, gsd=0.6)
    canopy = render_canopy(cfg, 0, 0, 192, 192)
    found = {}
    for name, data, res in (("coarse", canopy, 0.6), ("fine", ndimage.zoom(canopy, 6, order=1), 0.1)):
        path = _write_canopy(tmp_path / f"{name}.tif", data, cfg, res=res)
        crowns(path, tmp_path / name, progress=False)
        found[name] = _trees(tmp_path / name)[0]
    a, b = found["coarse"], found["fine"]
    assert len(a) > 100
    s = score_trees(np.c_[b.geometry.x, b.geometry.y], np.c_[a.geometry.x, a.geometry.y], det_height=b.height_m,
                    ref_height=a.height_m, det_area=b.crown_area_m2, ref_area=a.crown_area_m2)
    assert s["f1"] >= 0.9 and s["height_abs_error_median_m"] <= 0.1 and s["crown_area_rel_error_median"] <= 0.1, s


def test_geographic_and_foot_crs_use_metres(tmp_path):
    """The same canopy on a UTM grid, in degrees and in US feet: the same trees and areas in m²."""
    cfg = SynthConfig(width=256, height=256, seed=3, gsd=0.6, crs="EPSG:32633", origin_x=500000.0,
                      origin_y=5000000.0)
    canopy = render_canopy(cfg, 0, 0, 256, 256)
    utm = _write_canopy(tmp_path / "utm.tif", canopy, cfg)
    deg = 0.6 / 111_320.0  # about 0.6 m in latitude near 45 N
    geo = _write_canopy(tmp_path / "geo.tif", canopy, cfg, crs="EPSG:4326",
                        transform=rasterio.transform.from_origin(15.0, 45.15, deg / math.cos(math.radians(45.15)), deg))
    feet = _write_canopy(tmp_path / "feet.tif", canopy, cfg, crs="EPSG:2263",
                         transform=rasterio.transform.from_origin(1e6, 2e5, 0.6 / 0.3048006096, 0.6 / 0.3048006096))
    results = {}
    for name, path in (("utm", utm), ("geo", geo), ("feet", feet)):
        crowns(path, tmp_path / name, progress=False)
        report = json.loads((tmp_path / name / "report.json").read_text())
        results[name] = (_trees(tmp_path / name)[0], report)
    base, base_report = results["utm"]
    for name in ("geo", "feet"):
        tops, report = results[name]
        assert len(tops) == len(base), name
        np.testing.assert_allclose(tops.crown_area_m2, base.crown_area_m2, rtol=0.02)
        assert report["pixel_size_m"] == pytest.approx([0.6, 0.6], rel=0.02)
        assert report["density_per_ha"] == pytest.approx(base_report["density_per_ha"], rel=0.03)


def test_nodata_flat_tops_and_an_empty_raster(tmp_path):
    chm = np.zeros((80, 90), np.float32)
    yy, xx = np.mgrid[0:80, 0:90]
    for cy, cx, h in ((20, 20, 12.0), (20, 60, 15.0), (60, 40, 9.0)):
        chm = np.maximum(chm, h * np.clip(1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / 64.0, 0, None))
    chm[20, 60:63] = 15.0  # a flat top three pixels wide: still one tree
    chm[50:, :] = -9999.0  # nodata hides the third tree
    path = write_raster(tmp_path / "chm.tif", chm, transform=from_origin(0, 100, 0.5, 0.5), nodata=-9999.0)
    crowns(path, tmp_path / "out", progress=False)
    tops, _, ids = _trees(tmp_path / "out")
    assert sorted(tops.height_m) == [12.0, 15.0]
    assert (ids[50:] == 0).all()
    flat = tops[tops.height_m == 15.0].geometry.iloc[0]
    assert flat.x == pytest.approx(30.25) and flat.y == pytest.approx(89.75)  # the first of the three

    empty = write_raster(tmp_path / "flat.tif", np.zeros((64, 64), np.float32), transform=from_origin(0, 64, 1, 1))
    result = crowns(empty, tmp_path / "empty", progress=False)
    assert result.trees == 0 and result.report["density_per_ha"] == 0
    assert {n for n, _ in pyogrio.list_layers(tmp_path / "empty" / "trees.gpkg")} == {"treetops", "crowns"}


def test_bad_input_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    from geodino.cli import main

    ok = write_raster(tmp_path / "ok.tif", np.full((64, 64), 5.0, np.float32), transform=from_origin(0, 64, 1, 1))
    cases = {
        "missing": (tmp_path / "nope.tif", {}),
        "band": (ok, {"band": 2}),
        "coarse": (write_raster(tmp_path / "coarse.tif", np.ones((8, 8), np.float32)), {}),  # 10 m pixels
        "no crs": (write_raster(tmp_path / "nocrs.tif", np.ones((8, 8), np.float32), crs=None,
                                transform=from_origin(0, 8, 1, 1)), {}),
        "rotated": (write_raster(tmp_path / "rot.tif", np.ones((8, 8), np.float32),
                                 transform=rasterio.Affine(1, 0.2, 0, 0.2, -1, 8)), {}),
        "not a raster": ((tmp_path / "text.tif"), {}),
    }
    (tmp_path / "text.tif").write_text("hello")
    for name, (path, kw) in cases.items():
        with pytest.raises(InputError):
            crowns(path, tmp_path / name, progress=False, **kw)
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir()), name
    for bad in ({"crown_fraction": 1.0}, {"min_height": -1}, {"window_min_m": 5, "window_max_m": 2}, {"block": 100}):
        with pytest.raises(ConfigError):
            CrownParams(**bad)
    assert main(["crowns", str(ok), "--out", str(tmp_path / "cli"), "--max-crown-radius", "0"]) == 2

    # an existing output is not replaced without --overwrite; a file geodino did not write stays
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "crowns.tif").write_text("a user's file")
    assert main(["crowns", str(ok), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "crowns.tif").read_text() == "a user's file"

    # a failure half way leaves no output and no partial file behind
    from geodino.trees import scene

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(scene, "segment_crowns", broken)
    with pytest.raises(RuntimeError):
        crowns(ok, tmp_path / "half", progress=False)
    assert list((tmp_path / "half").iterdir()) == []


def test_cli_crowns(tmp_path, truth_scene):
    from geodino.cli import main

    _, path, _ = truth_scene
    assert main(["crowns", str(path), "--out", str(tmp_path), "--min-height", "10", "--smooth", "0.3"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parameters"]["crowns_min_height"] == 10.0 and report["parameters"]["crowns_smoothing_m"] == 0.3
    tops = _trees(tmp_path)[0]
    assert len(tops) == report["trees"] > 100 and tops.height_m.min() >= 10.0


def test_cli_defaults_are_the_library_defaults():
    import inspect

    from geodino.cli import crowns_command

    names = {"min_height": "min_height", "smooth": "smoothing_m", "window_intercept": "window_intercept_m",
             "window_slope": "window_slope", "window_min": "window_min_m", "window_max": "window_max_m",
             "max_crown_radius": "max_crown_radius_m", "crown_fraction": "crown_fraction", "block": "block"}
    params = inspect.signature(crowns_command).parameters
    for cli_name, field in names.items():
        assert params[cli_name].default.default == getattr(CrownParams(), field), cli_name


def test_run_with_crowns(tmp_path, small_scene, tiny_models):
    from geodino.cli import main
    from geodino.options import RunOptions

    args = ["run", str(small_scene.scene), "--out", str(tmp_path), "--backbone", tiny_models["backbone"],
            "--canopy-head", tiny_models["canopy"], "--profile", "reflectance", "--window", "256",
            "--overlap", "32", "--no-polygons", "--crowns"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outputs"]["trees"] == "trees.gpkg" and report["outputs"]["crowns"] == "crowns.tif"
    tops = _trees(tmp_path)[0]
    assert report["trees"]["trees"] == len(tops)
    with rasterio.open(tmp_path / "canopy_height.tif") as b:
        heights = b.read(1)
        with rasterio.open(tmp_path / "crowns.tif") as a:
            assert a.transform == b.transform and a.shape == b.shape
    # the trees are those of the canopy raster the run wrote
    alone = crowns(tmp_path / "canopy_height.tif", tmp_path / "alone", progress=False)
    assert alone.trees == len(tops) and report["trees"].get("height_m") == alone.report.get("height_m")
    assert report["trees"]["valid_area_ha"] == pytest.approx(np.isfinite(heights).sum() * 0.36 / 1e4, rel=1e-3)
    with pytest.raises(ConfigError, match="canopy"):
        RunOptions(backbone=tiny_models["backbone"], landcover_head=tiny_models["landcover"], crowns=True).validate()

    # a tree output that is in the way is refused before the scene is computed, and kept
    from geodino.errors import OutputExistsError
    from geodino.pipeline import build_run, write_scene

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "trees.gpkg").write_text("a user's file")
    opts = RunOptions(backbone=tiny_models["backbone"], canopy_head=tiny_models["canopy"], profile="reflectance",
                      window=256, overlap=32, crowns=True, polygons=False)
    with pytest.raises(OutputExistsError):
        write_scene(build_run(str(small_scene.scene), opts), tmp_path / "busy", quiet=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["trees.gpkg"]
    assert (tmp_path / "busy" / "trees.gpkg").read_text() == "a user's file"


def test_crowns_is_a_public_function():
    import geodino

    assert callable(geodino.crowns) and geodino.crowns is crowns
    assert issubclass(InputError, GeodinoError)


def test_trees_notebook_is_stored_executed_small_and_clean():
    """notebooks/trees.ipynb runs in tests/test_pipeline.py::test_notebooks_run with the others;
    here: it is kept with its outputs (pictures of tops and crowns), small, with no warnings."""
    import nbformat

    from tests.conftest import REPO

    path = REPO / "notebooks" / "trees.ipynb"
    assert path.stat().st_size < 1_000_000
    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "Warning" not in text and '"f1"' in text
