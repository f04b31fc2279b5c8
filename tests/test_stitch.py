from __future__ import annotations

import os

import dask
import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from geodino.errors import OutputExistsError
from geodino.export import RasterOutput, write_rasters
from geodino.scene import open_scene
from geodino.sensor import prepare
from geodino.stitch import OutputSpec, stitch
from geodino.tiling import WindowSpec, window_grid
from tests.conftest import realdata
from tests.models import CountingFailure, PatchLinear

OUTPUTS = {"value": OutputSpec(2, 1), "patch": OutputSpec(96, 16)}


@pytest.fixture(scope="module")
def collar_inputs(collar_scene):
    scene, norm = prepare(open_scene(collar_scene.scene), "reflectance", "sat")
    return scene, norm


def _stitched(scene, norm, model, *, size=128, overlap=32, batch_size=4, chunks=256, tiles=None):
    spec = WindowSpec(size, overlap)
    tiles = tiles if tiles is not None else window_grid(scene.grid.height, scene.grid.width, spec)
    return stitch(scene, norm, tiles, model, OUTPUTS, overlap=overlap, batch_size=batch_size, chunks=chunks)


def test_chunks_batches_order_and_schedulers_do_not_change_results(collar_inputs, tiny_models, tmp_path):
    scene, norm = collar_inputs
    model = PatchLinear(tiny_models["backbone"])
    calls = []

    def counting(inputs):
        calls.append(len(inputs))
        return model(inputs)

    counting.token = "counting"
    base = _stitched(scene, norm, counting, chunks=1024, batch_size=4)
    with dask.config.set(scheduler="threads"):
        values, patches = dask.compute(base["value"], base["patch"])  # one pass for both outputs
    ref = {"value": values.values, "patch": patches.values}
    tiles = window_grid(scene.grid.height, scene.grid.width, WindowSpec(128, 32))
    non_empty = sum(1 for t in tiles if open_scene(scene.paths[0]).read(t.window)[1].any())
    # every window with valid pixels inferred exactly once, both outputs from the same pass
    assert sum(calls) == non_empty
    variants = [dict(chunks=96), dict(chunks=200), dict(chunks=333, batch_size=1), dict(batch_size=7),
                dict(tiles=list(reversed(tiles)))]
    for kw in variants:
        out = _stitched(scene, norm, model, **kw)
        with dask.config.set(scheduler="threads"):
            np.testing.assert_allclose(out["value"].values, ref["value"], atol=1e-5, equal_nan=True, err_msg=str(kw))
            np.testing.assert_allclose(out["patch"].values, ref["patch"], atol=1e-5, equal_nan=True)
    # streamed to a raster row of blocks by row of blocks: the same values, each window once
    calls.clear()
    streamed = _stitched(scene, norm, counting, chunks=96, batch_size=3)
    target = tmp_path / "streamed.tif"
    write_rasters([RasterOutput(target, streamed["value"], dtype="float32", nodata=float("nan"),
                                grid=scene.grid)])
    assert sum(calls) == non_empty
    with rasterio.open(target) as d:
        np.testing.assert_allclose(d.read(), ref["value"], atol=1e-5, equal_nan=True)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        out = _stitched(scene, norm, model, chunks=160)
        np.testing.assert_allclose(out["value"].values, ref["value"], atol=1e-5, equal_nan=True)
        out = _stitched(scene, norm, model, chunks=160)
        write_rasters([RasterOutput(tmp_path / "distributed.tif", out["value"], dtype="float32",
                                    nodata=float("nan"), grid=scene.grid)])
        with rasterio.open(tmp_path / "distributed.tif") as d:
            np.testing.assert_allclose(d.read(), ref["value"], atol=1e-5, equal_nan=True)
    # nodata exactly where the scene has no valid pixel
    _, valid = scene.read(rasterio.windows.Window(0, 0, scene.grid.width, scene.grid.height))
    np.testing.assert_array_equal(np.isnan(ref["value"][0]), ~valid)


