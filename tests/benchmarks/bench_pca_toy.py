"""Toy-world numbers for the PCA stage (paper sec. 4.1, Fig. 6): are the top PCs semantic,
and do norm-matched random directions barely change anything?

Samples a toy run (unless --run points at one), fits the PCA, then for pc00..pc09 and
random00..random09 edits 64 samples at gamma = -2 sigma and +2 sigma, scores them with
the oracle and prints the mean change of every attribute (halved difference).

    python tests/benchmarks/bench_pca_toy.py [--run runs/pca-toy] [--n 512] [--steps 20] [--k 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from hspace.data import models  # noqa: E402
from hspace.data.annotators import load_annotator  # noqa: E402
from hspace.data.catalog import RunFolder  # noqa: E402
from hspace.data.stores import SampleStore  # noqa: E402
from hspace.flows.cli import app  # noqa: E402
from hspace.hcore.sampler import to_unit  # noqa: E402
from hspace.tasks import naming  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pca-toy")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--gamma", type=float, default=2.0)
    args = ap.parse_args()
    runner = CliRunner()
    run = RunFolder(Path(args.run))
    t0 = time.perf_counter()
    if not run.exists():
        r = runner.invoke(
            app,
            [
                "sample",
                "--model",
                "toy",
                "--n",
                str(args.n),
                "--steps",
                str(args.steps),
                "--batch-size",
                "64",
                "--out",
                args.run,
            ],
        )
        assert r.exit_code == 0, r.output
    print(f"sampling: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    r = runner.invoke(app, ["pca", args.run, "--components", str(args.k)])
    assert r.exit_code == 0, r.output
    print(r.output.strip())
    print(f"pca: {time.perf_counter() - t0:.1f} s")

    meta = run.read()
    unet, scheduler = models.load_for_run(meta)  # refuses weights that changed since sampling
    oracle = load_annotator("oracle")
    names = list(oracle.names)
    pcs = [f"pc{j:02d}" for j in range(args.k)]
    rnd = [f"random{j:02d}" for j in range(args.k)]
    t0 = time.perf_counter()
    table, md = naming.name_run_directions(run, meta, pcs + rnd, oracle, args.eval_n, args.gamma, unet, scheduler)
    print(f"edits: {time.perf_counter() - t0:.1f} s")
    print(md.read_text())
    changes = np.array([[row["changes"][a] for a in names] for row in table])
    scale = oracle.score(to_unit(SampleStore(run.samples).x0[: args.eval_n])).numpy().std(0)
    pc_abs = np.abs(changes[: args.k]) / scale
    rnd_abs = np.abs(changes[args.k :]) / scale
    print(
        f"mean |change| in attribute-std units: PCs {pc_abs.mean():.3f}, random {rnd_abs.mean():.3f}, "
        f"ratio {pc_abs.mean() / max(rnd_abs.mean(), 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
