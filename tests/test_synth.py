from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from geodino.classes import WORLDCOVER
from geodino.synth import TREE, SynthConfig, generate, render_block


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_scene(tmp_path):
    cfg = SynthConfig(width=300, height=260, seed=5)
    a = generate(tmp_path / "a", cfg)
    b = generate(tmp_path / "b", cfg)
    c = generate(tmp_path / "c", SynthConfig(width=300, height=260, seed=6))
    for name in ("scene", "landcover", "canopy_height"):
        assert _digest(getattr(a, name)) == _digest(getattr(b, name))
    with rasterio.open(a.scene) as da, rasterio.open(c.scene) as dc:
        assert not np.array_equal(da.read(), dc.read())


def test_blocks_do_not_depend_on_block_size():
    cfg = SynthConfig(width=200, height=200, seed=2)
    whole = render_block(cfg, 100, 60, 96, 128)
    parts = [render_block(cfg, 100 + r, 60 + c, 48, 64) for r in (0, 48) for c in (0, 64)]
    for i in range(3):
        top = np.concatenate([parts[0][i], parts[1][i]], axis=-1)
        bottom = np.concatenate([parts[2][i], parts[3][i]], axis=-1)
        np.testing.assert_array_equal(np.concatenate([top, bottom], axis=-2), whole[i])


def test_georeference_and_metadata(small_scene):
    cfg = small_scene.config
    with rasterio.open(small_scene.scene) as src:
        assert src.crs.to_epsg() == 32737
        assert src.transform == cfg.transform
        assert (src.width, src.height, src.count) == (640, 576, 4)
        assert src.dtypes == ("uint16",) * 4
        assert src.descriptions == ("blue", "green", "red", "nir")
        assert src.res == (0.6, 0.6)
        assert src.profile["tiled"] and src.block_shapes[0] == (512, 512)
        assert float(src.tags()["sun_elevation"]) == cfg.sun_elevation
        img = src.read()
        assert 0 < img.min() and img.max() <= 10000
    for path in (small_scene.landcover, small_scene.canopy_height):
        with rasterio.open(path) as d:
            assert d.transform == cfg.transform and d.crs.to_epsg() == 32737
    with rasterio.open(small_scene.landcover) as d:
        cmap = d.colormap(1)
        assert cmap[10][:3] == (0, 100, 0) and cmap[80][:3] == (0, 100, 200)
        assert d.tags(1)["class_names"].split(",")[0] == "Tree cover"
    with rasterio.open(small_scene.canopy_height) as d:
        assert d.tags(1)["units"] == "m" and d.dtypes[0] == "float32"


def test_class_codes_and_heights(small_scene):
    with rasterio.open(small_scene.landcover) as d:
        lc = d.read(1)
    with rasterio.open(small_scene.canopy_height) as d:
        chm = d.read(1)
    assert set(np.unique(lc)) <= set(WORLDCOVER.codes)
    assert np.isfinite(chm).all() and chm.min() == 0.0 and chm.max() <= 40.0
    # heights only on tree cover, and tree cover holds real trees
    assert (chm[lc != TREE] == 0).all()
    trees = chm[lc == TREE]
    assert (trees > 0).mean() > 0.3 and trees.max() > 10


def test_crowns_bright_in_nir_and_shadows_dark(small_scene):
    cfg = small_scene.config
    image, lc, chm, shadow = render_block(cfg, 0, 0, cfg.height, cfg.width, with_shadow=True)
    crown = chm > 3
    assert shadow.any() and not (shadow & (chm > 0)).any()
    nir, red = image[3].astype(float), image[2].astype(float)
    ndvi = (nir - red) / (nir + red)
    assert ndvi[crown].mean() > 0.7
    open_ground = (~shadow) & (chm == 0) & (lc == TREE)
    assert nir[shadow & (lc == TREE)].mean() < 0.6 * nir[open_ground].mean()


def test_shadow_length_follows_sun_elevation():
    areas = {}
    for elev in (90.0, 60.0, 30.0):
        cfg = SynthConfig(width=512, height=512, seed=4, sun_elevation=elev)
        _, _, chm, shadow = render_block(cfg, 0, 0, 512, 512, with_shadow=True)
        areas[elev] = shadow.mean()
    assert areas[90.0] == 0.0  # sun overhead: no ground shadow
    assert areas[30.0] > areas[60.0] > 0


def test_tallest_tree_shadow_reaches_height_over_tan_elevation():
    """Along the shadow direction, ground stays shadowed for height / tan(elevation)."""
    cfg = SynthConfig(width=512, height=512, seed=4, sun_elevation=40.0, sun_azimuth=90.0)
    _, lc, chm, shadow = render_block(cfg, 0, 0, 512, 512, with_shadow=True)
    # sun in the east: shadows run west (towards smaller columns) along each row
    inner = chm[:, 120:]
    r, c = np.unravel_index(np.argmax(inner), inner.shape)
    c += 120
    length = float(cfg.shadow_length_px(chm[r, c]))
    assert length > 20
    tip = int(math.floor(c - length)) + 1
    covered = shadow[r, tip:c] | (chm[r, tip:c] > 0)
    assert covered.all()
    # with the sun overhead the same crown casts nothing
    overhead = SynthConfig(width=512, height=512, seed=4, sun_elevation=90.0)
    assert not render_block(overhead, 0, 0, 512, 512, with_shadow=True)[3].any()


def test_collar_is_nodata(collar_scene):
    with rasterio.open(collar_scene.scene) as d:
        assert d.nodata == 0
        mask = d.dataset_mask()
    with rasterio.open(collar_scene.canopy_height) as d:
        chm = d.read(1)
    with rasterio.open(collar_scene.landcover) as d:
        lc = d.read(1)
    valid = mask > 0
    assert 0.4 < valid.mean() < 0.95
    assert not valid[0, 0] and valid[350, 400]
    np.testing.assert_array_equal(np.isnan(chm), ~valid)
    np.testing.assert_array_equal(lc == 0, ~valid)


def test_polygons_written(tmp_path):
    import geopandas as gpd

    out = generate(tmp_path, SynthConfig(width=256, height=256, seed=3), polygons=True)
    gdf = gpd.read_file(out.polygons)
    assert set(gdf.columns) >= {"class_code", "class_name", "area_m2", "geometry"}
    with rasterio.open(out.landcover) as d:
        lc = d.read(1)
    for code in np.unique(lc):
        want = (lc == code).sum() * 0.36
        assert gdf.loc[gdf.class_code == code, "area_m2"].sum() == pytest.approx(want, rel=1e-6)


_RSS_SCRIPT = """
import json, resource, sys
from geodino.synth import SynthConfig, generate
n = int(sys.argv[1])
generate(sys.argv[2], SynthConfig(width=n, height=n, seed=0))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


@pytest.mark.slow
def test_large_scene_generates_in_bounded_memory(tmp_path):
    rss = {}
    for n in (1024, 3072):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n), str(tmp_path / str(n))],
                             check=True, capture_output=True, text=True)
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])
    # 9x the area: a whole-scene implementation would need gigabytes more
    assert rss[3072] < 1.3 * rss[1024], rss


def test_cli_synth_and_refuses_overwrite(tmp_path):
    from geodino.cli import main

    assert main(["synth", str(tmp_path), "--size", "128"]) == 0
    assert (tmp_path / "scene.tif").exists()
    assert main(["synth", str(tmp_path), "--size", "128"]) == 2
    assert main(["synth", str(tmp_path), "--size", "0", "--overwrite"]) == 2
    assert not list(tmp_path.glob(".*partial*"))
