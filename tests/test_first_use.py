"""A new user's first commands: what they print, and that the commands they suggest work."""

from __future__ import annotations

import logging
import shlex
import time

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

import geodino
from geodino.cli import main
from geodino.errors import ModelError
from geodino.model_checks import (
    SAMPLE_SCENE,
    demo_warning,
    gsd_warnings,
    is_bundled_sample,
    is_demo_model,
)
from tests.conftest import REPO
from tests.helpers import random_image, write_raster

DEMO_BACKBONE = REPO / "data_samples" / "model" / "backbone"


@pytest.fixture()
def rgb_scene(tmp_path):
    """A small 3-band uint8 scene at 0.6 m, bands undescribed (an aerial RGB orthophoto)."""
    return write_raster(tmp_path / "ortho.tif", random_image(96, 96, 3, "uint8"),
                        transform=from_origin(500000.0, 4000000.0, 0.6, 0.6))


def test_first_run_without_a_model_says_what_works_and_the_demo_line_does(rgb_scene, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["run", str(rgb_scene), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    first, *details = err.strip().splitlines()
    assert first.startswith("error: nothing to compute: no model was given")
    text = " ".join(details)
    assert "--pipeline" in text and "demo.yaml --profile rgb8" in text
    assert "geodino fit canopy" in text and "--canopy-model ./chmv2" in text and "--embeddings" in text
    assert not out.exists()
    # the demo line is a command that works as printed
    demo = next(line for line in details if "demo model" in line).split(": ", 1)[1]
    assert main(shlex.split(demo)[1:]) == 0
    with rasterio.open(out / "landcover.tif") as d:
        assert d.tags()["demo_model"] == "true" and d.tags()["sensor_profile"] == "rgb8"


def test_profile_named_for_a_naip_like_scene(tmp_path, capsys):
    naip = write_raster(tmp_path / "naip.tif", random_image(64, 64, 4, "uint8"), photometric="MINISBLACK")
    assert main(["run", str(naip), "--out", str(tmp_path / "o")]) == 2
    assert "--profile naip" in capsys.readouterr().err


def test_version_and_defaults_in_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps help to the terminal; keep each option on one line
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"geodino {geodino.__version__}"
    assert main(["run", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "facebook/dinov3-vitl16-pretrain-sat493m" in shown  # the backbone --embeddings uses
    for default in ("(512)", "(64)", "(cpu)", "(threads)"):
        assert default in shown, default
    assert main(["features", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "facebook/dinov3-vitl16-pretrain-sat493m" in shown and "--mosaic" in shown


def test_features_several_files_one_by_one_unless_mosaic(tiny_models, tmp_path):
    a = write_raster(tmp_path / "t_2020.tif", random_image(64, 64, 3, "uint8", seed=1))
    b = write_raster(tmp_path / "t_2024.tif", random_image(64, 64, 3, "uint8", seed=2))
    common = ["--backbone", tiny_models["backbone"], "--window", "64", "--overlap", "0", "--profile", "rgb8"]
    assert main(["features", str(a), str(b), "--out", str(tmp_path / "each"), *common]) == 0
    with rasterio.open(tmp_path / "each" / "t_2020" / "embeddings.tif") as da, \
            rasterio.open(tmp_path / "each" / "t_2024" / "embeddings.tif") as db:
        assert da.shape == db.shape == (4, 4)
        assert not np.allclose(da.read(), db.read())  # two dates stay two pictures
    assert not (tmp_path / "each" / "embeddings.tif").exists()
    assert main(["features", str(a), str(b), "--out", str(tmp_path / "mosaic"), "--mosaic", *common]) == 0
    assert (tmp_path / "mosaic" / "embeddings.tif").exists() and (tmp_path / "mosaic" / "embeddings_pca.tif").exists()


def test_demo_model_detected_and_warned_off_its_sample(tiny_models):
    assert is_demo_model(DEMO_BACKBONE) and is_demo_model(tiny_models["backbone"])
    assert not is_demo_model("facebook/dinov3-vitl16-pretrain-sat493m") and not is_demo_model(None)
    assert is_bundled_sample(SAMPLE_SCENE) and not is_bundled_sample("elsewhere.tif")
    assert demo_warning(DEMO_BACKBONE, [str(SAMPLE_SCENE)]) is None
    msg = demo_warning(DEMO_BACKBONE, ["/data/naip.tif"])
    assert msg.startswith("warning: the demo model") and "illustrative" in msg and "\n" not in msg
    assert demo_warning("facebook/dinov3-vitl16-pretrain-sat493m", ["/data/naip.tif"]) is None


def test_pixel_size_warning_names_target_gsd():
    assert gsd_warnings(0.6, {"canopy head": 0.6, "land-cover head": 0.6}) == []
    assert gsd_warnings(1.1, {"canopy head": 0.6}) == []  # within 2x
    (msg,) = gsd_warnings(5.0, {"canopy head": 0.6, "land-cover head": 0.6})
    assert "5 m pixels" in msg and "--target-gsd 0.6" in msg and "land-cover head" in msg
    (msg,) = gsd_warnings(300.0, {"canopy head": 0.6})
    assert "--target-gsd 0.6" in msg and "adds no detail" in msg
    assert gsd_warnings(0.6, {"canopy head": None}) == []  # heads saved before the GSD was recorded


def test_run_warns_for_demo_model_and_pixel_size(tmp_path, caplog):
    scene = write_raster(tmp_path / "s10m.tif", random_image(64, 64, 3, "uint8"))  # 10 m pixels
    with caplog.at_level(logging.WARNING, logger="geodino"):
        rc = main(["run", str(scene), "--out", str(tmp_path / "o"), "--pipeline", str(REPO / "pipelines" / "demo.yaml"),
                   "--profile", "rgb8", "--window", "64", "--overlap", "0", "--no-polygons"])
    assert rc == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "geodino"]
    assert any("illustrative" in w for w in warnings)
    assert any("10 m pixels" in w and "--target-gsd 0.6" in w for w in warnings)
    with rasterio.open(tmp_path / "o" / "canopy_height.tif") as d:
        assert d.tags()["demo_model"] == "true"


def test_demo_heads_record_their_pixel_size():
    from geodino.heads import load_head

    for name in ("canopy_head", "landcover_head"):
        assert load_head(REPO / "data_samples" / "model" / name).meta.gsd == 0.6


# --------------------------------------------------------------------------------------
# band messages


@pytest.mark.parametrize("bands, dtype, descriptions, extra, expected", [
    (4, "uint8", None, [], "--profile naip"),
    (4, "uint16", ["B02", "B03", "B04", "B08"], [], "--profile sentinel2-l2a"),
    (4, "uint16", ["SR_B2", "SR_B3", "SR_B4", "SR_B5"], [], "--profile landsat-c2-l2"),
    (3, "uint8", None, ["--profile", "sentinel2-l2a"], "--profile rgb8"),
])
def test_band_messages_name_the_profile_that_fits(tmp_path, capsys, bands, dtype, descriptions, extra, expected):
    # NAIP files declare no alpha band: MINISBLACK keeps GDAL from calling the 4th band alpha
    scene = write_raster(tmp_path / "s.tif", random_image(64, 64, bands, dtype), descriptions=descriptions,
                         photometric="MINISBLACK")
    rc = main(["run", str(scene), "--out", str(tmp_path / "o"), "--pipeline", str(REPO / "pipelines" / "demo.yaml"),
               "--profile", "auto", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert expected in err, err


# --------------------------------------------------------------------------------------
# hub ids offline, and models that are not DINOv3


@pytest.fixture()
def no_network(monkeypatch):
    """Online mode with an unreachable hub; any retry with backoff (time.sleep) fails the test."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")

    def no_sleep(seconds):
        raise AssertionError(f"retry with backoff ({seconds} s)")

    monkeypatch.setattr(time, "sleep", no_sleep)


def test_backbone_hub_id_without_network_fails_once_and_names_backbone(no_network):
    from geodino.backbone import load_backbone

    with pytest.raises(ModelError) as err:
        load_backbone("facebook/dinov3-vitl16-pretrain-sat493m")
    msg = str(err.value)
    assert msg.startswith("cannot load backbone facebook/dinov3-vitl16-pretrain-sat493m")
    assert "cannot be reached (no network)" in msg and "--backbone ./" in msg


def test_canopy_model_hub_id_without_network_names_canopy_model(no_network):
    from geodino.predict import load_chmv2

    with pytest.raises(ModelError) as err:
        load_chmv2("facebook/dinov3-vitl16-chmv2-dpt-head", "cpu")
    msg = str(err.value)
    assert "cannot load canopy model" in msg and "--canopy-model ./chmv2" in msg and "--backbone ./" not in msg


def test_offline_flag_is_named(monkeypatch):
    from geodino.backbone import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"hub is offline \(HF_HUB_OFFLINE=1\)"):
        load_backbone("vits16")


def test_a_hub_id_that_is_not_dinov3(tmp_path, no_network):
    from transformers import Dinov2Config, Dinov2Model

    from geodino.backbone import load_backbone

    with pytest.raises(ModelError, match="facebook/dinov2-small is not a DINOv3 model") as err:
        load_backbone("facebook/dinov2-small")
    assert "gated" not in str(err.value)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(tmp_path / "dinov2")
    with pytest.raises(ModelError, match="not a DINOv3 model.*model_type 'dinov2'"):
        load_backbone(tmp_path / "dinov2")


# --------------------------------------------------------------------------------------
# README


def test_readme_install_section_is_honest():
    readme = (REPO / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    for needed in ("git clone", "python -m venv", "Python >= 3.10", "--index-url https://download.pytorch.org/whl/cpu",
                   "CUDA", "python -m pip install torch==2.13.0 && python -m pip install -e \".[dev]\""):
        assert needed in install, needed
    assert "geodino fit" in readme.split("On your own scenes", 1)[1].split("\n## ", 1)[0]


def test_readme_own_scenes_command_points_to_fit_when_heads_are_missing(rgb_scene, tiny_models, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", str(rgb_scene), "--out", "maps", "--pipeline", str(REPO / "pipelines" / "canopy_landcover.yaml"),
               "--backbone", tiny_models["backbone"]])
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "heads/canopy-vitl16-sat does not exist" in err and "geodino fit canopy" in err
