from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import box

from geodino.backbone import load_backbone
from geodino.errors import InputError, ModelError
from geodino.heads import load_head
from geodino.labels import Labels
from geodino.metrics import class_metrics, evaluate_rasters, height_metrics
from geodino.scene import open_scene
from geodino.tiling import Tile, WindowSpec, window_grid
from geodino.train import FitConfig, blocked_split, fit
from tests.conftest import realdata
from tests.helpers import random_image, write_raster

# -- metrics against hand-computed values ---------------------------------------------


def test_height_metrics_by_hand():
    ref = np.array([[0.0, 2.0], [4.0, np.nan]])
    pred = np.array([[1.0, 2.0], [2.0, 5.0]])
    m = height_metrics(pred, ref, block=1)
    # errors: +1, 0, -2 over 3 valid pixels
    assert m["pixels"] == 3
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["bias"] == pytest.approx(-1 / 3)
    # ss_tot = (0-2)^2 + 0 + (4-2)^2 = 8, ss_res = 5
    assert m["r2"] == pytest.approx(1 - 5 / 8)


def test_block_r2_averages_blocks():
    ref = np.zeros((100, 100))
    ref[:50] = 10.0
    pred = ref + np.random.default_rng(0).normal(0, 3, ref.shape)  # noisy pixels, exact block means
    m = height_metrics(pred, ref)
    assert m["blocks"] == 4
    assert m["block_r2"] > 0.99 and m["r2"] < 0.95


