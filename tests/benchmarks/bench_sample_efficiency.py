"""Sample efficiency of eq. (10) in h vs x_T (paper Fig. 8), on the toy world.

Uses an annotated toy run with DDIM eta = 0 (default runs/pca-toy from bench_pca_toy.py;
annotates it if needed). Directions for the attribute from n = 1, 3, 10, 30, 100
top/bottom pairs among the first N - 64 samples, in h and in x_T, applied at gamma to the
64 held-out samples; prints the oracle's mean change per n and the RMS pixel change of
the edit (tasks/efficiency.py), and writes a PNG plot.

    python tests/benchmarks/bench_sample_efficiency.py [--run runs/pca-toy] [--attribute Smiling] [--png FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from typer.testing import CliRunner  # noqa: E402

from hspace.data.catalog import RunFolder  # noqa: E402
from hspace.data.figures import efficiency_plot  # noqa: E402
from hspace.flows.cli import app  # noqa: E402
from hspace.tasks.efficiency import sample_efficiency, table_md  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pca-toy")
    ap.add_argument("--attribute", default="Smiling")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--png", default="docs/sample_efficiency.png")
    args = ap.parse_args()
    if not RunFolder(Path(args.run)).annotations.exists():
        r = CliRunner().invoke(app, ["annotate", args.run])
        assert r.exit_code == 0, r.output
    result = sample_efficiency(args.run, args.attribute, args.held_out, args.gamma)
    print(table_md(result))
    if args.png:
        print(f"plot: {efficiency_plot(result, Path(args.png))}")


if __name__ == "__main__":
    main()
