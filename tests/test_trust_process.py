"""Trustworthy runs (issue 13): exit codes on signals, damaged input, no process-wide side effects.

Each test here failed on the code before this change (see the closing note of issue 13).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio

from geodino.cli import main
from geodino.runner import run_scenes
from tests.conftest import REPO
from tests.helpers import random_image, write_raster
from tests.test_trust import DEMO, _options, _quiet

# -- exit codes and signals -----------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", "from geodino.cli import entry; entry()", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory):
    from geodino.synth import SynthConfig, generate

    return generate(tmp_path_factory.mktemp("big"), SynthConfig(width=768, height=512, seed=6)).scene


def test_sigint_and_sigterm_exit_130_and_143_leaving_nothing(big_scene, tmp_path):
    import signal

    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        out.mkdir()
        (out / "mine.txt").write_text("a user's file")
        runs[sig] = (out, _cli("run", str(big_scene), "--out", str(out), "--pipeline", str(DEMO),
                               "--window", "128", "--overlap", "32"))
    deadline = time.monotonic() + 240
    pending = dict(runs)
    while pending and time.monotonic() < deadline:
        for sig, (out, proc) in list(pending.items()):
            # computing: blocks stream into partial files beside the final paths
            if list(out.glob(".*.partial-*")):
                time.sleep(0.3)
                proc.send_signal(sig)
                del pending[sig]
            assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    assert not pending, "the runs never started computing"
    for sig, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("interrupted (SIGINT)" if sig == signal.SIGINT else "terminated (SIGTERM)")
        assert "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_a_damaged_tile_mid_scene_names_the_window(tmp_path, capsys):
    from rasterio.enums import Resampling

    # 2048 x 256 px with overviews: the statistics read the overview, so the damaged full-resolution
    # tile is met only while windows are computed, after other windows were done
    path = write_raster(tmp_path / "damaged.tif", (random_image(256, 2048, 3, "uint16", seed=2) // 4),
                        compress="deflate")
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4], Resampling.average)
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_5_0", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_5_0", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--pipeline", str(DEMO), "--window", "256",
                 "--overlap", "32", "--profile", "reflectance"]) == 2
    err = capsys.readouterr().err
    assert "damaged.tif: cannot read the pixels of window col" in err and "may be damaged" in err
    assert not out.exists()


# -- no side effects on import --------------------------------------------------------------


def test_importing_geodino_changes_nothing_outside_it():
    code = ("import json, os\n"
            "from rasterio.env import get_gdal_config\n"
            "before, cache = dict(os.environ), get_gdal_config('GDAL_CACHEMAX')\n"
            "import geodino, geodino.cli, geodino.runner, geodino.pipeline\n"
            "print(json.dumps({'env_changed': sorted(set(os.environ.items()) ^ set(before.items())),"
            " 'cache': get_gdal_config('GDAL_CACHEMAX') == cache}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GDAL_CACHEMAX", "MALLOC_ARENA_MAX")}
    env["PYTHONPATH"] = str(REPO)
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                       check=True).stdout.strip().splitlines()[-1])
    assert result == {"env_changed": [], "cache": True}


def test_runs_apply_the_gdal_cache_and_restore_it(tmp_path, monkeypatch):
    from rasterio.env import get_gdal_config

    import geodino.runner
    from geodino.synth import SynthConfig, generate

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    seen = []
    real = geodino.runner.write_scene

    def spy(*args, **kwargs):
        seen.append(get_gdal_config("GDAL_CACHEMAX"))
        return real(*args, **kwargs)

    monkeypatch.setattr(geodino.runner, "write_scene", spy)
    before = get_gdal_config("GDAL_CACHEMAX")
    scene = generate(tmp_path / "s", SynthConfig(width=128, height=128, seed=3)).scene
    run_scenes([str(scene)], tmp_path / "o", _options(polygons=False), log=_quiet, quiet=True)
    # in bytes: rasterio passes an integer to GDALSetCacheMax64 as is (16 would be 16 bytes)
    assert seen and int(seen[0]) == 16 * 2**20
    assert get_gdal_config("GDAL_CACHEMAX") == before
