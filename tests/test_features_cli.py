from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from geodino.backbone import load_backbone
from geodino.cli import main
from geodino.scene import open_scene
from geodino.sensor import prepare
from geodino.tiling import Tile, read_tile
from tests.helpers import random_image, write_raster


def test_features_raster_equals_backbone_on_the_window(small_scene, tiny_models, tmp_path):
    out = tmp_path / "feat"
    rc = main(["features", str(small_scene.scene), "--backbone", tiny_models["backbone"], "--out", str(out),
               "--profile", "reflectance", "--window", "256", "--overlap", "64"])
    assert rc == 0
    with rasterio.open(out / "embeddings.tif") as d:
        emb = d.read()
        assert d.count == 96 and d.shape == (36, 40)
        assert d.transform == rasterio.open(small_scene.scene).transform * rasterio.Affine.scale(16)
        assert d.descriptions[0] == "embedding 0"
    # the top-left window alone covers patches [0:12, 0:12] (before the next window's overlap)
    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    x, _ = read_tile(scene, norm, Tile(0, 0, 0, 256))
    bb = load_backbone(tiny_models["backbone"])
    direct = bb(torch.from_numpy(x[None])).patches[0].numpy()
    np.testing.assert_allclose(emb[:, :12, :12], direct[:, :12, :12], rtol=1e-4, atol=1e-4)
    with rasterio.open(out / "embeddings_pca.tif") as d:
        pca = d.read()
        assert d.count == 3 and d.nodata == 0 and d.transform == rasterio.open(out / "embeddings.tif").transform
    assert pca.min() >= 1 and pca.std() > 10  # a picture, not a constant


def _run(args):
    return main(args)


@pytest.fixture()
def bad_inputs(tmp_path):
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    nocrs = write_raster(tmp_path / "nocrs.tif", random_image(32, 32), crs=None)
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 32, 32), np.uint8), nodata=0)
    good = write_raster(tmp_path / "good.tif", random_image(64, 64, 3, "uint8"))
    return dict(missing=tmp_path / "missing.tif", text=text, nocrs=nocrs, empty=empty, good=good)


@pytest.mark.parametrize("case, extra, message", [
    ("missing", [], "missing.tif: file not found"),
    ("text", [], "notes.tif: not a raster"),
    ("nocrs", [], "nocrs.tif: has no CRS"),
    ("empty", [], "empty.tif: every pixel is nodata"),
    ("good", ["--bands", "1,2,7"], "band 7 does not exist"),
    ("good", ["--bands", "red,green,nir"], "no band named 'nir'"),
    ("good", ["--profile", "sentinel2-l2a"], "expects uint16"),
    ("good", ["--window", "500"], "multiple of 16"),
    ("good", ["--window", "64", "--overlap", "64"], "smaller than the window"),
])
def test_bad_input_clear_error_nothing_written(bad_inputs, tiny_models, tmp_path, capsys, case, extra, message):
    out = tmp_path / "out"
    rc = _run(["features", str(bad_inputs[case]), "--backbone", tiny_models["backbone"], "--out", str(out),
               "--profile", "rgb8", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_backbone_and_missing_option(tmp_path, capsys, bad_inputs):
    rc = _run(["features", str(bad_inputs["good"]), "--backbone", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no config.json" in capsys.readouterr().err
    rc = _run(["features", str(bad_inputs["good"])])  # --backbone has a default (as in run); --out has none
    assert rc == 2 and "--out" in capsys.readouterr().err


def test_cli_entry_point_exit_code(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "geodino.cli", "features", str(tmp_path / "nope.tif"),
                           "--backbone", "x", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.tif: file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_window_read_is_lazy(small_scene):
    """Opening does not read pixels: reading one window touches only that window."""
    scene = open_scene(small_scene.scene)
    data, valid = scene.read(Window(100, 100, 32, 32))
    with rasterio.open(small_scene.scene) as src:
        np.testing.assert_array_equal(data, src.read(window=Window(100, 100, 32, 32)).astype(np.float32))
