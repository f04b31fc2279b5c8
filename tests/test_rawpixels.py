"""The flat copy of a class raster that the polygoniser reads during a run (geodino.rawpixels)."""

from __future__ import annotations

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import rasterio.errors
from affine import Affine

from geodino import vectorize
from geodino.export import polygonize
from geodino.rawpixels import RawPixels
from tests.test_vectorize import CLASSES, class_map, write

# a sheared, rotated grid: every geotransform term matters, so vertices mapped with another
# transform (or none: pixel coordinates) cannot pass for the COG's own
SHEARED = Affine(0.6, 0.05, 500000.0, -0.03, -0.6, 5000000.0)


def flat_copy(path, data: np.ndarray, rows: int = 64) -> RawPixels:
    """``data`` written a block of rows at a time, bottom rows first (order must not matter)."""
    raw = RawPixels(path, *data.shape, data.dtype)
    for top in reversed(range(0, data.shape[0], rows)):
        raw.write_rows(data[top:top + rows][None], top)
    raw.close()
    return raw


def layer(path):
    """(fields table, WKB of each geometry) of a polygon file, exactly as stored."""
    meta, _, wkb, fields = pyogrio.raw.read(path, layer="landcover")
    return dict(zip(meta["fields"], fields)), list(wkb)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32"])
def test_polygons_from_the_flat_copy_are_the_cogs_to_the_bit(tmp_path, dtype):
    assert vectorize.gdal_library() is not None
    data = class_map().astype(dtype)
    raster = write(tmp_path / "classes.tif", data, transform=SHEARED, nodata=255)
    raw = flat_copy(tmp_path / "classes.pixels", data)
    assert raw.complete
    from_cog = polygonize(raster, tmp_path / "cog.gpkg", CLASSES)
    from_copy = polygonize(raster, tmp_path / "copy.gpkg", CLASSES, pixels=raw.path)
    (fields_a, wkb_a), (fields_b, wkb_b) = layer(from_cog), layer(from_copy)
    assert len(wkb_a) == len(wkb_b) > 50
    assert wkb_a == wkb_b  # same vertices, same order, same bits
    for name in ("class_code", "class_name", "area_m2"):
        np.testing.assert_array_equal(fields_a[name], fields_b[name])


def test_a_copy_of_another_raster_is_refused(tmp_path):
    data = class_map()
    raster = write(tmp_path / "classes.tif", data)
    raw = flat_copy(tmp_path / "short.pixels", data[:-8])
    with pytest.raises(ValueError, match="not a copy"):
        polygonize(raster, tmp_path / "out.gpkg", CLASSES, pixels=raw.path)
    assert not (tmp_path / "out.gpkg").exists()


def test_rows_are_placed_by_their_offset_and_counted(tmp_path):
    data = np.arange(7 * 5, dtype=np.uint16).reshape(7, 5)
    raw = RawPixels(tmp_path / "a.pixels", 7, 5, "uint16")
    raw.write_rows(data[4:], 4)
    assert not raw.complete
    raw.write_rows(data[:4][None], 0)
    raw.close()
    assert raw.complete
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning), rasterio.open(raw.path) as src:  # via the header
        assert (src.width, src.height, src.dtypes[0]) == (5, 7, "uint16")
        np.testing.assert_array_equal(src.read(1), data)
    raw.remove()
    assert list(tmp_path.iterdir()) == []


def test_bad_rows_and_types_are_refused(tmp_path):
    assert RawPixels.supports("uint8", 1) and not RawPixels.supports("uint8", 3)
    assert not RawPixels.supports("float32", 1)
    with pytest.raises(ValueError, match="float32"):
        RawPixels(tmp_path / "f.pixels", 4, 4, "float32")
    raw = RawPixels(tmp_path / "a.pixels", 4, 4, "uint8")
    with pytest.raises(ValueError, match="outside"):
        raw.write_rows(np.zeros((2, 4), np.uint8), 3)
    raw.remove()


def test_a_run_traces_from_the_flat_copy_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """The land-cover polygons of a run are read from the flat copy (the same polygons as
    from the class COG), and the copy is gone after the run, as after a failed one."""
    import geodino.pipeline as pipeline
    from geodino.pipeline import build_run, load_pipeline, write_scene
    from tests.conftest import REPO

    seen = []
    real = vectorize.polygonize

    def spy(raster, out, classes, **kw):
        seen.append(kw.get("pixels"))
        assert kw.get("pixels") is not None and kw["pixels"].exists()
        return real(raster, out, classes, **kw)

    monkeypatch.setattr(vectorize, "polygonize", spy)
    opts = load_pipeline(REPO / "pipelines" / "demo.yaml")
    opts.window, opts.overlap, opts.quicklook = 128, 32, False
    out = tmp_path / "run"
    write_scene(build_run(str(REPO / "data_samples" / "scene" / "scene.tif"), opts), out, quiet=True)
    assert len(seen) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["canopy_height.tif", "landcover.tif", "landcover.gpkg", "report.json", "canopy_height.qml",
         "landcover.qml"])
    monkeypatch.setattr(vectorize, "polygonize", real)
    again = polygonize(out / "landcover.tif", tmp_path / "from_cog.gpkg", pipeline.build_run(
        str(REPO / "data_samples" / "scene" / "scene.tif"), opts).classes, min_area=opts.min_polygon_area)
    assert layer(again)[1] == layer(out / "landcover.gpkg")[1]

    def failing(raster, out, classes, **kw):
        raise RuntimeError("disk full while tracing")

    monkeypatch.setattr(vectorize, "polygonize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_scene(build_run(str(REPO / "data_samples" / "scene" / "scene.tif"), opts), tmp_path / "failed",
                    quiet=True)
    assert list((tmp_path / "failed").iterdir()) == []


@pytest.mark.parametrize("fast", [True, False])
def test_a_structure_file_and_the_copy_give_the_rasters_polygons(tmp_path, monkeypatch, fast):
    """During a run the polygons start before the COG exists: from the streamed file, which
    holds the georeferencing but no pixels, and the flat copy. Both ways of tracing."""
    data = class_map()
    raster = write(tmp_path / "classes.tif", data, transform=SHEARED, nodata=255)
    with rasterio.open(raster) as src:
        profile = src.profile
    structure = tmp_path / "structure.tif"
    with rasterio.open(structure, "w", **profile, SPARSE_OK=True):
        pass  # no pixel written: reading it would give nodata everywhere
    raw = flat_copy(tmp_path / "classes.pixels", data)
    if not fast:
        monkeypatch.setattr(vectorize, "gdal_library", lambda: None)
    expected = polygonize(raster, tmp_path / "cog.gpkg", CLASSES)
    got = polygonize(structure, tmp_path / "copy.gpkg", CLASSES, pixels=raw.path)
    (fields_a, wkb_a), (fields_b, wkb_b) = layer(expected), layer(got)
    assert len(wkb_a) > 50 and wkb_a == wkb_b
    np.testing.assert_array_equal(fields_a["area_m2"], fields_b["area_m2"])