def test_class_output_identical_across_chunks(collar_scene, tiny_models, tmp_path):
    from geodino.pipeline import RunOptions, build_run

    outs = []
    for chunks, batch in ((64, 1), (300, 3), (2048, 8)):
        opts = RunOptions(backbone=tiny_models["backbone"], landcover_head=tiny_models["landcover"],
                          window=128, overlap=32, chunks=chunks, batch_size=batch)
        ds = build_run(str(collar_scene.scene), opts).dataset
        with dask.config.set(scheduler="threads"):
            outs.append(ds["landcover"].values)
    assert len(np.unique(outs[0])) > 1
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def _single_pass_and_stitched(small_scene, tiny_models, overlap):
    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    model = PatchLinear(tiny_models["backbone"], channels=1)
    # the whole 576 x 640 scene in one window (640 x 640, padded)
    whole = _stitched(scene, norm, model, size=640, overlap=0)["value"].values[0]
    tiled = _stitched(scene, norm, model, size=256, overlap=overlap)["value"].values[0]
    return whole, tiled, window_grid(576, 640, WindowSpec(256, overlap))


def test_tiling_fidelity_and_no_seams(small_scene, tiny_models):
    whole, tiled, tiles = _single_pass_and_stitched(small_scene, tiny_models, overlap=64)
    rel_rmse = np.sqrt(np.mean((whole - tiled) ** 2)) / whole.std()
    assert rel_rmse < 0.12, rel_rmse  # measured 0.070 (hard cuts without overlap: 0.21)

    def border_step(img, tiles):
        cols = sorted({t.col + t.size for t in tiles if t.col + t.size < img.shape[1]})
        starts = sorted({t.col for t in tiles if t.col > 0})
        edges = [c for c in cols + starts]
        d = np.abs(np.diff(img, axis=1))
        at_edges = np.mean([d[:, c - 1].mean() for c in edges])
        return at_edges / d.mean()

    # with the raised-cosine blend, window edges are no rougher than the rest of the image
    assert border_step(tiled, tiles) < 1.3
    # a hard cut (no overlap) shows the steps this test is looking for
    _, hard, hard_tiles = _single_pass_and_stitched(small_scene, tiny_models, overlap=0)
    assert border_step(hard, hard_tiles) > border_step(tiled, tiles) * 1.3


