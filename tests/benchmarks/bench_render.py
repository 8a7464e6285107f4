"""Renderer speed: 50k toy faces (target: under a minute on 2 cores).

python tests/benchmarks/bench_render.py [--n 50000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hspace.data.toy import faces as toyfaces  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=50_000)
args = ap.parse_args()
t0 = time.perf_counter()
images, _ = toyfaces.render_batch(np.arange(args.n))
wall = time.perf_counter() - t0
print(f"rendered {args.n} faces {images.shape[1:]} in {wall:.1f} s ({args.n / wall:,.0f} faces/s)")