def test_class_metrics_by_hand():
    ref = np.array([10, 10, 20, 20, 30, 0])
    pred = np.array([10, 20, 20, 20, 10, 30])  # the last pixel is unlabelled (0)
    m = class_metrics(pred, ref, [10, 20, 30], ["a", "b", "c"])
    assert m["pixels"] == 5
    assert m["overall_accuracy"] == pytest.approx(3 / 5)
    # a: tp 1, fp 1, fn 1 -> 1/3; b: tp 2, fp 1 -> 2/3; c: tp 0 -> 0
    assert m["iou"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 3), "c": 0.0}
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert m["confusion_matrix"]["rows_reference"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


# -- labels on the processing grid ------------------------------------------------------


@pytest.fixture()
def grid_scene(tmp_path):
    t = from_origin(500000.0, 4000000.0, 10.0, 10.0)
    return open_scene(write_raster(tmp_path / "scene.tif", random_image(96, 128, 3, "uint8"), transform=t))


def _class_truth():
    truth = np.full((96, 128), 10, np.uint8)
    truth[:, 64:] = 20
    truth[20:50, 30:90] = 80
    return truth


def test_label_raster_in_another_crs_and_resolution_lands_on_the_right_pixels(grid_scene, tmp_path):
    truth = _class_truth()
    src_t = grid_scene.grid.transform
    dst_t, w, h = calculate_default_transform("EPSG:32633", "EPSG:4326", 128, 96,
                                              *rasterio.transform.array_bounds(96, 128, src_t)[::-1][::-1],
                                              resolution=0.00004)
    geo = np.zeros((h, w), np.uint8)
    reproject(truth, geo, src_transform=src_t, src_crs="EPSG:32633", dst_transform=dst_t, dst_crs="EPSG:4326",
              resampling=Resampling.nearest, dst_nodata=0)
    path = write_raster(tmp_path / "labels_4326.tif", geo, crs="EPSG:4326", transform=dst_t, nodata=0)
    labels = Labels(str(path), grid_scene, "landcover")
    assert labels.classes.codes == [10, 20, 80]
    idx = labels.read(Tile(0, 0, 0, 128))[:96]
    codes = np.where(idx >= 0, np.array([10, 20, 80])[np.clip(idx, 0, None)], 0)
    assert (codes == truth).mean() > 0.97
    assert (codes[25:45, 35:85] == 80).all()  # the interior of the square is exact


def test_height_labels_average_onto_a_coarser_grid(tmp_path):
    fine_t = from_origin(500000.0, 4000000.0, 5.0, 5.0)
    fine = np.zeros((64, 64), np.float32)
    fine[::2, :] = 10.0  # alternate rows: 10 m and 0 m -> 5 m at 10 m pixels
    path = write_raster(tmp_path / "chm.tif", fine, transform=fine_t, nodata=-1.0)
    coarse = open_scene(write_raster(tmp_path / "s.tif", random_image(32, 32, 3, "uint8"),
                                     transform=from_origin(500000.0, 4000000.0, 10.0, 10.0)))
    y = Labels(str(path), coarse, "canopy").read(Tile(0, 0, 0, 32))
    np.testing.assert_allclose(y, 5.0)


def test_polygons_are_reprojected_and_rasterised(grid_scene, tmp_path):
    # a 300 m x 200 m square in UTM, stored in EPSG:4326
    square = gpd.GeoDataFrame({"code": [80], "name": ["water"]},
                              geometry=[box(500300.0, 3999500.0, 500600.0, 3999700.0)], crs="EPSG:32633")
    path = tmp_path / "polys.gpkg"
    square.to_crs("EPSG:4326").to_file(path)
    labels = Labels(str(path), grid_scene, "landcover", class_column="code", name_column="name")
    assert labels.classes.names == ["water"]
    idx = labels.read(Tile(0, 0, 0, 128))[:96]
    assert abs((idx == 0).sum() - 30 * 20) <= 30 * 2  # 600 px, edges within a pixel
    assert (idx[32:48, 32:58] == 0).all() and (idx[:25] == -1).all()
    with pytest.raises(InputError, match="no column 'klass'"):
        Labels(str(path), grid_scene, "landcover", class_column="klass")
    with pytest.raises(InputError, match="must hold numbers"):
        Labels(str(path), grid_scene, "landcover", class_column="name")


def test_blocked_split_has_no_overlap():
    spec = WindowSpec(128, 32)
    tiles = window_grid(1000, 1200, spec)
    train, val = blocked_split(tiles, 0.25, 2, seed=1, stride=spec.stride)
    assert val and train
    assert 0.1 < len(val) / len(tiles) < 0.5
    for t in train:
        for v in val:
            assert not (t.row < v.row + v.size and v.row < t.row + t.size and
                        t.col < v.col + v.size and v.col < t.col + t.size)
    assert blocked_split(tiles, 0.25, 2, seed=1, stride=spec.stride) == (train, val)  # seeded


# -- fitting ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_scene(tmp_path_factory):
    from geodino.synth import SynthConfig, generate

    return generate(tmp_path_factory.mktemp("train"), SynthConfig(width=768, height=768, seed=3))


def test_fit_landcover_beats_majority_and_cache_is_reused(train_scene, tiny_models, tmp_path):
    cfg = FitConfig(task="landcover", scene=str(train_scene.scene), labels=str(train_scene.landcover),
                    backbone=tiny_models["backbone"], out=str(tmp_path / "lc"), profile="reflectance",
                    window=128, epochs=8, cache_dir=str(tmp_path / "cache"))
    first = fit(cfg, progress=False)
    n = first.train_windows + first.val_windows
    assert first.val_windows > 0
    assert first.backbone_calls == math.ceil(n / cfg.batch_size)  # features once; epochs read the cache
    base = first.baseline["predict_majority_class"]
    assert first.metrics["overall_accuracy"] > base["overall_accuracy"] + 0.2
    assert first.metrics["miou"] > base["miou"]
    again = fit(cfg, progress=False)
    assert again.backbone_calls == 0
    assert again.metrics == first.metrics  # seeded and reproducible
    head = load_head(tmp_path / "lc", backbone=load_backbone(tiny_models["backbone"]))
    assert head.meta.training["train_windows"] == first.train_windows
    assert head.meta.metrics["validation"]["overall_accuracy"] == first.metrics["overall_accuracy"]
    assert head.meta.profile == "reflectance" and head.classes.codes[0] == 10
    assert head.meta.gsd == 0.6  # the pixel size it was fitted at, for the pixel-size check of later runs


def test_fit_canopy_beats_training_mean(train_scene, tiny_models, tmp_path):
    cfg = FitConfig(task="canopy", scene=str(train_scene.scene), labels=str(train_scene.canopy_height),
                    backbone=tiny_models["backbone"], out=str(tmp_path / "chm"), profile="reflectance",
                    window=128, epochs=6, head_type="linear", lr=5e-3)
    result = fit(cfg, progress=False)
    base = result.baseline["predict_training_mean"]
    assert result.metrics["rmse"] < base["rmse"] and result.metrics["mae"] < base["mae"]


def test_head_save_load_round_trip_and_wrong_backbone(tiny_models, tmp_path):
    from geodino.backbone import save_tiny_backbone

    bb = load_backbone(tiny_models["backbone"])
    head = load_head(tiny_models["canopy"], backbone=bb)
    layers = [torch.randn(1, 96, 4, 4) for _ in range(4)]
    again = load_head(tiny_models["canopy"])
    torch.testing.assert_close(head(layers), again(layers))
    assert head(layers).shape == (1, 1, 64, 64) and (head(layers) >= 0).all()
    other = load_backbone(save_tiny_backbone(tmp_path / "wide", hidden_size=64, heads=2))
    with pytest.raises(ModelError, match="fitted on backbone"):
        load_head(tiny_models["canopy"], backbone=other)
    with pytest.raises(ModelError, match="not a geodino head"):
        load_head(tmp_path)


def test_evaluate_aligns_reference_by_reprojection(train_scene, tmp_path):
    # the reference itself, coarsened 2x: heights averaged, classes by mode
    with rasterio.open(train_scene.canopy_height) as src:
        data = src.read(1)
        coarse = data.reshape(384, 2, 384, 2).mean(axis=(1, 3))
        t = src.transform * rasterio.Affine.scale(2)
    pred = write_raster(tmp_path / "pred.tif", coarse.astype(np.float32), crs="EPSG:32737", transform=t,
                        nodata=float("nan"))
    m = evaluate_rasters(pred, train_scene.canopy_height, "canopy")
    assert m["mae"] < 1e-4 and m["r2"] > 0.9999
    m = evaluate_rasters(train_scene.landcover, train_scene.landcover, "landcover")
    assert m["overall_accuracy"] == 1.0


def test_realdata_landsat_fit_from_sparse_labels_and_polygons(tiny_models, tmp_path):
    scene = realdata("LE70220492002106EDC00_stack.gtif")
    bands = ["band 3 reflectance", "band 2 reflectance", "band 1 reflectance"]
    from geodino.backbone import save_tiny_backbone

    # the Landsat stack is a web-family (generic) input for the tiny model
    bb = str(save_tiny_backbone(tmp_path / "bb", family="web"))
    r1 = fit(FitConfig(task="landcover", scene=str(scene), labels=str(realdata("training_data.gtif")),
                       backbone=bb, out=str(tmp_path / "raster"), profile="reflectance", bands=bands, window=128,
                       epochs=5), progress=False)
    assert r1.metrics["pixels"] > 0
    head = load_head(tmp_path / "raster")
    assert head.classes.codes == [1, 2, 3, 4, 5]
    r2 = fit(FitConfig(task="landcover", scene=str(scene),
                       labels=str(realdata("training_polygons/training_data.shp")), backbone=bb,
                       out=str(tmp_path / "poly"), profile="reflectance", bands=bands, window=128, epochs=5,
                       class_column="id", name_column="class"), progress=False)
    head = load_head(tmp_path / "poly")
    assert head.classes.codes == [1, 2, 3, 4, 5] and "water" in [n.lower() for n in head.classes.names]
    assert r2.train_windows + r2.val_windows >= 2