def test_export_georeference_cog_and_metadata(collar_scene, tiny_models, tmp_path):
    from geodino.pipeline import RunOptions, build_run, write_scene

    opts = RunOptions(backbone=tiny_models["backbone"], canopy_head=tiny_models["canopy"],
                      landcover_head=tiny_models["landcover"], window=128, overlap=32, embeddings=True)
    run = build_run(str(collar_scene.scene), opts)
    report = write_scene(run, tmp_path, quiet=True)
    with rasterio.open(collar_scene.scene) as src:
        crs, transform, shape, valid = src.crs, src.transform, src.shape, src.dataset_mask() > 0
    for name in ("canopy_height", "landcover"):
        path = tmp_path / f"{name}.tif"
        assert cog_validate(str(path))[0], cog_validate(str(path))
        with rasterio.open(path) as d:
            assert d.crs == crs and d.transform == transform and d.shape == shape
            assert d.block_shapes[0] == (512, 512) and d.overviews(1) == [2]
            assert d.compression.name.upper() == "DEFLATE"
            tags = d.tags()
            assert tags["geodino_version"] and tags["window"] == "128" and tags["overlap"] == "32"
            # model paths are recorded relative to the output folder, never as this machine's absolute path
            assert tags["sensor_profile"] == "reflectance"
            assert tags["backbone"] == os.path.relpath(tiny_models["backbone"], tmp_path)
    with rasterio.open(tmp_path / "canopy_height.tif") as d:
        chm = d.read(1)
        assert d.units == ("m",) and d.descriptions == ("canopy height",) and np.isnan(d.nodata)
    np.testing.assert_array_equal(np.isnan(chm), ~valid)
    assert (chm[valid] >= 0).all()
    with rasterio.open(tmp_path / "landcover.tif") as d:
        lc = d.read(1)
        assert d.nodata == 0 and d.colormap(1)[10][:3] == (0, 100, 0)
        assert d.tags(1)["class_names"].split(",")[-1] == "Permanent water bodies"
    np.testing.assert_array_equal(lc == 0, ~valid)
    with rasterio.open(tmp_path / "embeddings.tif") as d:
        assert d.count == 96 and d.transform == transform * rasterio.Affine.scale(16)
        assert d.shape == (-(-shape[0] // 16), -(-shape[1] // 16))
    assert report["windows"] == len(run.tiles) and report["complete"]
    # refuses to overwrite without --overwrite
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_scene(build_run(str(collar_scene.scene), opts), tmp_path, quiet=True)


def test_interrupted_write_leaves_nothing(small_scene, tiny_models, tmp_path):
    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    model = CountingFailure(PatchLinear(tiny_models["backbone"]), fail_at=3)
    out = _stitched(scene, norm, model, batch_size=2)
    target = tmp_path / "value.tif"
    with pytest.raises(KeyboardInterrupt):
        with dask.config.set(scheduler="sync"):
            write_rasters([RasterOutput(target, out["value"], dtype="float32", nodata=float("nan"))])
    assert list(tmp_path.iterdir()) == []


def test_realdata_rgb_byte_nodata_exactly_outside_footprint(tiny_models, tmp_path):
    from geodino.pipeline import RunOptions, build_run, write_scene

    path = realdata("RGB.byte.tif")
    opts = RunOptions(backbone=tiny_models["backbone"], canopy_head=tiny_models["canopy"],
                      landcover_head=tiny_models["landcover"], profile="rgb8", window=256, overlap=64)
    write_scene(build_run(str(path), opts), tmp_path, quiet=True)
    with rasterio.open(path) as src:
        valid = src.dataset_mask() > 0
        transform = src.transform
    with rasterio.open(tmp_path / "landcover.tif") as d:
        assert d.transform == transform
        np.testing.assert_array_equal(d.read(1) == 0, ~valid)
    with rasterio.open(tmp_path / "canopy_height.tif") as d:
        np.testing.assert_array_equal(np.isnan(d.read(1)), ~valid)


class _BandMean:
    token = "band-mean"

    def __call__(self, x):
        return {"value": x.mean(axis=1, keepdims=True), "patch": x[:, :1, ::16, ::16].copy()}


def test_blocks_start_where_windows_start_and_only_the_overlap_is_held(small_scene, monkeypatch):
    """Between rows of blocks only the overlap strip of the row above is kept (DESIGN 7)."""
    import geodino.stream as stream
    from geodino.stitch import block_size
    from geodino.stream import stream_blocks

    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    assert block_size(256, 128, 32) == 192 and block_size(64, 128, 32) == 64
    out = stitch(scene, norm, window_grid(576, 640, WindowSpec(128, 32)), _BandMean(),
                 {"value": OutputSpec(1), "patch": OutputSpec(1, 16)}, overlap=32, batch_size=4, chunks=200)
    value = out["value"].data
    assert value.chunks[1] == (192, 192, 192) and value.chunks[2] == (192, 192, 192, 64)
    assert out["patch"].data.chunks[1] == (12, 12, 12)  # coarse outputs: chunks // scale
    held = []  # (first row of the blocks computed, rows of each window result passed in as data)
    real_as_data = stream._as_data

    def as_data(key, value):
        held.append([(name, res.tile.row, res.row, res.values.shape[-2])
                     for name, results in value.items() for res in results])
        return real_as_data(key, value)

    monkeypatch.setattr(stream, "_as_data", as_data)
    blocks = {}
    for index, (rows, cols), block in stream_blocks([value]):
        blocks[(rows.start, cols.start)] = block
    with dask.config.set(scheduler="threads"):
        ref = value.compute()
    for (r, c), block in blocks.items():
        np.testing.assert_array_equal(block, ref[:, r:r + block.shape[1], c:c + block.shape[2]])
    # every held result from a row of windows above is its 32-pixel overlap strip (or less)
    strips = [(start, rows) for results in held for name, tile_row, start, rows in results
              if name == "value" and tile_row < start]
    assert strips and all(start % 192 == 0 and rows <= 32 for start, rows in strips), strips
    assert all(not [r for r in results if r[0] == "patch"] for results in held)  # unused output: dropped


def test_with_an_upsampled_output_rows_of_blocks_end_before_the_next_row_of_windows(small_scene, monkeypatch):
    """A full-resolution block of an upsampled output interpolates one coarse pixel past its
    end. Blocks that ended where the next row (column) of windows starts needed that row:
    none of a row of blocks was made before the next row of windows was inferred, and a block
    combining both outputs (a change's classes: heights and land cover) held the whole
    windows of its own row meanwhile, for every date, across the scene's width. Blocks now
    end a shift earlier: every block needs only windows that start before it ends, and held
    results of rows above are strips of the overlap plus the shift."""
    import dask.array as da
    from dask.core import flatten
    from dask.optimization import cull

    import geodino.stream as stream
    from geodino.stitch import VALID
    from geodino.stream import _is_batch, stream_blocks

    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    out = stitch(scene, norm, window_grid(576, 640, WindowSpec(128, 32)), _BandMean(),
                 {"value": OutputSpec(1), "patch": OutputSpec(1, 16, upsample=True)}, overlap=32, batch_size=4,
                 chunks=200)
    value, patch = out["value"].data, out["patch"].data
    assert value.chunks == patch.chunks
    graph = dict(patch.__dask_graph__())
    tiles = window_grid(576, 640, WindowSpec(128, 32))
    row_ends, col_ends = np.cumsum(patch.chunks[1]), np.cumsum(patch.chunks[2])
    for key in flatten(patch.__dask_keys__()):
        _, _, i, j = key
        last = max(k[1] for k in cull(graph, [key])[0] if _is_batch(k))  # batches of 4 windows, row-major
        own = max(t.index for t in tiles if t.row < row_ends[i] and t.col < col_ends[j])
        assert last == own // 4, key  # not a batch of a window starting after the block
    both = da.map_blocks(np.add, value, patch, dtype=np.float32)  # needs both outputs' blocks
    held = []
    real_as_data = stream._as_data

    def as_data(key, value):
        held.append([(name, res.tile.row, res.row, (res.values if res.values is not None else res.mask).shape[-2])
                     for name, results in value.items() for res in results])
        return real_as_data(key, value)

    monkeypatch.setattr(stream, "_as_data", as_data)
    blocks = {(rows.start, cols.start): block for _, (rows, cols), block in stream_blocks([both])}
    with dask.config.set(scheduler="threads"):
        ref = both.compute()
    for (r, c), block in blocks.items():
        np.testing.assert_array_equal(block, ref[:, r:r + block.shape[1], c:c + block.shape[2]])
    strips = [rows for results in held for name, tile_row, start, rows in results
              if name in ("value", VALID) and tile_row < start]
    assert strips and max(strips) <= 32 + 32, strips


def test_streamed_graph_has_one_task_per_block_and_the_same_blocks(small_scene):
    """xarray's selections over the stitched blocks run inside the block tasks (a task costs
    dask.distributed ~1 ms); the streamed blocks equal dask's own computation of them."""
    from dask.core import flatten
    from dask.highlevelgraph import HighLevelGraph

    from geodino.stream import _fused, _is_batch, stream_blocks

    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    out = stitch(scene, norm, window_grid(576, 640, WindowSpec(128, 32)), _BandMean(),
                 {"value": OutputSpec(1)}, overlap=32, batch_size=4, chunks=200)
    value = out["value"].isel(band=0).expand_dims(band=1).data  # as the pipeline writes it
    graph = dict(HighLevelGraph.merge(value.__dask_graph__()))
    keys = list(flatten(value.__dask_keys__()))
    fused = _fused(dict(graph), keys)
    batches = [k for k in graph if _is_batch(k)]
    assert len(graph) == 3 * len(keys) + len(batches)  # assemble, isel, expand_dims per block
    assert set(fused) == set(keys) | set(batches)
    with dask.config.set(scheduler="threads"):
        ref = value.compute()
    for _, (rows, cols), block in stream_blocks([value]):
        np.testing.assert_array_equal(block, ref[:, rows, cols])


def test_intermediate_tiles_divide_block_boundaries():
    from geodino.export import stream_tile_size

    assert stream_tile_size(((1,), (448, 448, 448, 100), (448, 448, 200))) == 64
    assert stream_tile_size(((1,), (512, 512, 10), (512, 3))) == 512
    assert stream_tile_size(((1,), (96, 96, 5), (96, 7))) == 32
    assert stream_tile_size(((1,), (200, 200, 5), (200,))) == 512  # no power of two >= 16 fits: GDAL's cache copes


def test_normalising_in_place_gives_the_same_bits(small_scene):
    scene, norm = prepare(open_scene(small_scene.scene), "reflectance", "sat")
    raw, valid = scene.read(rasterio.windows.Window(0, 0, 64, 64))
    copy = norm(raw, valid)
    inplace = norm(raw.copy(), valid, inplace=True)
    np.testing.assert_array_equal(copy, inplace)
    assert copy.dtype == np.float32 and raw.dtype == np.float32
    ints = norm(raw.astype(np.uint16))  # integer input: a new float32 array
    assert ints.dtype == np.float32


class _PatchLogits:
    """Tiny DINOv3 + a fixed linear map to 3 'logits' on the patch grid (no upsampling)."""

    token = "patch-logits"

    def __init__(self, backbone_dir: str) -> None:
        self.inner = PatchLinear(backbone_dir, channels=3)

    def __call__(self, inputs):
        bb, w = self.inner._load()
        import torch

        with torch.inference_mode():
            grid = bb(torch.from_numpy(inputs)).patches
            logits = torch.einsum("cd,bdhw->bchw", w, grid).numpy()
            return {"logits": logits, "sums": logits}


def test_upsampled_outputs_blend_on_the_patch_grid_and_do_not_depend_on_chunks(collar_inputs, tiny_models):
    """Patch-grid values blended there, interpolated per block: the same as over the whole grid."""
    import math

    import torch

    scene, norm = collar_inputs
    model = _PatchLogits(tiny_models["backbone"])
    tiles = window_grid(scene.grid.height, scene.grid.width, WindowSpec(128, 32))
    spec = {"logits": OutputSpec(3, 16, upsample=True), "sums": OutputSpec(3, 16)}

    def run(**kw):
        args = dict(overlap=32, batch_size=4, chunks=256) | kw
        out = stitch(scene, norm, kw.pop("tiles", tiles), model, spec, **{k: v for k, v in args.items()
                                                                          if k != "tiles"})
        with dask.config.set(scheduler="threads"):
            return out["logits"].values, out["sums"].values

    up, coarse = run()
    h, w = scene.grid.height, scene.grid.width
    assert up.shape == (3, h, w) and coarse.shape == (3, math.ceil(h / 16), math.ceil(w / 16))
    # reference: the normalised convolution over the whole coarse grid at once
    import geodino.stitch as st

    batches = [st.run_batch(scene, norm, tiles[i:i + 4], model, spec, 32) for i in range(0, len(tiles), 4)]
    acc, wsum = st._accumulate("logits", 3, 0, coarse.shape[1], 0, coarse.shape[2], batches)
    big = torch.nn.functional.interpolate(torch.from_numpy(np.concatenate([acc, wsum[None]]))[None],
                                          scale_factor=16, mode="bilinear", align_corners=False)[0].numpy()
    _, valid = scene.read(rasterio.windows.Window(0, 0, w, h))
    ref = np.where(valid, big[:3, :h, :w] / np.where(valid, big[3, :h, :w], 1), np.nan)
    np.testing.assert_allclose(up, ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    # nodata exactly where the scene has no valid pixel; the coarse blend is the plain patch output
    np.testing.assert_array_equal(np.isnan(up[0]), ~valid)
    np.testing.assert_allclose(coarse, np.where(wsum > 0, acc / np.where(wsum > 0, wsum, 1), np.nan), rtol=1e-6,
                               equal_nan=True)
    # chunks change nothing, bit for bit (the same sums in the same order) ...
    for chunks in (64, 200, 1000):
        np.testing.assert_array_equal(run(chunks=chunks)[0], up, err_msg=str(chunks))
    # ... and batches and window order nothing beyond the model's own batch-size rounding (1e-5)
    for kw in (dict(chunks=200, batch_size=1), dict(batch_size=7), dict(tiles=list(reversed(tiles)))):
        np.testing.assert_allclose(run(**kw)[0], up, atol=1e-5, equal_nan=True, err_msg=str(kw))


def _reference_codes(acc, wsum, valid, scale, origin, block, codes, nodata):
    """The class codes as made before geodino.upsample: F.interpolate over the whole region
    (strides that are not powers of two: the same interpolation from global positions), cut, divided into a float block, NaN where invalid, then a running argmax of that block."""
    import torch

    (pr0, pc0), (r0, c0), (h, w) = origin, block, valid.shape
    if scale & (scale - 1):  # not a power of two: interpolated from global positions, not torch's
        from geodino.upsample import _interpolate_global

        up = _interpolate_global(acc, wsum, scale, origin, (pr0 * scale, pc0 * scale),
                                 (acc.shape[1] * scale, acc.shape[2] * scale))
    else:
        stack = torch.from_numpy(np.concatenate([acc, wsum[None]]).transpose(1, 2, 0)[None]).permute(0, 3, 1, 2)
        up = torch.nn.functional.interpolate(stack, scale_factor=scale, mode="bilinear", align_corners=False)[0]
        up = up.numpy()
    up = up[:, r0 - pr0 * scale:r0 - pr0 * scale + h, c0 - pc0 * scale:c0 - pc0 * scale + w]
    with np.errstate(divide="ignore", invalid="ignore"):
        logits = up[:-1] / up[-1]
    logits[:, ~valid] = np.nan
    best, top = np.zeros((h, w), np.uint8), logits[0].copy()
    for k in range(1, len(logits)):
        best[logits[k] > top] = k
        np.maximum(top, logits[k], out=top)
    out = codes[best]
    out[np.isnan(top)] = nodata
    return out


def test_class_codes_are_the_argmax_of_the_upsampled_logits_bit_for_bit():
    """Fused interpolation, division and argmax give the codes of the float blocks they replace,
    on every block of random and adversarial patch grids (ties, near ties, NaN nodes, nodes
    without weight, nodata pixels, scene edges, tiny and odd-sized scenes, several scales)."""
    import math

    from geodino.stitch import coarse_rect
    from geodino.upsample import argmax_codes, interpolate_block, upsample_block

    rng = np.random.default_rng(7)
    codes, nodata = np.array([10, 20, 30, 40, 50, 60, 80], np.uint8), 255
    for trial in range(120):
        s = int(rng.choice([16, 16, 8, 4, 3, 14]))
        h, w = int(rng.integers(1, 260)), int(rng.integers(1, 260))
        ch, cw, c = math.ceil(h / s), math.ceil(w / s), int(rng.choice([7, 7, 2]))
        wsum = rng.uniform(0.5, 300, (ch, cw)).astype(np.float32)
        kind = trial % 4
        if kind == 0:
            logits = rng.standard_normal((c, ch, cw)).astype(np.float32) * 3
        elif kind == 1:  # integer logits: exact ties between channels
            logits = np.round(rng.standard_normal((c, ch, cw))).astype(np.float32)
        elif kind == 2:  # near ties: one ulp apart, or equal
            logits = rng.standard_normal((c, ch, cw)).astype(np.float32)
            logits[-1] = np.nextafter(logits[0], np.float32(9)) if trial % 8 < 4 else logits[0]
        else:  # a small spread around a large value
            logits = (rng.standard_normal((c, ch, cw)) * 1e-3 + 5).astype(np.float32)
        acc = (logits * wsum).astype(np.float32)
        holes = rng.random((ch, cw)) < 0.15
        wsum[holes], acc[:, holes] = 0, 0
        if trial % 5 == 0:
            acc[rng.integers(0, c), rng.integers(0, ch), rng.integers(0, cw)] = np.nan
        valid = rng.random((h, w)) < (0.95 if trial % 2 else 2)
        for size in (int(rng.integers(1, 90)), 64, 10**6):
            for r0 in range(0, h, size):
                for c0 in range(0, w, size):
                    r1, c1 = min(h, r0 + size), min(w, c0 + size)
                    pr0, pr1, pc0, pc1 = coarse_rect(r0, r1, c0, c1, s, (ch, cw))
                    a, ws, v = acc[:, pr0:pr1, pc0:pc1], wsum[pr0:pr1, pc0:pc1], valid[r0:r1, c0:c1]
                    ref = _reference_codes(a, ws, v, s, (pr0, pc0), (r0, c0), codes[:c], nodata)
                    up = interpolate_block(a, ws, s, (pr0, pc0), (r0, c0), v.shape)
                    got = argmax_codes(up[:c], codes[:c], nodata, weight=up[c], valid=v)
                    where = f"trial {trial} scale {s} scene {h}x{w} block {r0}:{r1}, {c0}:{c1}"
                    np.testing.assert_array_equal(got, ref, err_msg=where)
                    # the probabilities' float block is cut from the same values
                    floats = upsample_block(a, ws, v, s, (pr0, pc0), (r0, c0))
                    np.testing.assert_array_equal(argmax_codes(floats, codes[:c], nodata), ref, err_msg=where)


def test_class_codes_output_shares_the_batches_and_does_not_depend_on_chunks(collar_inputs, tiny_models):
    """``class_codes`` adds a uint8 map of the upsampled output's argmax, from the same batch
    tasks (the model runs once per window), exact whatever the chunks."""
    from geodino.upsample import argmax_codes

    scene, norm = collar_inputs
    model = _PatchLogits(tiny_models["backbone"])
    tiles = window_grid(scene.grid.height, scene.grid.width, WindowSpec(128, 32))
    spec = {"logits": OutputSpec(3, 16, upsample=True), "sums": OutputSpec(3, 16)}
    codes = np.array([3, 1, 7], np.uint8)
    maps = []
    for chunks in (64, 200, 1000):
        out = stitch(scene, norm, tiles, model, spec, overlap=32, batch_size=4, chunks=chunks,
                     class_codes={"logits": (codes, 255)})
        assert out["logits_codes"].dtype == np.uint8 and out["logits_codes"].rio.nodata == 255
        graph = dict(out["logits_codes"].data.__dask_graph__())
        assert set(k for k in graph if "batch" in k[0]) == set(k for k in out["logits"].data.__dask_graph__()
                                                                 if "batch" in k[0])
        with dask.config.set(scheduler="threads"):
            logits, labels = dask.compute(out["logits"].data, out["logits_codes"].data[0])
        np.testing.assert_array_equal(labels, argmax_codes(logits, codes, 255))
        maps.append(labels)
    assert len(np.unique(maps[0])) > 2 and (maps[0] == 255).any()
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(maps[0], maps[2])
