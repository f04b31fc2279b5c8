"""End-to-end time of `geodino run` against scene area (tiny model).

    python bench/scaling.py --sizes 2048 4096 8192

Target: linear, 4x the area within 4.2x the time. Prints JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from memory import run_sizes  # noqa: E402


def main() -> None:
    args, results = run_sizes(__doc__, [2048, 4096, 8192], "scaling")
    sizes = [str(s) for s in args.sizes]
    steps = [round(results[b]["seconds"] / results[a]["seconds"] / ((int(b) / int(a)) ** 2 / 4), 3)
             for a, b in zip(sizes, sizes[1:])]
    print(json.dumps({"benchmark": "scaling", "arch": args.arch, "machine": machine(), "results": results,
                      "time_ratio_per_4x_area": [round(results[b]["seconds"] / results[a]["seconds"], 3)
                                                 for a, b in zip(sizes, sizes[1:])],
                      "normalised": steps}, indent=2))


if __name__ == "__main__":
    main()
