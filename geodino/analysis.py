"""Label-free analysis of patch embeddings: similarity to an exemplar, and k-means clusters.

Both work on the (embedding, y, x) patch grid that a run with ``embeddings=True`` makes.
Embeddings come from a run_scene Dataset, an ``embeddings.tif`` (or an output folder with
one), or a scene, which is then run through the engine once (each window inferred once, as
in :func:`geodino.pipeline.write_scene`) into an ``embeddings.tif`` that both analyses then
read block by block, so memory stays flat in scene area.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from geodino.errors import InputError

EMBEDDINGS = "embeddings.tif"
BLOCK_BYTES = 8 * 2**20  # embeddings per dask block: a few of these are in flight at once
STRIP_BYTES = 32 * 2**20  # embeddings per strip when fitting clusters


def block_side(dim: int) -> int:
    """Side of a square block of ``dim``-long embeddings of about BLOCK_BYTES (16..512)."""
    return int(min(512, max(16, (BLOCK_BYTES / (4 * dim)) ** 0.5 // 16 * 16)))


# --------------------------------------------------------------------------------------
# getting embeddings


def _as_patch_grid(emb: xr.DataArray) -> xr.DataArray:
    """(embedding, y, x) with CRS and transform, whatever the source named its dimensions."""
    emb = emb.rename({k: v for k, v in (("y_patch", "y"), ("x_patch", "x"), ("band", "embedding"))
                      if k in emb.dims})
    if emb.dims != ("embedding", "y", "x"):
        raise InputError(f"embeddings must be (embedding, y, x); got dimensions {emb.dims}")
    if emb.rio.crs is None:
        raise InputError("the embeddings have no CRS")
    return emb


def open_embeddings(path: str | Path, block: int | None = None) -> xr.DataArray:
    """An ``embeddings.tif`` (or the one in an output folder) as a lazy (embedding, y, x) DataArray
    in blocks of ``block`` patches a side (default: about 8 MB each, whatever the embedding size)."""
    import rasterio
    import rioxarray

    p = Path(path)
    if p.is_dir():
        p = p / EMBEDDINGS
    if not p.exists():
        raise InputError(f"{p}: no embeddings raster; run with --embeddings (geodino run / features) first")
    if block is None:
        with rasterio.open(p) as src:
            block = block_side(src.count)
    arr = rioxarray.open_rasterio(p, chunks={"band": -1, "y": block, "x": block}, masked=False, lock=False)
    return _as_patch_grid(arr)


def _is_embeddings_file(path: Path) -> bool:
    import rasterio

    if path.is_dir():
        return (path / EMBEDDINGS).exists()
    if path.suffix.lower() not in (".tif", ".tiff") or not path.exists():
        return False
    with rasterio.open(path) as src:
        return (src.descriptions[0] or "").startswith("embedding ")


def embeddings_of(source, *, workdir: str | Path | None = None, quiet: bool = True, **run_options) -> xr.DataArray:
    """The patch embeddings of ``source`` as (embedding, y, x).

    ``source``: a Dataset with ``embeddings`` (lazy or computed), an (embedding, y, x)
    DataArray, an embeddings GeoTIFF or output folder, or a scene (path or DataArray), which
    is run with ``run_options`` (backbone=..., profile=...) into ``workdir/embeddings.tif``.
    """
    if isinstance(source, xr.Dataset):
        if "embeddings" not in source:
            raise InputError("the Dataset has no embeddings; run run_scene(..., embeddings=True)")
        return _as_patch_grid(source["embeddings"])
    if isinstance(source, xr.DataArray) and ("embedding" in source.dims or "y_patch" in source.dims):
        return _as_patch_grid(source)
    if isinstance(source, (str, Path)) and _is_embeddings_file(Path(source)):
        return open_embeddings(source)
    if "backbone" not in run_options:
        raise InputError(f"{source if isinstance(source, (str, Path)) else type(source).__name__}: not embeddings; "
                         "to compute them from a scene, pass backbone= (and the run's other options)")
    return open_embeddings(compute_embeddings(source, workdir or tempfile.mkdtemp(prefix="geodino-emb-"),
                                              quiet=quiet, **run_options))


def compute_embeddings(scene, out_dir: str | Path, *, overwrite: bool = False, quiet: bool = False,
                       **run_options) -> Path:
    """Run ``scene`` through the engine once and write ``out_dir/embeddings.tif``; returns its path."""
    from geodino.options import RunOptions
    from geodino.pipeline import build_run, write_scene

    options = RunOptions.from_mapping(dict(run_options, embeddings=True, polygons=False, quicklook=False),
                                      source="embeddings")
    options.canopy_head = options.landcover_head = options.canopy_model = None
    write_scene(build_run(scene, options), out_dir, overwrite=overwrite, quiet=quiet)
    return Path(out_dir) / EMBEDDINGS


def _materialised(emb: xr.DataArray, workdir: Path) -> xr.DataArray:
    """Embeddings that can be read more than once without recomputing the backbone.

    Computed arrays and file-backed ones are returned as they are; a lazy engine result is
    written once to ``workdir/embeddings.tif`` through the bounded-memory writer.
    """
    if not isinstance(emb.data, da.Array) or emb.encoding.get("source"):  # rioxarray records its file
        return emb
    from geodino.export import RasterOutput, write_rasters
    from geodino.scene import Grid

    grid = Grid(emb.rio.crs, emb.rio.transform(), emb.sizes["x"], emb.sizes["y"])
    path = Path(workdir) / EMBEDDINGS
    write_rasters([RasterOutput(path, emb.rename(embedding="band"), dtype="float32", nodata=float("nan"),
                                descriptions=[f"embedding {i}" for i in range(emb.sizes["embedding"])],
                                grid=grid)], overwrite=True)
    return open_embeddings(path)


# --------------------------------------------------------------------------------------
# exemplars


def _geometries(exemplar, crs):
    """Shapely geometries in ``crs`` from a point (x, y), a geometry, a GeoDataFrame/GeoSeries or a file."""
    import geopandas as gpd
    import shapely

    if isinstance(exemplar, (str, Path)):
        path = Path(exemplar)
        if not path.exists():
            raise InputError(f"{path}: exemplar file not found")
        from geodino.styles import feature_layers

        try:
            layers = feature_layers(path)
            exemplar = gpd.read_file(path, layer=layers[0] if layers else None)
        except (OSError, ValueError, RuntimeError) as e:  # pyogrio's DataSourceError is a RuntimeError
            raise InputError(f"{path}: not a vector file GDAL can read ({e})") from None
    if isinstance(exemplar, (gpd.GeoDataFrame, gpd.GeoSeries)):
        if exemplar.crs is None:
            raise InputError("the exemplar GeoDataFrame has no CRS")
        geoms = list(exemplar.to_crs(crs).geometry.dropna())
        if not geoms:
            raise InputError("the exemplar GeoDataFrame has no geometry")
        return geoms
    if isinstance(exemplar, shapely.Geometry):
        return [exemplar]
    if isinstance(exemplar, (tuple, list, np.ndarray)) and len(exemplar) == 2:
        return [shapely.Point(float(exemplar[0]), float(exemplar[1]))]
    raise InputError(f"exemplar must be a point (x, y), a shapely geometry, a GeoDataFrame or a vector file; "
                     f"got {type(exemplar).__name__}")


def exemplar_mask(exemplar, emb: xr.DataArray) -> np.ndarray:
    """Patches of the exemplar (h, w): those containing its points, with their centres inside its
    polygons (or, for polygons smaller than a patch, those they touch)."""
    from rasterio.features import geometry_mask

    emb = _as_patch_grid(emb)
    transform, shape = emb.rio.transform(), (emb.sizes["y"], emb.sizes["x"])
    mask = np.zeros(shape, bool)
    for geom in _geometries(exemplar, emb.rio.crs):
        if geom.is_empty:
            continue
        if geom.geom_type in ("Point", "MultiPoint"):
            for pt in getattr(geom, "geoms", [geom]):
                col, row = ~transform * (pt.x, pt.y)
                if 0 <= row < shape[0] and 0 <= col < shape[1]:
                    mask[int(row), int(col)] = True
            continue
        inside = geometry_mask([geom], shape, transform, invert=True)
        if not inside.any():
            inside = geometry_mask([geom], shape, transform, invert=True, all_touched=True)
        mask |= inside
    if not mask.any():
        west, south, east, north = emb.rio.bounds()
        raise InputError(f"the exemplar lies outside the scene (bounds {west:.1f}, {south:.1f}, {east:.1f}, "
                         f"{north:.1f} in {emb.rio.crs})")
    return mask


def exemplar_embedding(emb: xr.DataArray, exemplar) -> np.ndarray:
    """The mean embedding of the exemplar's valid patches (only those patches are computed)."""
    emb = _as_patch_grid(emb)
    mask = exemplar_mask(exemplar, emb)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.asarray(emb[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].values, np.float64)
    vectors = box[:, mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]].T
    vectors = vectors[np.isfinite(vectors).all(1)]
    if not len(vectors):
        raise InputError("the exemplar covers only nodata patches")
    return vectors.mean(0)


