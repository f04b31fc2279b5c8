"""What the run fingerprint costs: content stamps of model files and the check of a finished scene.

    python bench/fingerprint.py [--size-mb 1024] [--model PATH]

Prints JSON: seconds to stamp a file of --size-mb random bytes (first call, and again with the
file in the page cache), to stamp the bundled demo model, and to plan (check + fingerprint +
compare) a finished scene, which is what a rerun that skips it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return round(time.perf_counter() - start, 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--model", default=None, help="also stamp this model file or folder")
    args = parser.parse_args()

    from geodino.fingerprint import file_stamp, model_stamp
    from geodino.options import load_pipeline
    from geodino.runner import plan_scenes, run_scenes
    from geodino.synth import SynthConfig, generate

    repo = Path(__file__).resolve().parents[1]
    result = {"machine": machine(), "size_mb": args.size_mb}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "weights.bin"
        with big.open("wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(2**20))
        os.sync()
        result["stamp_big_file_s"] = timed(file_stamp, big)
        result["stamp_big_file_again_s"] = timed(file_stamp, big)
        big.unlink()
        result["stamp_demo_model_s"] = timed(model_stamp, str(repo / "data_samples" / "model"))
        if args.model:
            result["stamp_model_s"] = timed(model_stamp, args.model)
        scene = generate(Path(tmp) / "s", SynthConfig(width=256, height=256, seed=1)).scene
        options = load_pipeline(repo / "pipelines" / "demo.yaml")
        run_scenes([str(scene)], Path(tmp) / "out", options, log=lambda m: None, quiet=True)
        result["plan_finished_scene_s"] = timed(plan_scenes, [str(scene)], Path(tmp) / "out", options)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
