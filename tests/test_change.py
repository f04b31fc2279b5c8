"""Change between dates: invariants (DESIGN 1, 2, 5), outputs, co-registration check, bad input, quality."""

from __future__ import annotations

import json
import shutil
import warnings

import dask
import numpy as np
import pytest
import rasterio
from affine import Affine
from rio_cogeo.cogeo import cog_validate

from geodino.cli import main
from geodino.errors import GeodinoError, InputError, OutputExistsError

from .conftest import REPO

DEMO = REPO / "pipelines" / "demo.yaml"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 320 x 288 synthetic pair (clear-cut, growth, new lot, other sun) with truth."""
    from geodino.synth import SynthConfig
    from geodino.synth_change import generate_pair

    return generate_pair(tmp_path_factory.mktemp("pair"), SynthConfig(width=320, height=288, seed=4))


def _options(models, **kw):
    from geodino.options import RunOptions

    base = {"backbone": models["backbone"], "canopy_head": models["canopy"], "landcover_head": models["landcover"],
                "window": 128, "overlap": 32, "batch_size": 4, "chunks": 128, "profile": "reflectance", "polygons": True}
    base.update(kw)
    return RunOptions(**base)


def _build(scenes, options, **kw):
    from geodino.change_run import build_change

    return build_change([str(s) for s in scenes], options, **kw)


def _copy(src, dst):
    shutil.copy(src, dst)
    return dst


@pytest.fixture
def windows_inferred(monkeypatch):
    """Counts the windows that go through the model (all dates, all outputs)."""
    from geodino.predict import ModelBundle

    seen = []
    call = ModelBundle.__call__

    def counting(self, inputs):
        seen.append(len(inputs))
        return call(self, inputs)

    monkeypatch.setattr(ModelBundle, "__call__", counting)
    return seen


# --------------------------------------------------------------------------------------
# invariants


def test_same_scene_twice_is_exactly_no_change(pair, tiny_models, tmp_path, windows_inferred):
    from geodino.change_write import write_change

    again = _copy(pair.before.scene, tmp_path / "again.tif")  # another file: inferred on its own
    run = _build([pair.before.scene, again], _options(tiny_models))
    assert run.coregistration[0].magnitude == 0.0 and not run.warnings
    report = write_change(run, tmp_path / "out", quiet=True)
    # every output of both dates computed in one pass: each window through the model once per date
    assert sum(windows_inferred) == 2 * len(run.runs[0].tiles) == report["windows"]
    with rasterio.open(tmp_path / "out" / "canopy_change.tif") as src:
        dh = src.read(1)
    valid = np.isfinite(dh)
    assert valid.mean() > 0.99 and np.all(dh[valid] == 0.0)
    with rasterio.open(tmp_path / "out" / "embedding_change.tif") as src:
        e = src.read(1)
    assert np.all(e[np.isfinite(e)] == 0.0) and np.isfinite(e).mean() > 0.99
    n = len(run.runs[0].classes)
    m = np.asarray(json.loads((tmp_path / "out" / "transitions.json").read_text())["steps"][0]["matrix"])
    assert m.shape == (n, n) and m.trace() > 0 and np.all(m[~np.eye(n, dtype=bool)] == 0)
    step = report["steps"][0]
    assert step["canopy"]["loss_area_m2"] == 0 and step["canopy"]["gain_area_m2"] == 0
    assert step["landcover"]["changed_area_km2"] == 0
    import geopandas as gpd

    assert len(gpd.read_file(tmp_path / "out" / "change.gpkg")) == 0


def test_swapping_dates_negates_change_and_transposes_matrix(pair, tiny_models):
    forward = _build([pair.before.scene, pair.after.scene], _options(tiny_models)).dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dates are now out of order, which is warned about
        backward = _build([pair.after.scene, pair.before.scene], _options(tiny_models)).dataset
    f = forward.compute()
    b = backward.compute()
    dh_f, dh_b = f.canopy_change.values[0], b.canopy_change.values[0]
    assert np.isfinite(dh_f).mean() > 0.9 and np.abs(dh_f[np.isfinite(dh_f)]).max() > 1e-3  # random heads: small
    np.testing.assert_array_equal(dh_b, -dh_f)
    np.testing.assert_array_equal(np.isnan(dh_b), np.isnan(dh_f))
    n = len(f.landcover_transition.attrs["transition_codes"]) ** 0.5
    n = round(n)
    to_matrix = lambda codes: np.bincount(codes[codes > 0].ravel(), minlength=n * n + 1)[1:].reshape(n, n)
    mf, mb = to_matrix(f.landcover_transition.values[0]), to_matrix(b.landcover_transition.values[0])
    assert (mf - np.diag(np.diag(mf))).sum() > 0  # there is change to transpose
    np.testing.assert_array_equal(mb, mf.T)
    np.testing.assert_array_equal(b.embedding_change.values, f.embedding_change.values)
    assert list(b.date_from.values) == ["2024-06-20"] and list(f.date_from.values) == ["2021-06-14"]


def test_chunk_batch_scheduler_invariance(pair, tiny_models):
    a = _build([pair.before.scene, pair.after.scene], _options(tiny_models, chunks=96, batch_size=2)).dataset
    b = _build([pair.before.scene, pair.after.scene], _options(tiny_models, chunks=256, batch_size=5)).dataset
    with dask.config.set(scheduler="threads", num_workers=3):
        ca = a[["canopy_change", "landcover_transition", "embedding_change"]].compute()
    with dask.config.set(scheduler="sync"):
        cb = b[["canopy_change", "landcover_transition", "embedding_change"]].compute()
    assert a.canopy_change.data.chunks != b.canopy_change.data.chunks
    np.testing.assert_allclose(ca.canopy_change.values, cb.canopy_change.values, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(ca.landcover_transition.values, cb.landcover_transition.values)
    np.testing.assert_allclose(ca.embedding_change.values, cb.embedding_change.values, atol=1e-5, equal_nan=True)


def test_second_date_on_another_crs_and_resolution_lands_on_the_first_grid(pair, tiny_models, tmp_path):
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    other = tmp_path / "after_3857.tif"
    with rasterio.open(pair.after.scene) as src:
        transform, w, h = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height, *src.bounds,
                                                      resolution=1.0)
        profile = src.profile | {"crs": "EPSG:3857", "transform": transform, "width": w, "height": h, "nodata": 0}
        with rasterio.open(other, "w", **profile) as dst:
            dst.update_tags(**src.tags())
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.bilinear, dst_nodata=0)
    run = _build([pair.before.scene, other], _options(tiny_models))
    with rasterio.open(pair.before.scene) as src:
        first = (src.crs, src.transform, src.width, src.height)
    grid = run.runs[1].scene.grid
    assert (grid.crs, grid.transform, grid.width, grid.height) == first and run.runs[1].scene.warped
    assert run.coregistration[0].magnitude < 1.0  # a reprojection is not a mis-registration
    from geodino.change_write import write_change

    write_change(run, tmp_path / "out", quiet=True, polygons=False)
    with rasterio.open(tmp_path / "out" / "canopy_change.tif") as src:
        assert (src.crs, src.transform, src.width, src.height) == first
        assert np.isfinite(src.read(1)).mean() > 0.9
    with rasterio.open(tmp_path / "out" / "embedding_change.tif") as src:
        assert src.transform == first[1] * Affine.scale(16) and (src.width, src.height) == (20, 18)


def test_nodata_where_either_date_is_invalid(pair, tiny_models, tmp_path):
    def masked(src_path, dst_path, rows, cols):
        with rasterio.open(src_path) as src:
            data, profile, tags = src.read(), src.profile | {"nodata": 0}, src.tags()
        data[:, rows, cols] = 0
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(data)
            dst.update_tags(**tags)
        return dst_path

    a = masked(pair.before.scene, tmp_path / "a.tif", slice(None), slice(0, 70))  # left strip invalid
    b = masked(pair.after.scene, tmp_path / "b.tif", slice(0, 50), slice(None))  # top strip invalid
    ds = _build([a, b], _options(tiny_models)).dataset.compute()
    invalid = np.zeros((288, 320), bool)
    invalid[:, :70] = True
    invalid[:50, :] = True
    dh, codes = ds.canopy_change.values[0], ds.landcover_transition.values[0]
    np.testing.assert_array_equal(np.isnan(dh), invalid)
    np.testing.assert_array_equal(codes == 0, invalid)
    # each date's own map is valid where that date is
    assert np.isfinite(ds.canopy_height.values[1][60:, :60]).all()
    e = ds.embedding_change.values[0]
    assert np.isnan(e[:, :4]).all() and np.isnan(e[:3, :]).all() and np.isfinite(e[4:, 5:]).all()


# --------------------------------------------------------------------------------------
# co-registration, dates


def test_misregistered_pair_is_warned_about(pair, tiny_models, tmp_path, capsys):
    from geodino.change_run import ChangeWarning

    shifted = _copy(pair.after.scene, tmp_path / "shifted.tif")
    with rasterio.open(shifted, "r+") as dst:  # content 2 rows up and 3 columns right of where it belongs
        dst.transform = dst.transform * Affine.translation(3, -2)
    with pytest.warns(ChangeWarning, match="not co-registered"):
        run = _build([pair.before.scene, shifted], _options(tiny_models))
    c = run.coregistration[0]
    assert abs(c.dy + 2) < 0.3 and abs(c.dx - 3) < 0.3 and not c.ok
    code = main(["change", str(pair.before.scene), str(shifted), "--out", str(tmp_path / "out"),
                 "--backbone", tiny_models["backbone"], "--canopy-head", tiny_models["canopy"],
                 "--window", "128", "--overlap", "32", "--profile", "reflectance", "--no-polygons"])
    assert code == 0
    assert "not co-registered" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    shift = report["coregistration"][0]["shift_px"]
    assert report["coregistration"][0]["ok"] is False and abs(shift[0] + 2) < 0.3 and abs(shift[1] - 3) < 0.3
    assert any("not co-registered" in w for w in report["warnings"])
    with rasterio.open(tmp_path / "out" / "canopy_change.tif") as src:
        assert json.loads(src.tags()["coregistration_shift_px"]) == [shift]


def test_dates_from_option_tags_name_and_order(pair, tmp_path):
    from geodino.dates import parse_date, scene_dates

    plain = tmp_path / "S2A_MSIL2A_20230715T101031_N0509_R022.tif"
    with rasterio.open(pair.before.scene) as src:
        profile = src.profile
    with rasterio.open(plain, "w", **profile):
        pass
    unnamed = _copy(plain, tmp_path / "scene.tif")
    got = scene_dates([str(pair.before.scene), str(plain), str(unnamed)])
    assert [d.label for d in got] == ["2021-06-14", "2023-07-15", "date 3"]
    assert [d.source for d in got] == ["tag TIFFTAG_DATETIME", "file name", "scene order"]
    assert [d.label for d in scene_dates(["a", "b"], ["2020-01-02", "2021-03-04"])] == ["2020-01-02", "2021-03-04"]
    assert parse_date("LC08_L2SP_2020_13_45") is None and str(parse_date("x_2019_02_28_y")) == "2019-02-28"
    with pytest.raises(InputError, match="one per scene"):
        scene_dates(["a", "b"], ["2020-01-02"])
    with pytest.raises(InputError, match="not an ISO date"):
        scene_dates(["a", "b"], ["2020-01-02", "last year"])


# --------------------------------------------------------------------------------------
# the command line, outputs and bad input


@pytest.fixture(scope="module")
def cli_out(pair, tmp_path_factory):
    """`geodino change` of the pair with the demo model, written once for the tests below."""
    out = tmp_path_factory.mktemp("cli") / "out"
    code = main(["change", str(pair.before.scene), str(pair.after.scene), "--out", str(out), "--pipeline", str(DEMO),
                 "--window", "128", "--overlap", "32", "--min-area", "20"])
    assert code == 0
    return out


def test_cli_writes_every_output_described(pair, cli_out):
    out = cli_out
    for name in ("canopy_change.tif", "landcover_transition.tif", "embedding_change.tif"):
        assert cog_validate(str(out / name))[0], name
    with rasterio.open(out / "canopy_change.tif") as src:
        assert src.descriptions == ("canopy change 2021-06-14 -> 2024-06-20",) and src.units == ("m",)
        assert src.overviews(1) == [] or src.overviews(1)[0] == 2
        assert src.tags()["dates"] == "2021-06-14,2024-06-20" and "backbone" in src.tags()
    with rasterio.open(out / "landcover_transition.tif") as src:
        names = src.tags(1)["CATEGORY_NAMES"].split(";")
        assert "Tree cover -> Bare / sparse vegetation" in names and src.colormap(1)[0][3] == 0
        codes = src.read(1)
    with rasterio.open(pair.truth_change) as src:
        truth = src.read(1)
    from geodino.synth_change import CLEARCUT

    tree_to_open = {names.index(n) for n in ("Tree cover -> Grassland", "Tree cover -> Bare / sparse vegetation")}
    assert np.isin(codes[truth == CLEARCUT], list(tree_to_open)).mean() > 0.5
    csv_rows = (out / "transitions.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,date_from,date_to,from \\ to (km2),Tree cover") and len(csv_rows) == 8
    import geopandas as gpd

    gdf = gpd.read_file(out / "change.gpkg")
    assert {"type", "transition", "area_m2", "mean_height_change_m", "max_height_change_m", "date_from",
            "date_to"} <= set(gdf.columns)
    loss = gdf[gdf["type"] == "canopy loss"]
    assert len(loss) and (loss["area_m2"] >= 20).all() and (loss["max_height_change_m"] <= -5).all()
    assert (loss["mean_height_change_m"] <= -5).all() and set(loss["date_to"]) == {"2024-06-20"}
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["date_sources"] == ["tag TIFFTAG_DATETIME"] * 2
    assert report["steps"][0]["canopy"]["loss_area_m2"] > 0 and report["coregistration"][0]["ok"]
    # polygon areas agree with the pixels they came from
    assert abs(report["steps"][0]["polygons"]["canopy loss"]["area_m2"]
               - report["steps"][0]["canopy"]["loss_area_m2"]) <= report["steps"][0]["canopy"]["loss_area_m2"] * 0.2
    # a second run refuses to replace outputs without --overwrite, and leaves them alone
    stamp = (out / "canopy_change.tif").stat().st_mtime_ns
    assert main(["change", str(pair.before.scene), str(pair.after.scene), "--out", str(out), "--pipeline",
                 str(DEMO)]) == OutputExistsError.exit_code
    assert (out / "canopy_change.tif").stat().st_mtime_ns == stamp


def test_polygons_do_not_depend_on_strip_height(pair, cli_out, monkeypatch):
    import geodino.change_vectors as cv
    from geodino.classes import WORLDCOVER

    steps = [cv.Step(1, "2021-06-14", "2024-06-20")]
    kw = {"canopy": cli_out / "canopy_change.tif", "canopy_classes": cli_out / "canopy_change_class.tif",
          "transitions": cli_out / "landcover_transition.tif",
          "classes": WORLDCOVER}
    whole = cv.change_polygons(steps, **kw)
    monkeypatch.setattr(cv, "STRIP_ROWS", 37)  # regions cut by many strip borders are merged back
    strips = cv.change_polygons(steps, **kw)
    assert len(whole) > 10 and len(strips) == len(whole)
    key = ["type", "transition", "pixels", "cx", "cy"]

    def ordered(gdf):
        gdf = gdf.assign(cx=gdf.centroid.x.round(3), cy=gdf.centroid.y.round(3))
        return gdf.sort_values(key).reset_index(drop=True)

    # regions below --min-area are dropped as they are traced (unless cut by a strip border):
    # the same polygons as filtering at the end, whatever the strips
    for rows in (37, 512):
        monkeypatch.setattr(cv, "STRIP_ROWS", rows)
        kept = cv.change_polygons(steps, **kw, min_area=20.0)
        assert len(kept) == (whole["area_m2"] >= 20.0).sum() and (kept["area_m2"] >= 20.0).all()
    monkeypatch.setattr(cv, "STRIP_ROWS", 512)
    assert cv._strip_rows(320) == 512 and cv._strip_rows(8192) == 128 and cv._strip_rows(10**6) == 64
    a, b = ordered(whole), ordered(strips)
    for col in ("type", "transition", "pixels"):
        assert list(a[col]) == list(b[col])
    np.testing.assert_allclose(a["area_m2"], b["area_m2"], rtol=1e-9)
    for col in ("mean_height_change_m", "min_height_change_m", "max_height_change_m"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-4)
    assert (a["area_m2"] / 0.36).round().astype(int).tolist() == a["pixels"].tolist()


def test_tables_are_the_rasters_counted(pair, cli_out, monkeypatch):
    """The summaries and the transition matrix come out of the polygons' pass over strips and
    rows of tiles, on worker threads: the same figures as the whole rasters counted at once."""
    import geodino.change_vectors as cv
    from geodino.change_maps import GAIN, LOSS
    from geodino.classes import WORLDCOVER

    with rasterio.open(cli_out / "canopy_change.tif") as a, rasterio.open(cli_out / "canopy_change_class.tif") as b, \
            rasterio.open(cli_out / "landcover_transition.tif") as c:
        dh, code, pairs = a.read(1).astype(np.float64), b.read(1), c.read(1)
    n = len(WORLDCOVER)
    kw = {"canopy": cli_out / "canopy_change.tif", "canopy_classes": cli_out / "canopy_change_class.tif",
          "transitions": cli_out / "landcover_transition.tif", "classes": WORLDCOVER}
    monkeypatch.setattr(cv, "STRIP_ROWS", 37)
    for polygons, workers in ((True, 3), (False, 1)):
        (table,), gdf = cv.change_tables([cv.Step(1, "a", "b")], **kw, polygons=polygons, workers=workers)
        assert (gdf is not None) == polygons
        np.testing.assert_array_equal(table.transitions[1:].reshape(n, n),
                                      np.bincount(pairs.ravel(), minlength=n * n + 1)[1:].reshape(n, n))
        s = table.canopy_summary()
        valid = np.isfinite(dh) & (code > 0)
        assert s["valid_pixels"] == valid.sum() and s["loss_pixels"] == (code == LOSS).sum() > 0
        assert s["gain_pixels"] == (code == GAIN).sum()
        assert s["mean_change_m"] == pytest.approx(dh[valid].mean(), rel=1e-9)
        assert s["mean_loss_m"] == pytest.approx(dh[code == LOSS].mean(), rel=1e-9)


def test_series_has_a_band_per_step_and_first_to_last(pair, tiny_models, tmp_path, windows_inferred):
    from geodino.change_write import write_change

    run = _build([pair.before.scene, pair.after.scene, pair.before.scene], _options(tiny_models),
                 dates=["2020-01-01", "2021-01-01", "2022-01-01"])
    write_change(run, tmp_path / "out", quiet=True, polygons=False)
    assert sum(windows_inferred) == 2 * len(run.runs[0].tiles)  # the scene given twice is inferred once
    with rasterio.open(tmp_path / "out" / "canopy_change.tif") as src:
        assert src.count == 3 and src.descriptions[2] == "canopy change 2020-01-01 -> 2022-01-01"
        dh = src.read()
    np.testing.assert_allclose(dh[0] + dh[1], dh[2], atol=1e-4, equal_nan=True)
    assert np.all(dh[2][np.isfinite(dh[2])] == 0)  # back to the same scene
    steps = json.loads((tmp_path / "out" / "transitions.json").read_text())["steps"]
    assert [s["step"] for s in steps][-1] == "2020-01-01 -> 2022-01-01"
    assert np.allclose(np.asarray(steps[0]["matrix"]), np.asarray(steps[1]["matrix"]).T)


@pytest.mark.parametrize("args, message", [
    (["{before}"], "at least two scenes"),
    (["{before}", "{after}", "--dates", "2020-01-01"], "one per scene"),
    (["{before}", "{far}"], "does not overlap"),
    (["{before}", "{after}", "--grid", "{geographic}"], "projected CRS"),
    (["{before}", "{after}", "--gap-height", "-1"], "--gap-height must be"),
    (["{before}", "{after}", "--min-height-change", "0"], "--min-height-change must be"),
])
def test_bad_input_is_a_clear_error(pair, tmp_path, capsys, args, message):
    from tests.helpers import random_image, write_raster

    far = write_raster(tmp_path / "far.tif", random_image(64, 64, 4, "uint16"), crs="EPSG:32737",
                       transform=Affine(0.6, 0, 100000.0, 0, -0.6, 9000000.0))
    geographic = write_raster(tmp_path / "geo.tif", random_image(16, 16, 1), crs="EPSG:4326",
                              transform=Affine(1e-5, 0, 39.0, 0, -1e-5, -2.0))
    values = {"before": pair.before.scene, "after": pair.after.scene, "far": far, "geographic": geographic}
    argv = ["change", *[a.format(**values) for a in args], "--out", str(tmp_path / "out"), "--pipeline", str(DEMO)]
    assert main(argv) == GeodinoError.exit_code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_common_grid_from_target_gsd_or_a_grid_file(pair, tiny_models, tmp_path):
    from tests.helpers import write_raster

    run = _build([pair.before.scene, pair.after.scene], _options(tiny_models, target_gsd=1.2))
    grids = [r.scene.grid for r in run.runs]
    assert grids[0] == grids[1] and grids[0].res == (1.2, 1.2) and grids[0].width == 160  # edges on 1.2 m multiples
    # --grid: another extent and pixel size, e.g. a reference map's
    target = write_raster(tmp_path / "grid.tif", np.zeros((1, 100, 90), np.uint8), crs="EPSG:32737",
                          transform=Affine(0.9, 0, 300030.0, 0, -0.9, 9699970.0))
    with warnings.catch_warnings():  # too small to verify the co-registration: tested below
        warnings.simplefilter("ignore")
        run = _build([pair.before.scene, pair.after.scene], _options(tiny_models), grid=target)
    for r in run.runs:
        assert (r.scene.grid.transform, r.scene.grid.width, r.scene.grid.height) == (
            Affine(0.9, 0, 300030.0, 0, -0.9, 9699970.0), 90, 100)
    assert run.dataset.canopy_change.shape == (1, 100, 90)


def test_coregistration_on_small_resampled_grids_raises_no_false_alarm(pair, tiny_models, tmp_path):
    """A co-registered pair resampled to a small grid is not called mis-registered (it was: 3.2 px
    at --target-gsd 1.2, 14.4 px on a 90 x 100 --grid), while a real shift there still is."""
    from geodino.change_run import ChangeWarning
    from tests.helpers import write_raster

    with warnings.catch_warnings():
        warnings.simplefilter("error", ChangeWarning)
        run = _build([pair.before.scene, pair.after.scene], _options(tiny_models, target_gsd=1.2))
    c = run.coregistration[0]
    assert c.verified and c.ok and c.magnitude < 0.5 and c.windows >= 3 and not run.warnings
    shifted = _copy(pair.after.scene, tmp_path / "shifted.tif")
    with rasterio.open(shifted, "r+") as dst:  # 2 rows up, 3 columns right at 0.6 m: -1, +1.5 px at 1.2 m
        dst.transform = dst.transform * Affine.translation(3, -2)
    with pytest.warns(ChangeWarning, match="not co-registered"):
        run = _build([pair.before.scene, shifted], _options(tiny_models, target_gsd=1.2))
    c = run.coregistration[0]
    assert c.verified and not c.ok and abs(c.dy + 1) < 0.3 and abs(c.dx - 1.5) < 0.3
    # 90 x 100 pixels, much of it the clear-cut: too little to tell; said so, not called a shift
    target = write_raster(tmp_path / "grid.tif", np.zeros((1, 100, 90), np.uint8), crs="EPSG:32737",
                          transform=Affine(0.9, 0, 300030.0, 0, -0.9, 9699970.0))
    with pytest.warns(ChangeWarning, match="could not be verified"):
        run = _build([pair.before.scene, pair.after.scene], _options(tiny_models), grid=target)
    assert not any("not co-registered" in w for w in run.warnings)
    assert run.coregistration[0].to_dict()["ok"] is None and not run.coregistration[0].verified


def test_python_api_is_lazy_and_crs_aware(pair, tiny_models):
    import geodino

    ds = geodino.change([pair.before.scene, pair.after.scene], backbone=tiny_models["backbone"], window=128,
                        overlap=32, profile="reflectance")
    assert set(ds.data_vars) == {"embedding_change"}  # no heads: the label-free signal only
    assert isinstance(ds.embedding_change.data, dask.array.Array)
    assert ds.rio.crs.to_epsg() == 32737 and ds.attrs["dates"] == ["2021-06-14", "2024-06-20"]
    e = ds.embedding_change.compute().values[0]
    assert np.nanmax(e) > 5 * np.nanmedian(e)  # the changed places stand out


def test_embeddings_only_change_is_written(pair, tiny_models, tmp_path):
    from geodino.change_write import write_change

    run = _build([pair.before.scene, pair.after.scene], _options(tiny_models, canopy_head=None, landcover_head=None))
    report = write_change(run, tmp_path / "out", quiet=True)
    assert report["outputs"] == {"embedding_change": "embedding_change.tif"}
    assert report["steps"][0]["embedding_change"]["valid_patches"] > 0 and "canopy" not in report["steps"][0]


# --------------------------------------------------------------------------------------
# what counts as canopy loss; radiometry between dates


def test_canopy_change_classes_loss_partial_gain_nodata():
    from geodino.change_maps import GAIN, LOSS, NO_CHANGE, PARTIAL_LOSS, canopy_change_classes

    before = np.array([[20.0, 20.0, 20.0, 3.0, 10.0, np.nan, 20.0, 6.0]], np.float32)
    after = np.array([[0.5, 1.99, 2.0, 9.0, 6.0, 1.0, np.nan, 0.0]], np.float32)
    heights = [dask.array.from_array(h, chunks=(1, 4)) for h in (before, after)]
    codes = canopy_change_classes(heights, [(0, 1)], 5.0, 2.0).compute()[0, 0]
    # fell to a gap / to 1.99 m: loss; to 2.0 m: a canopy left; +6 m: gain; -4 m: no change; NaN: nodata;
    # 6 -> 0 m: loss (a fall of exactly 6 m to the ground)
    assert codes.tolist() == [LOSS, LOSS, PARTIAL_LOSS, GAIN, NO_CHANGE, 0, 0, LOSS]
    swapped = canopy_change_classes(heights[::-1], [(0, 1)], 5.0, 2.0).compute()[0, 0]
    assert swapped.tolist()[:4] == [GAIN, GAIN, GAIN, PARTIAL_LOSS]  # regrowth from a gap is gain
    assert canopy_change_classes(heights, [(0, 1)], 5.0, 0.0).compute()[0, 0, 0] == PARTIAL_LOSS  # gap 0: none
    # with each date's land cover: loss also needs the later date to have left tree cover
    from geodino.classes import WORLDCOVER

    tree, grass = WORLDCOVER.codes[0], WORLDCOVER.codes[2]
    later = np.array([[grass, tree, grass, grass, grass, grass, grass, tree]], np.uint8)
    labels = [dask.array.from_array(np.full_like(later, tree), chunks=(1, 4)), dask.array.from_array(later, chunks=(1, 4))]
    with_cover = canopy_change_classes(heights, [(0, 1)], 5.0, 2.0, labels=labels, classes=WORLDCOVER).compute()[0, 0]
    assert with_cover.tolist() == [LOSS, PARTIAL_LOSS, PARTIAL_LOSS, GAIN, NO_CHANGE, 0, 0, PARTIAL_LOSS]
    from geodino.change_maps import check_thresholds

    for bad in ((0.0, 2.0), (5.0, -1.0), (float("nan"), 2.0)):
        with pytest.raises(GeodinoError):
            check_thresholds(*bad)


def test_clearcut_is_canopy_loss_and_trees_beside_it_are_not(pair, cli_out):
    """Canopy loss is the clear-cut, not the trees beside it that the model draws lower (the
    "any fall of 5 m" rule counted those, and the other sun's and radiometry's effect, as loss)."""
    from scipy.ndimage import binary_dilation

    from geodino.change_maps import CANOPY_CHANGE_CLASSES, LOSS, PARTIAL_LOSS
    from geodino.synth import TREE, landcover_at
    from geodino.synth_change import CLEARCUT, UNCHANGED

    with rasterio.open(cli_out / "canopy_change_class.tif") as src:
        assert cog_validate(str(cli_out / "canopy_change_class.tif"))[0]
        codes = src.read(1)
        names = src.tags(1)["CATEGORY_NAMES"].split(";")
        assert [names[c] for c in CANOPY_CHANGE_CLASSES.codes] == list(CANOPY_CHANGE_CLASSES.names)
        assert src.tags()["gap_height_m"] == "2.0" and src.colormap(1)[LOSS][:3] == (215, 25, 28)
    with rasterio.open(pair.truth_change) as src:
        truth = src.read(1)
    gy, gx = np.meshgrid(np.arange(truth.shape[0]) + 0.5, np.arange(truth.shape[1]) + 0.5, indexing="ij")
    cut = truth == CLEARCUT
    with rasterio.open(cli_out / "canopy_change.tif") as src:
        dh = src.read(1)
    forest = (truth == UNCHANGED) & (landcover_at(4, gy, gx) == TREE)
    beside = binary_dilation(cut, iterations=16) & ~cut & forest
    assert beside.sum() > 500 and (codes[cut] == LOSS).mean() > 0.85
    # 128-pixel windows on a small scene: of the unchanged forest 25% fell by 5 m (the old rule's
    # loss), 4% is canopy loss now; within 16 px of the cut 87% and 19%
    with np.errstate(invalid="ignore"):
        any_fall = dh <= -5
    assert (codes[forest] == LOSS).mean() < 0.3 * any_fall[forest].mean()
    assert (codes[beside] == LOSS).mean() < 0.4 * any_fall[beside].mean()
    assert (codes[beside] == PARTIAL_LOSS).mean() > 0.1
    report = json.loads((cli_out / "report.json").read_text())
    assert "to below 2 m and the later land cover is no longer Tree cover" in report["canopy_classes"]["canopy loss"]
    assert report["gap_height_m"] == 2.0
    canopy = report["steps"][0]["canopy"]
    assert canopy["partial_loss_area_m2"] > 0 and canopy["mean_loss_m"] <= -5
    import geopandas as gpd

    gdf = gpd.read_file(cli_out / "change.gpkg")
    assert {"canopy loss", "partial canopy loss"} <= set(gdf["type"])


def test_a_pure_radiometric_difference_is_not_canopy_change(pair, tmp_path):
    """The same ground with another gain and offset (sun, atmosphere) is matched back: the model
    sees nearly the same input and the change is nearly zero; without the match it is not."""
    from geodino.change_run import build_change
    from geodino.options import load_pipeline

    brighter = tmp_path / "brighter.tif"
    with rasterio.open(pair.before.scene) as src:
        data, profile, tags = src.read().astype(np.float64), src.profile, src.tags()
    gain, offset = np.array([1.05, 1.04, 1.06, 0.97]), np.array([20.0, 15.0, 25.0, -30.0])
    with rasterio.open(brighter, "w", **profile) as dst:
        dst.write(np.round(data * gain[:, None, None] + offset[:, None, None]).astype(profile["dtype"]))
        dst.update_tags(**tags)
    options = replace_options(load_pipeline(DEMO), window=128, overlap=32)
    matched = build_change([pair.before.scene, brighter], options, dates=["2020-01-01", "2021-01-01"])
    m = matched.radiometry[0]
    assert m.applied and np.allclose(m.gain, gain[[2, 1, 0]], atol=0.01) and np.allclose(m.offset, offset[[2, 1, 0]],
                                                                                           atol=4)
    raw = build_change([pair.before.scene, brighter], options, dates=["2020-01-01", "2021-01-01"],
                       radiometric_match=False)
    assert raw.radiometry == []
    dh_matched = np.abs(matched.dataset.canopy_change.values[0])
    dh_raw = np.abs(raw.dataset.canopy_change.values[0])
    # measured: mean |change| 0.40 m unmatched (up to 6.2 m: "loss" and "gain"), 0.0015 m matched
    assert np.nanmean(dh_raw) > 0.2 and np.nanmax(dh_raw) > 5.0
    assert np.nanmean(dh_matched) < 0.02 * np.nanmean(dh_raw) and np.nanmax(dh_matched) < 0.5
    from geodino.change_maps import NO_CHANGE
    from geodino.change_write import with_thresholds

    finer = with_thresholds(raw, 0.5, None)  # other thresholds: the classes are remade, the rest kept
    assert (finer.min_height_change, finer.gap_height) == (0.5, 2.0) and finer.runs is raw.runs
    changed = lambda r: int((r.dataset.canopy_change_class.values[0] > NO_CHANGE).sum())
    assert changed(finer) > changed(raw) and finer.dataset.canopy_change_class.attrs["min_height_change_m"] == 0.5
    with pytest.raises(GeodinoError, match="gap-height"):
        with_thresholds(raw, None, -1.0)
    with rasterio.open(pair.before.scene) as src:  # the first date's own normalisation moved to the mean radiometry
        assert matched.runs[0].normalisation.lo != (0.0, 0.0, 0.0) and src.count == 4


def test_radiometric_match_across_data_scales(pair, tiny_models, tmp_path):
    """A later date delivered as float reflectance (0-1) against a first one in reflectance x 10000
    is matched (its gain is judged in each date's own normalised units), not refused."""
    scaled = tmp_path / "float.tif"
    with rasterio.open(pair.after.scene) as src:
        data, profile, tags = src.read().astype(np.float32) / 10000, src.profile, src.tags()
    with rasterio.open(scaled, "w", **(profile | {"dtype": "float32", "predictor": 1})) as dst:
        dst.write(data)
        dst.update_tags(**tags)
    run = _build([pair.before.scene, scaled], _options(tiny_models, profile="auto", bands=[3, 2, 1]))
    m = run.radiometry[0]
    assert m.applied and not run.warnings and all(1.0e-4 < g < 1.1e-4 for g in m.gain)


def replace_options(options, **kw):
    from dataclasses import replace

    return replace(options, **kw)


# --------------------------------------------------------------------------------------
# the synthetic pair


def test_synthetic_pair_truth(pair):
    from geodino.synth import BARE, BUILT, GRASS, TREE
    from geodino.synth_change import CLEARCUT, GROWTH, NEW_BUILT, UNCHANGED

    read = lambda p: rasterio.open(p).read()
    truth, dh = read(pair.truth_change)[0], read(pair.truth_canopy_change)[0]
    hb, ha = read(pair.before.canopy_height)[0], read(pair.after.canopy_height)[0]
    lb, la = read(pair.before.landcover)[0], read(pair.after.landcover)[0]
    ib, ia = read(pair.before.scene).astype(int), read(pair.after.scene).astype(int)
    for code in (UNCHANGED, CLEARCUT, GROWTH, NEW_BUILT):
        assert (truth == code).sum() > 100, code
    np.testing.assert_array_equal(dh, ha - hb)
    cut = truth == CLEARCUT
    assert np.all(np.isin(la[cut], (GRASS, BARE, TREE))) and (la[cut] != TREE).mean() > 0.9
    assert hb[cut].mean() > 5 and (ha[cut] == 0).mean() > 0.9
    grown = (truth == GROWTH) & (hb > 5)
    assert 1.5 < np.median(dh[grown]) < 5.5 and dh[grown].min() >= -1e-6
    assert np.all(la[truth == NEW_BUILT] == BUILT)
    same = truth == UNCHANGED
    assert (lb[same] == la[same]).mean() > 0.97 and np.abs(dh[same]).max() < 1e-6 or np.mean(dh[same] == 0) > 0.99
    assert (ib[:, same] != ia[:, same]).mean() > 0.5  # another sun, gain and noise: not equal pixels
    with rasterio.open(pair.after.scene) as src:
        assert src.tags()["TIFFTAG_DATETIME"].startswith("2024:06:20") and float(src.tags()["sun_elevation"]) < 55


def test_synth_cli_change_and_edit_hooks_are_pure(tmp_path):
    from dataclasses import dataclass

    from geodino.synth import SynthConfig, render_block

    assert main(["synth", str(tmp_path / "p"), "--size", "96", "--seed", "4", "--change"]) == 0
    assert (tmp_path / "p" / "before" / "scene.tif").exists() and (tmp_path / "p" / "truth_change.tif").exists()
    assert main(["synth", str(tmp_path / "p"), "--size", "96", "--seed", "4", "--change"]) == 2  # no overwrite

    @dataclass(frozen=True)
    class Nothing:  # an edit that changes nothing renders the unedited scene exactly
        def landcover(self, gy, gx, lc):
            return lc

        def tree_heights(self, cy, cx, ci, cj, height):
            return height

        def radiometry(self, spectra, gy, gx):
            return spectra

    cfg = SynthConfig(width=64, height=64, seed=3)
    for plain, edited in zip(render_block(cfg, 16, 0, 48, 64), render_block(cfg, 16, 0, 48, 64, edit=Nothing())):
        np.testing.assert_array_equal(plain, edited)


def test_notebook_is_stored_executed_small_and_clean():
    import nbformat

    path = REPO / "notebooks" / "change.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    assert path.stat().st_size < 1_000_000


def test_change_polygon_areas_on_a_feet_grid_are_square_metres(cli_out, tmp_path):
    """The change rasters relabelled onto a State Plane grid of 2 ft pixels: a polygon's area
    is its pixels times 0.37 m², not times 4 (and --min-area is in m² there too)."""
    import geodino.change_vectors as cv
    from geodino.classes import WORLDCOVER

    us_foot = 1200 / 3937
    kw = {}
    for key, name in (("canopy", "canopy_change.tif"), ("canopy_classes", "canopy_change_class.tif"),
                      ("transitions", "landcover_transition.tif")):
        with rasterio.open(cli_out / name) as src:
            profile, data = src.profile, src.read()
        profile.update(crs="EPSG:2263", transform=rasterio.Affine(2, 0, 1_000_000, 0, -2, 200_000))
        with rasterio.open(tmp_path / name, "w", **profile) as dst:
            dst.write(data)
        kw[key] = tmp_path / name
    gdf = cv.change_polygons([cv.Step(1, "a", "b")], **kw, classes=WORLDCOVER, min_area=2.0)
    pixel = 4 * us_foot ** 2
    assert len(gdf) > 5
    np.testing.assert_allclose(gdf["area_m2"], gdf["pixels"] * pixel, rtol=1e-12)
    assert gdf["pixels"].min() >= 6  # 5 px are 1.86 m²: under the 2 m² minimum
