"""Label-free embedding analysis: similarity to an exemplar and streaming k-means clusters."""

from __future__ import annotations

import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
import shapely
import xarray as xr
from affine import Affine
from rio_cogeo.cogeo import cog_validate

from geodino.analysis import cluster, exemplar_embedding, similarity
from geodino.cli import main
from geodino.errors import InputError

D, H, W, PATCH = 8, 12, 16, 16.0
T = Affine(PATCH, 0, 300000.0, 0, -PATCH, 9700000.0)


def _embeddings(lazy: bool = False, seed: int = 0) -> xr.DataArray:
    """Three kinds of patch (left, middle, right thirds) around three directions, plus noise;
    the top-left patch is nodata."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, D))
    kind = np.repeat(np.arange(3), [5, 6, 5])[None].repeat(H, 0)
    data = centres[kind].transpose(2, 0, 1) + 0.05 * rng.normal(size=(D, H, W))
    data = data.astype(np.float32)
    data[:, 0, 0] = np.nan
    arr = da.from_array(data, chunks=(D, 5, 7)) if lazy else data
    xs = T.c + PATCH * (np.arange(W) + 0.5)
    ys = T.f - PATCH * (np.arange(H) + 0.5)
    out = xr.DataArray(arr, dims=("embedding", "y_patch", "x_patch"), coords={"y_patch": ys, "x_patch": xs})
    return out.rio.write_crs("EPSG:32737").rio.write_transform(T)


def _centre(row: int, col: int) -> tuple[float, float]:
    return T * (col + 0.5, row + 0.5)


def test_similarity_is_one_at_the_exemplar_and_symmetric():
    emb = _embeddings(lazy=True)
    a, b = (3, 2), (7, 12)
    sim_a = similarity(emb, _centre(*a))
    assert isinstance(sim_a.data, da.Array)  # lazy until asked
    sim_a = sim_a.values
    sim_b = similarity(emb, _centre(*b)).values
    assert sim_a[a] == pytest.approx(1.0, abs=1e-6) and sim_b[b] == pytest.approx(1.0, abs=1e-6)
    assert sim_a[b] == pytest.approx(sim_b[a], abs=1e-6)
    assert np.isnan(sim_a[0, 0])  # nodata stays nodata
    assert sim_a[:, :5][1:].min() > 0.95 and sim_a[:, 11:].max() < sim_a[:, :5][1:].min()


def test_polygon_and_geodataframe_exemplars_average_their_patches():
    emb = _embeddings()
    x0, y0 = _centre(4, 1)
    x1, y1 = _centre(5, 3)
    box = shapely.box(x0 - 1, y1 - 1, x1 + 1, y0 + 1)  # the centres of rows 4-5, columns 1-3
    expected = np.nanmean(emb.values[:, 4:6, 1:4].reshape(D, -1), axis=1)
    assert exemplar_embedding(emb, box) == pytest.approx(expected, rel=1e-5)
    gdf = gpd.GeoDataFrame(geometry=[box], crs="EPSG:32737").to_crs("EPSG:4326")
    assert exemplar_embedding(emb, gdf) == pytest.approx(expected, rel=1e-4)
    tiny = shapely.box(x0 - 1, y0 - 1, x0 + 1, y0 + 1).buffer(0)  # smaller than a patch
    assert exemplar_embedding(emb, tiny.difference(shapely.Point(x0, y0).buffer(0.5))) == pytest.approx(
        emb.values[:, 4, 1], rel=1e-5)


def test_bad_exemplars_are_clear_errors(tmp_path):
    emb = _embeddings()
    with pytest.raises(InputError, match="outside the scene"):
        similarity(emb, (0.0, 0.0))
    with pytest.raises(InputError, match="only nodata"):
        similarity(emb, _centre(0, 0))
    with pytest.raises(InputError, match="exemplar file not found"):
        similarity(emb, tmp_path / "nope.gpkg")
    with pytest.raises(InputError, match="not embeddings"):
        similarity(tmp_path, (1.0, 2.0))


def test_clusters_do_not_depend_on_block_size():
    emb = _embeddings()
    results = [cluster(emb, 3, seed=4, block_rows=rows, epochs=2) for rows in (1, 5, H)]
    labels = [r.labels.values for r in results]
    for other in results[1:]:
        np.testing.assert_array_equal(other.labels.values, labels[0])
        np.testing.assert_allclose(other.centers, results[0].centers, atol=1e-6)
    lab = labels[0]
    assert lab[0, 0] == 0 and set(np.unique(lab[1:])) == {1, 2, 3}
    # the three kinds of patch are the three clusters
    for cols in (slice(0, 5), slice(5, 11), slice(11, 16)):
        assert len(np.unique(lab[1:, cols])) == 1
    assert len({lab[5, 2], lab[5, 8], lab[5, 13]}) == 3


def test_cluster_map_cog_with_colour_table(tmp_path):
    result = cluster(_embeddings(lazy=True), 3, seed=0, out=tmp_path)
    assert result.path == tmp_path / "clusters.tif" and cog_validate(str(result.path))[0]
    with rasterio.open(result.path) as src:
        assert src.nodata == 0 and src.transform == T and src.crs.to_epsg() == 32737
        np.testing.assert_array_equal(src.read(1), result.labels.values)
        cmap = src.colormap(1)
        assert [cmap[c][:3] for c in (1, 2, 3)] == [c.color for c in result.classes.classes]
        assert src.tags(1)["class_names"] == "cluster 1,cluster 2,cluster 3"
    assert (tmp_path / "clusters.qml").exists()
    with pytest.raises(InputError, match="k must be"):
        cluster(_embeddings(), 1)


def _embeddings_tif(path):
    from geodino.export import RasterOutput, write_rasters
    from geodino.scene import Grid

    emb = _embeddings(lazy=True).rename(embedding="band", y_patch="y", x_patch="x")
    write_rasters([RasterOutput(path, emb, dtype="float32", nodata=float("nan"),
                                descriptions=[f"embedding {i}" for i in range(D)],
                                grid=Grid(emb.rio.crs, T, W, H))])
    return path


def test_cli_similar_and_cluster_on_embeddings(tmp_path, capsys):
    tif = _embeddings_tif(tmp_path / "embeddings.tif")
    x, y = _centre(3, 2)
    assert main(["similar", str(tif), "--exemplar", f"{x},{y}", "--out", str(tmp_path / "sim")]) == 0
    with rasterio.open(tmp_path / "sim" / "similarity.tif") as src:
        sim = src.read(1)
        assert src.transform == T and src.descriptions == ("cosine similarity to the exemplar",)
    assert sim[3, 2] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(sim, similarity(_embeddings(), (x, y)).values, atol=1e-6)
    gpkg = tmp_path / "ex.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.Point(x, y)], crs="EPSG:32737").to_file(gpkg)
    assert main(["similar", str(tmp_path), "--exemplar", str(gpkg), "--out", str(tmp_path / "sim2")]) == 0
    assert main(["cluster", str(tif), "--k", "3", "--out", str(tmp_path / "cl")]) == 0
    assert (tmp_path / "cl" / "clusters.tif").exists()
    capsys.readouterr()
    assert main(["similar", str(tif), "--exemplar", "abc", "--out", str(tmp_path / "x")]) == 2
    assert "neither x,y" in capsys.readouterr().err
    assert main(["cluster", str(tif), "--k", "3", "--out", str(tmp_path / "cl")]) == 2  # exists, no --overwrite
    assert main(["cluster", str(tmp_path / "emb_missing.tif"), "--out", str(tmp_path / "y")]) == 2


def test_cli_similar_runs_a_scene_through_the_engine_once(tmp_path, tiny_models, small_scene, capsys, monkeypatch):
    import json

    from geodino import stitch

    inferred = []
    run_batch = stitch.run_batch

    def counting(scene, normalise, tiles, *args, **kwargs):
        inferred.extend((t.row, t.col) for t in tiles)
        return run_batch(scene, normalise, tiles, *args, **kwargs)

    monkeypatch.setattr(stitch, "run_batch", counting)
    scene = str(small_scene.scene)
    with rasterio.open(scene) as src:
        x, y = src.xy(src.height // 2, src.width // 2)
    code = main(["similar", scene, "--exemplar", f"{x},{y}", "--backbone", tiny_models["backbone"],
                 "--profile", "reflectance", "--window", "128", "--overlap", "32", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    windows = json.loads((tmp_path / "report.json").read_text())["windows"]
    assert len(inferred) == len(set(inferred)) == windows  # each window once, similarity read from the file
    with rasterio.open(tmp_path / "similarity.tif") as sim, rasterio.open(tmp_path / "embeddings.tif") as emb:
        assert sim.shape == emb.shape == (36, 40) and sim.transform == emb.transform
        row, col = sim.index(x, y)
        assert sim.read(1)[row, col] == pytest.approx(1.0, abs=1e-5)
    capsys.readouterr()
    assert main(["similar", scene, "--exemplar", f"{x},{y}", "--out", str(tmp_path / "b")]) == 2
    assert "backbone" in capsys.readouterr().err