# --------------------------------------------------------------------------------------
# similarity


def _cosine(block: np.ndarray, unit_ref: np.ndarray) -> np.ndarray:
    x = block.astype(np.float32, copy=False)
    dot = np.tensordot(unit_ref, x, axes=(0, 0))
    norm = np.sqrt(np.einsum("dij,dij->ij", x, x))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (dot / norm).astype(np.float32)
    out[~np.isfinite(out)] = np.nan
    return out


def similarity_map(emb: xr.DataArray, reference: np.ndarray) -> xr.DataArray:
    """Cosine similarity of every patch to ``reference`` (lazy when ``emb`` is); NaN where no embedding."""
    emb = _as_patch_grid(emb)
    ref = np.asarray(reference, np.float32)
    unit = ref / max(float(np.linalg.norm(ref)), 1e-12)
    side = block_side(emb.sizes["embedding"])
    data = emb.data if isinstance(emb.data, da.Array) else da.from_array(emb.data, chunks=(-1, side, side))
    data = data.rechunk({0: -1})
    sim = da.map_blocks(_cosine, data, unit, drop_axis=0, dtype=np.float32)
    out = xr.DataArray(sim, dims=("y", "x"), coords={"y": emb.y, "x": emb.x}, name="similarity",
                       attrs={"long_name": "cosine similarity to the exemplar", "units": "1"})
    return out.rio.write_crs(emb.rio.crs).rio.write_transform(emb.rio.transform())


