"""Land-cover polygons: GDAL's C polygoniser (fast path) against rasterio.features.shapes in
strips (reference path), and both against regions counted independently of GDAL."""

from __future__ import annotations

import ctypes
import sys

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize
from skimage.measure import label

from geodino import vectorize
from geodino.classes import ClassTable, LandCoverClass
from geodino.errors import OutputExistsError
from geodino.export import polygonize

CLASSES = ClassTable(classes=tuple(LandCoverClass(c, f"kind {c}", (c, c, c)) for c in (1, 2, 3, 4)), nodata=255)
UTM = Affine(0.6, 0, 500000.0, 0, -0.6, 5000000.0)  # 0.6 m: coordinates that float arithmetic rounds
STRIP = 40  # reference path's strips: many borders across a small raster


def class_map(shape=(203, 317), seed=0, nodata=255, unnamed=7) -> np.ndarray:
    """Blobs of four classes with holes, single pixels, a nodata area and a class not in CLASSES."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 5, size=(shape[0] // 8 + 1, shape[1] // 8 + 1))
    data = np.kron(coarse, np.ones((8, 8), int))[: shape[0], : shape[1]]
    speckle = rng.random(shape) < 0.08
    data[speckle] = rng.integers(1, 5, size=int(speckle.sum()))
    data[60:90, 100:180] = nodata  # a hole in whatever surrounds it, crossing strip borders
    data[150:153, 10:13] = nodata
    data[5:9, 250:256] = unnamed
    return data.astype(np.uint8)


def write(path, data, *, crs="EPSG:32633", transform=UTM, nodata=255, dtype=None, block=64):
    profile = {"driver": "GTiff", "width": data.shape[1], "height": data.shape[0], "count": 1,
               "dtype": dtype or data.dtype.name, "crs": crs, "transform": transform, "nodata": nodata,
               "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(profile["dtype"]), 1)
    return path


def both_paths(monkeypatch, raster, tmp_path, **kw):
    """(fast, reference) GeoDataFrames of the same raster."""
    assert vectorize.gdal_library() is not None
    fast = gpd.read_file(polygonize(raster, tmp_path / "fast.gpkg", CLASSES, strip_rows=STRIP, **kw))
    with monkeypatch.context() as m:
        m.setattr(vectorize, "gdal_library", lambda: None)
        ref = gpd.read_file(polygonize(raster, tmp_path / "ref.gpkg", CLASSES, strip_rows=STRIP, **kw))
    return fast, ref


def assert_identical(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame, area_rtol: float = 0.0) -> None:
    """Same rows in the same order: codes, names and areas to the bit, equal geometries."""
    assert len(a) == len(b) > 0
    assert list(a.columns) == list(b.columns) == ["class_code", "class_name", "area_m2", "geometry"]
    assert a.crs == b.crs
    np.testing.assert_array_equal(a["class_code"], b["class_code"])
    np.testing.assert_array_equal(a["class_name"], b["class_name"])
    np.testing.assert_allclose(a["area_m2"], b["area_m2"], rtol=area_rtol, atol=0)
    # the same vertices (a merged polygon may start its rings elsewhere): normalised, exactly equal
    assert shapely.equals_exact(shapely.normalize(a.geometry.values), shapely.normalize(b.geometry.values),
                                tolerance=0).all()


def regions(data: np.ndarray, nodata: int) -> list[tuple[int, int]]:
    """Sorted (class, pixels) of the 4-connected regions, counted without GDAL."""
    ids = label(np.where(data == nodata, 0, data.astype(np.int64) + 1), background=0, connectivity=1)
    counts = np.bincount(ids.ravel())
    kind = np.zeros(ids.max() + 1, np.int64)
    kind[ids.ravel()] = data.ravel()
    return sorted((int(kind[i]), int(counts[i])) for i in range(1, ids.max() + 1))


def test_fast_path_is_rasterios_own_gdal():
    lib = vectorize.gdal_library()
    assert lib is not None, "GDAL's C polygoniser should be reachable through rasterio on Linux"
    assert lib.GDALVersionInfo(b"RELEASE_NAME").decode() == rasterio.__gdal_version__
    # ctypes.CDLL functions drop the GIL during the call (PyDLL ones would keep it)
    assert not lib._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI
    if sys.platform.startswith("linux"):
        # the library the symbols come from is one that was already mapped: no second copy loaded
        info = (ctypes.c_char_p * 4)()
        libc = ctypes.CDLL(None)
        libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        assert libc.dladdr(ctypes.cast(lib.GDALPolygonize, ctypes.c_void_p), info)
        source = info[0].decode()
        assert "gdal" in source.rsplit("/", 1)[-1]
        assert "pyogrio" not in source  # pyogrio's wheel brings its own GDAL (another version)


def test_polygons_are_the_regions_of_the_map(tmp_path, monkeypatch):
    data = class_map()
    raster = write(tmp_path / "lc.tif", data)
    for name, fast in (("fast", True), ("reference", False)):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(vectorize, "gdal_library", lambda: None)
            gdf = gpd.read_file(polygonize(raster, tmp_path / f"{name}.gpkg", CLASSES, strip_rows=STRIP))
        assert pyogrio.list_layers(tmp_path / f"{name}.gpkg")[:, 0].tolist() == ["landcover"]
        assert gdf.crs == "EPSG:32633"
        assert shapely.is_valid(gdf.geometry.values).all() and (gdf.geom_type == "Polygon").all()
        # one polygon per region, each with its area: pixels x 0.36 m², exactly
        pixels = np.rint(gdf["area_m2"] / 0.36).astype(int)
        np.testing.assert_array_equal(gdf["area_m2"], pixels * 0.36)
        assert sorted(zip(gdf["class_code"].astype(int), pixels)) == regions(data, 255)
        assert set(gdf["class_name"]) == {"kind 1", "kind 2", "kind 3", "kind 4", "class 7"}
        assert (gdf["class_name"] == [f"kind {c}" if c < 5 else f"class {c}" for c in gdf["class_code"]]).all()
        # burnt back into the grid, the polygons give the map again, nodata where there are none
        burnt = rasterize(zip(gdf.geometry, gdf["class_code"]), out_shape=data.shape, transform=UTM, fill=255,
                          dtype="uint8")
        np.testing.assert_array_equal(burnt, data)
        # sorted by class, area (largest first), then top, then left
        top, left = vectorize._top_left(gdf.geometry.values)
        key = list(zip(gdf["class_code"], -gdf["area_m2"], -top, left))
        assert key == sorted(key) and len(set(key)) == len(key)


def test_fast_and_reference_paths_give_the_same_file(tmp_path, monkeypatch):
    raster = write(tmp_path / "lc.tif", class_map(seed=1))
    fast, ref = both_paths(monkeypatch, raster, tmp_path)
    assert_identical(fast, ref)
    # whole-raster tracing leaves no vertex where the reference path's strips were cut
    assert shapely.get_num_coordinates(fast.geometry.values).sum() == \
        shapely.get_num_coordinates(shapely.simplify(fast.geometry.values, 0)).sum()


def test_without_declared_nodata_the_class_tables_nodata_is_left_out(tmp_path, monkeypatch):
    data = class_map(seed=2)
    raster = write(tmp_path / "lc.tif", data, nodata=None)
    fast, ref = both_paths(monkeypatch, raster, tmp_path)
    assert_identical(fast, ref)
    assert 255 not in set(fast["class_code"])
    assert sorted(zip(fast["class_code"], np.rint(fast["area_m2"] / 0.36).astype(int))) == regions(data, 255)


def test_declared_nodata_wins_over_the_class_table(tmp_path, monkeypatch):
    data = class_map(seed=3)
    data[data == 2] = 0  # 0 declared nodata: class 2 gone; 255 is then an ordinary value
    raster = write(tmp_path / "lc.tif", data, nodata=0)
    fast, ref = both_paths(monkeypatch, raster, tmp_path)
    assert_identical(fast, ref)
    assert set(fast["class_code"]) == {1, 3, 4, 7, 255}
    assert sorted(zip(fast["class_code"], np.rint(fast["area_m2"] / 0.36).astype(int))) == regions(data, 0)


def test_geographic_crs_areas_in_utm(tmp_path, monkeypatch):
    from pyproj import Geod

    data = class_map(seed=4)
    transform = Affine(1e-5, 0, 12.3, 0, -1e-5, 47.1)  # ~0.75 x 1.1 m pixels in Austria
    raster = write(tmp_path / "lc.tif", data, crs="EPSG:4326", transform=transform)
    fast, ref = both_paths(monkeypatch, raster, tmp_path)
    # the same vertices, but a merged polygon's rings may start elsewhere: projected to UTM and
    # summed in another order, its area can differ in the last bit or two
    assert_identical(fast, ref, area_rtol=1e-14)
    assert fast.crs == "EPSG:4326"
    geodesic = np.array([abs(Geod(ellps="WGS84").geometry_area_perimeter(g)[0]) for g in fast.geometry])
    np.testing.assert_allclose(fast["area_m2"], geodesic, rtol=2e-3)  # UTM's scale error near its centre


def test_min_area_leaves_out_small_regions(tmp_path, monkeypatch):
    data = class_map(seed=5)
    raster = write(tmp_path / "lc.tif", data)
    fast, ref = both_paths(monkeypatch, raster, tmp_path, min_area=10 * 0.36)
    assert_identical(fast, ref)
    expected = [r for r in regions(data, 255) if r[1] >= 10]
    assert sorted(zip(fast["class_code"], np.rint(fast["area_m2"] / 0.36).astype(int))) == expected
    assert (fast["area_m2"] >= 3.6).all()


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
def test_other_pixel_types(tmp_path, monkeypatch, dtype):
    """Integer types the C polygoniser reads exactly take it; floats the reference path. Same file."""
    data = class_map(seed=6)
    write(tmp_path / "u8.tif", data)
    raster = write(tmp_path / "lc.tif", data, dtype=dtype)
    with rasterio.open(raster) as src:
        assert (vectorize._trace_with_gdal(src, 255) is None) == (dtype == "float32")
    expected = gpd.read_file(polygonize(tmp_path / "u8.tif", tmp_path / "u8.gpkg", CLASSES))
    assert_identical(gpd.read_file(polygonize(raster, tmp_path / "lc.gpkg", CLASSES)), expected)


def test_all_nodata_gives_an_empty_layer(tmp_path, monkeypatch):
    raster = write(tmp_path / "lc.tif", np.full((70, 90), 255, np.uint8))
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(vectorize, "gdal_library", lambda: None)
            gdf = gpd.read_file(polygonize(raster, tmp_path / f"{fast}.gpkg", CLASSES, strip_rows=STRIP))
        assert len(gdf) == 0 and "area_m2" in gdf.columns


def test_no_library_falls_back(monkeypatch):
    """Where rasterio's module does not resolve GDAL's symbols (Windows), or resolves another
    GDAL than rasterio reports, there is no fast path."""
    vectorize.gdal_library.cache_clear()
    try:
        with monkeypatch.context() as m:
            m.setattr(vectorize.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no such library")))
            assert vectorize.gdal_library() is None
        vectorize.gdal_library.cache_clear()
        with monkeypatch.context() as m:
            m.setattr(rasterio, "__gdal_version__", "0.0.1")
            assert vectorize.gdal_library() is None
    finally:
        vectorize.gdal_library.cache_clear()
    assert vectorize.gdal_library() is not None


def test_block_cache_holds_a_row_of_blocks_during_the_trace(tmp_path, monkeypatch):
    """With a cache smaller than a row of blocks, every block would be decoded for each of its rows."""
    raster = write(tmp_path / "lc.tif", class_map(seed=7))
    lib = vectorize.gdal_library()
    seen = []
    polygonize_c = lib.GDALPolygonize
    monkeypatch.setattr(lib, "GDALPolygonize", lambda *a: seen.append(lib.GDALGetCacheMax64()) or polygonize_c(*a))
    before = lib.GDALGetCacheMax64()
    lib.GDALSetCacheMax64(1000)
    try:
        polygonize(raster, tmp_path / "lc.gpkg", CLASSES)
        assert lib.GDALGetCacheMax64() == 1000
    finally:
        lib.GDALSetCacheMax64(before)
    assert seen == [2 * 5 * 64 * 64]  # twice a row of five 64² uint8 blocks


def test_unreadable_raster_raises_and_writes_nothing(tmp_path, monkeypatch):
    raster = write(tmp_path / "lc.tif", class_map(seed=8), block=16)
    blob = bytearray(raster.read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 4000] = b"\xff" * 4000  # compressed tiles turned to garbage
    raster.write_bytes(bytes(blob))
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(vectorize, "gdal_library", lambda: None)
            with pytest.raises(rasterio.errors.RasterioIOError):
                polygonize(raster, tmp_path / "lc.gpkg", CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lc.tif"]


def test_existing_output_needs_overwrite(tmp_path):
    raster = write(tmp_path / "lc.tif", class_map(seed=9))
    (tmp_path / "lc.gpkg").write_text("not ours")
    with pytest.raises(OutputExistsError):
        polygonize(raster, tmp_path / "lc.gpkg", CLASSES)
    assert (tmp_path / "lc.gpkg").read_text() == "not ours"


def test_trace_array_is_rasterio_shapes_without_geojson(monkeypatch):
    """The in-memory helper (crowns, change polygons) gives what rasterio.features.shapes gives."""
    from rasterio.features import shapes

    rng = np.random.default_rng(10)
    ids = label(rng.random((97, 151)) < 0.55, connectivity=1).astype(np.int32)
    keep = ids % 3 != 0
    transform = Affine.translation(40, 1024)
    expected = [(int(v), shapely.geometry.shape(g)) for g, v in shapes(ids, mask=keep, connectivity=4,
                                                                        transform=transform)]
    assert len(expected) > 100
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(vectorize, "gdal_library", lambda: None)
            values, polygons = vectorize.trace_array(ids, keep, transform)
        assert values.tolist() == [v for v, _ in expected]
        assert shapely.to_wkb(polygons).tolist() == shapely.to_wkb(np.array([g for _, g in expected])).tolist()
        empty_values, empty = vectorize.trace_array(ids, np.zeros_like(keep), transform)
        assert len(empty_values) == len(empty) == 0
