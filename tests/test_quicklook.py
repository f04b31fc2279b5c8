"""The quicklook's single-draw tight PNG and its thinned images: what savefig(bbox_inches="tight")
would show, nothing cut, drawn once."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from geodino import plot
from geodino.quicklook import PAD_INCHES, quicklook, save_tight_png, thin_images
from tests import vizdata as vd


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return vd.write_outputs(tmp_path_factory.mktemp("outputs"))


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _share_different(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest share of pixels that differ by more than a quarter of the range between
    ``a`` and ``b`` laid on each other with shifts of up to a pixel (the tight box is cut at a
    whole pixel, where savefig shifts the drawing by a fraction)."""
    h, w = min(a.shape[0], b.shape[0]) - 2, min(a.shape[1], b.shape[1]) - 2
    return min(float((np.abs(a[dy:dy + h, dx:dx + w] - b[1:1 + h, 1:1 + w]).max(-1) > 64).mean())
               for dy in range(3) for dx in range(3))


def test_single_draw_png_shows_what_savefig_tight_shows(outputs, tmp_path, monkeypatch):
    reference = plot.side_by_side(outputs, pyplot=False)
    reference.savefig(tmp_path / "ref.png", dpi=90, bbox_inches="tight", pad_inches=PAD_INCHES)
    draws = []
    real = Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: draws.append(1) or real(self, renderer))
    save_tight_png(plot.side_by_side(outputs, pyplot=False), tmp_path / "new.png", dpi=90)
    assert len(draws) == 1
    ref, new = _rgb(tmp_path / "ref.png"), _rgb(tmp_path / "new.png")
    assert abs(ref.shape[0] - new.shape[0]) <= 1 and abs(ref.shape[1] - new.shape[1]) <= 1
    assert _share_different(ref, new) < 0.02
    info = Image.open(tmp_path / "new.png").info
    assert info["Software"].startswith("Matplotlib") and round(info["dpi"][0]) == 90


def test_quicklook_has_a_white_margin_all_round_and_nothing_cut(outputs, tmp_path):
    image = _rgb(quicklook(outputs, tmp_path / "q.png", dpi=90))
    pad = round(PAD_INCHES * 90)
    drawn = np.argwhere((image != 255).any(-1))
    (top, left), (bottom, right) = drawn.min(0), drawn.max(0)
    margins = [top, left, image.shape[0] - 1 - bottom, image.shape[1] - 1 - right]
    # the pad on each side of whatever was drawn (give or take the white inside text and
    # legend boxes): titles, labels and legend whole, and no more white than that
    assert all(pad - 2 <= m <= pad + 8 for m in margins), margins


def test_an_artist_outside_the_figure_is_kept(tmp_path):
    fig = Figure(figsize=(2, 2))
    fig.subplots()
    fig.text(1.1, 0.5, "outside", fontsize=20)  # no layout engine moves it in
    save_tight_png(fig, tmp_path / "out.png", dpi=50)
    image = _rgb(tmp_path / "out.png")
    past_edge = image[:, 2 * 50 + 10:]  # the box starts left of the figure's left edge, if anywhere
    assert past_edge.shape[1] > 20 and (past_edge < 128).any()  # the text, drawn past the figure


def test_thin_images_keeps_the_nearest_rows_and_columns_and_the_extent():
    fig = Figure(figsize=(1, 0.5))
    ax = fig.subplots()
    data = np.arange(1000 * 10, dtype=np.float32).reshape(1000, 10)
    image = ax.imshow(data, extent=(0, 10, 0, 1000), interpolation="nearest")
    thin_images(fig, dpi=100)  # the axes is at most 100 pixels wide or tall
    thinned = image.get_array()
    assert thinned.shape == (100, 10)
    assert np.array_equal(thinned[:, 0], data[5::10, 0])  # row i holds source row 10 i + 5, its centre
    assert np.array_equal(thinned[7], data[75])
    assert tuple(image.get_extent()) == (0, 10, 0, 1000)
    masked = ax.imshow(np.ma.masked_invalid(np.where(data > 5000, np.nan, data)), extent=(0, 10, 0, 1000))
    thin_images(fig, dpi=100)
    assert masked.get_array().mask[:, 0].tolist() == [r > 500 for r in range(5, 1000, 10)]


def test_a_run_draws_with_collection_deferred_and_restores_it(tmp_path, monkeypatch):
    """The run's quicklook defers Python's cyclic garbage collection while it draws (a full
    collection of a run's heap is most of matplotlib's import cost); the process's setting
    is what it was, after the drawing as before, whatever it was."""
    import gc

    import geodino.quicklook
    from geodino.pipeline import _collection_deferred, build_run, load_pipeline, write_scene
    from tests.conftest import REPO

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            with _collection_deferred():
                assert not gc.isenabled()
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
    seen, real = [], geodino.quicklook.quicklook

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(geodino.quicklook, "quicklook", spy)
    opts = load_pipeline(REPO / "pipelines" / "demo.yaml")
    opts.window, opts.overlap, opts.polygons = 128, 32, False
    write_scene(build_run(str(REPO / "data_samples" / "scene" / "scene.tif"), opts), tmp_path, quiet=True)
    assert seen == [False] and gc.isenabled()
    assert (tmp_path / "quicklook.png").exists()