def similarity(source, exemplar, **run_options) -> xr.DataArray:
    """Cosine similarity of every patch embedding to the exemplar's mean embedding.

    ``source``: as :func:`embeddings_of` takes it (a Dataset, embeddings, or a scene with
    ``backbone=``...); ``exemplar``: a point (x, y) in the embeddings' CRS, a shapely geometry
    (same CRS), a GeoDataFrame (any CRS) or a vector file. Returns a lazy (y, x) DataArray on
    the patch grid: 1 at patches identical in direction to the exemplar, NaN on nodata.
    """
    emb = embeddings_of(source, **run_options)
    return similarity_map(emb, exemplar_embedding(emb, exemplar))


# --------------------------------------------------------------------------------------
# clusters


@dataclass(frozen=True)
class Clusters:
    """A k-means clustering of patch embeddings: labels 1..k (0: nodata) and the centres."""

    labels: xr.DataArray
    centers: np.ndarray  # (k, embedding), unit length
    classes: object  # geodino.classes.ClassTable
    path: Path | None = None


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _strip_vectors(emb: xr.DataArray, r0: int, r1: int):
    """Valid unit-length vectors of rows r0..r1 and their flat (row-major) patch indexes."""
    block = np.asarray(emb[:, r0:r1, :].values, np.float32)
    flat = block.reshape(block.shape[0], -1).T
    ok = np.isfinite(flat).all(1)
    index = np.arange(r0 * emb.sizes["x"], r1 * emb.sizes["x"], dtype=np.int64)[ok]
    return _unit_rows(flat[ok]), index


