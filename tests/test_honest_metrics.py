"""Honest metrics (issue 13): evaluate refuses what it cannot compare; fit names what it measured.

Each test here failed on the code before this change (see the closing note of issue 13).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geodino.cli import main
from geodino.errors import InputError
from tests.conftest import realdata
from tests.helpers import random_image, write_raster


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
    from geodino.labels import Labels

    scene = open_scene(write_raster(tmp_path / "s.tif", random_image(32, 32, 3, "uint8")))
    polys = gpd.GeoDataFrame({"id": [1, 2], "class": ["forest", "water"]},
                             geometry=[box(500000, 3999840, 500160, 4000000), box(500160, 3999680, 500320, 3999840)],
                             crs="EPSG:32633")
    polys.to_file(tmp_path / "p.gpkg")
    labels = Labels(str(tmp_path / "p.gpkg"), scene, "landcover")
    assert labels.classes.codes == [1, 2] and labels.classes.names == ["forest", "water"]


def test_real_polygons_name_their_classes_without_being_told_the_column(tmp_path):
    from geodino.scene import open_scene
    from geodino.labels import Labels

    scene = open_scene(realdata("LE70220492002106EDC00_stack.gtif"))
    with pytest.warns(UserWarning, match="several names"):  # the file has two mislabelled polygons
        labels = Labels(str(realdata("training_polygons/training_data.shp")), scene, "landcover")
    assert labels.column == "id"
    assert labels.classes.names == ["forest", "water", "herbaceous", "barren", "urban"]