def _kept(index: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """A pseudo-random subset of patches fixed by their global index and the seed (so it does
    not depend on how the scene is cut into blocks): splitmix64 of (index, seed)."""
    if fraction >= 1:
        return np.ones(index.shape, bool)
    z = index.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def fit_clusters(emb: xr.DataArray, k: int, *, seed: int = 0, block_rows: int | None = None,
                 batch_size: int = 2048, max_samples: int = 200_000, epochs: int = 3,
                 progress: bool | None = False):
    """Fit MiniBatchKMeans (cosine: on unit-length embeddings) with ``partial_fit``, streaming
    strips of ``block_rows`` patch rows.

    Samples reach ``partial_fit`` in fixed batches of ``batch_size`` in row-major order, and
    the subsample (at most ``max_samples`` patches) is fixed by patch position and seed, so the
    result does not depend on ``block_rows`` (memory only). Returns the fitted estimator.
    ``progress``: show strips done (None: on a terminal, plain lines otherwise).
    """
    from sklearn.cluster import MiniBatchKMeans

    from geodino.progress import Progress

    emb = _as_patch_grid(emb)
    h, w = emb.sizes["y"], emb.sizes["x"]
    # strips of about STRIP_BYTES: memory does not grow with the scene's width
    block_rows = block_rows or max(1, STRIP_BYTES // (4 * emb.sizes["embedding"] * w))
    fraction = min(1.0, max_samples / max(1, h * w))
    model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3)
    pending, seen = [], 0
    strips = range(0, h, block_rows)
    with Progress("k-means", total=epochs * len(strips), unit="strips", enabled=progress) as bar:
        for _ in range(epochs):
            for r0 in strips:
                vectors, index = _strip_vectors(emb, r0, min(h, r0 + block_rows))
                pending.append(vectors[_kept(index, seed, fraction)])
                buffered = np.concatenate(pending)
                full = len(buffered) // batch_size * batch_size
                for b in range(0, full, batch_size):
                    model.partial_fit(buffered[b:b + batch_size])
                seen += full
                pending = [buffered[full:]]
                bar.advance(1)
    rest = np.concatenate(pending)
    if len(rest) and (seen or len(rest) >= k):
        model.partial_fit(rest)
        seen += len(rest)
    if not seen:
        raise InputError(f"{len(rest)} valid patches: too few for k={k} clusters")
    return model


def _predict(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    x = block.reshape(block.shape[0], -1).T.astype(np.float32)
    ok = np.isfinite(x).all(1)
    labels = np.zeros(x.shape[0], np.uint8)
    if ok.any():
        unit = _unit_rows(x[ok])
        # nearest centre in Euclidean distance between unit vectors (what k-means fitted)
        d = (unit ** 2).sum(1)[:, None] - 2 * unit @ centers.T + (centers ** 2).sum(1)[None]
        labels[ok] = np.argmin(d, axis=1).astype(np.uint8) + 1
    return labels.reshape(block.shape[1:])


def cluster_table(k: int):
    """Class table for clusters 1..k (0: nodata) with distinct qualitative colours."""
    import matplotlib

    from geodino.classes import ClassTable, LandCoverClass

    if k <= 20:
        colors = matplotlib.colormaps["tab20" if k > 10 else "tab10"].colors[:k]
    else:
        colors = matplotlib.colormaps["hsv"](np.linspace(0, 1, k, endpoint=False))[:, :3]
    return ClassTable(tuple(LandCoverClass(i + 1, f"cluster {i + 1}", tuple(round(v * 255) for v in rgb[:3]))
                            for i, rgb in enumerate(colors)), nodata=0)


def cluster(source, k: int = 8, *, seed: int = 0, block_rows: int | None = None, out: str | Path | None = None,
            overwrite: bool = False, max_samples: int = 200_000, epochs: int = 3, progress: bool | None = False,
            **run_options) -> Clusters:
    """Streaming k-means of the patch embeddings into ``k`` clusters (labels 1..k, 0 nodata).

    ``source``: as :func:`embeddings_of` takes it; a lazy engine result or a scene is
    written once to ``out/embeddings.tif`` (or a temporary folder) and read back in strips.
    With ``out``, the cluster map is written as ``out/clusters.tif`` (COG with a colour table
    and class names) plus ``clusters.qml`` for QGIS.
    """
    from geodino.export import RasterOutput, check_writable, write_rasters
    from geodino.styles import landcover_qml, write_qml

    if not 2 <= int(k) <= 254:
        raise InputError(f"k must be between 2 and 254 (uint8 labels with 0 as nodata); got {k}")
    target = Path(out) if out is not None else None
    if target is not None:
        check_writable([target / "clusters.tif"], overwrite)
    emb = embeddings_of(source, workdir=target, **run_options)
    emb = _materialised(emb, target or Path(tempfile.mkdtemp(prefix="geodino-clusters-")))
    model = fit_clusters(emb, int(k), seed=seed, block_rows=block_rows, max_samples=max_samples, epochs=epochs,
                         progress=progress)
    centers = _unit_rows(model.cluster_centers_.astype(np.float32))
    side = block_side(emb.sizes["embedding"])
    data = emb.data if isinstance(emb.data, da.Array) else da.from_array(emb.data, chunks=(-1, side, side))
    labels = da.map_blocks(_predict, data.rechunk({0: -1}), centers, drop_axis=0, dtype=np.uint8)
    classes = cluster_table(int(k))
    arr = xr.DataArray(labels, dims=("y", "x"), coords={"y": emb.y, "x": emb.x}, name="clusters",
                       attrs={"long_name": f"k-means clusters of patch embeddings (k={k}, seed={seed})",
                              "class_codes": classes.codes, "class_names": classes.names, "_FillValue": 0,
                              "class_colors": [v for c in classes.classes for v in c.color]})
    arr = arr.rio.write_crs(emb.rio.crs).rio.write_transform(emb.rio.transform())
    path = None
    if target is not None:
        from geodino.scene import Grid

        grid = Grid(emb.rio.crs, emb.rio.transform(), emb.sizes["x"], emb.sizes["y"])
        path = target / "clusters.tif"
        write_rasters([RasterOutput(path, arr.expand_dims(band=1), dtype="uint8", nodata=0,
                                    descriptions=["cluster"], classes=classes, overview_resampling="mode",
                                    tags={"method": "MiniBatchKMeans on unit-length patch embeddings",
                                          "k": k, "seed": seed}, grid=grid)], overwrite=overwrite)
        write_qml(target / "clusters.qml", landcover_qml(classes))
    return Clusters(arr, centers, classes, path)


def parse_exemplar(text: str):
    """An exemplar from the command line: ``x,y`` in the scene's CRS, or a vector file."""
    parts = text.split(",")
    if len(parts) == 2:
        try:
            return float(parts[0]), float(parts[1])
        except ValueError:
            pass
    if not Path(text).exists():
        raise InputError(f"--exemplar {text!r}: neither x,y coordinates nor an existing vector file")
    return Path(text)


def write_similarity(source, exemplar, out: str | Path, *, overwrite: bool = False, **run_options) -> Path:
    """``out/similarity.tif``: the similarity map as a float32 COG on the patch grid, written
    block by block from the embeddings (computed once into ``out/embeddings.tif`` for a scene)."""
    from geodino.export import RasterOutput, check_writable, write_rasters
    from geodino.scene import Grid

    target = Path(out)
    path = target / "similarity.tif"
    check_writable([path], overwrite)
    emb = _materialised(embeddings_of(source, workdir=target, **run_options), target)
    reference = exemplar_embedding(emb, exemplar)
    sim = similarity_map(emb, reference)
    grid = Grid(emb.rio.crs, emb.rio.transform(), emb.sizes["x"], emb.sizes["y"])
    label = str(exemplar) if isinstance(exemplar, (str, Path, tuple)) else type(exemplar).__name__
    write_rasters([RasterOutput(path, sim.expand_dims(band=1), dtype="float32", nodata=float("nan"),
                                descriptions=["cosine similarity to the exemplar"], units="1",
                                tags={"exemplar": label, "method": "cosine similarity to the mean exemplar embedding"},
                                overview_resampling="average", grid=grid)], overwrite=overwrite)
    return path


__all__ = [
    "Clusters",
    "cluster",
    "cluster_table",
    "compute_embeddings",
    "embeddings_of",
    "exemplar_embedding",
    "exemplar_mask",
    "fit_clusters",
    "open_embeddings",
    "parse_exemplar",
    "similarity",
    "similarity_map",
    "write_similarity",
]
