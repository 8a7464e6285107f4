"""HDAE's sparse directions on the toy world: a k sweep of own change against leakage.

For each attribute direction of a run (eq. (10)), the hdae-sparse method (hcore/edits/sparse.py)
keeps the top-k entries of v_t at every step; each k is scored like Table 1 by the oracle on the
run's held-out samples, at the gamma evaluate used: the own attribute's mean change, the mean
|change| of the other binary attributes (leakage) and their ratio, and the pose drift (degrees).
k = the size of h is the plain h direction.

    python tests/benchmarks/bench_hdae_sparse.py --run runs/pipeline --n 16 --ks 16,64,256,0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def main() -> None:
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.data.catalog import RunFolder
    from hspace.data.directions import read
    from hspace.hcore import metrics
    from hspace.hcore.edits import get

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a toy run with annotations and attribute directions")
    p.add_argument("--n", type=int, default=16, help="held-out samples scored per row")
    p.add_argument("--ks", default="16,64,256,0", help="entries kept per step (0: all, the h direction)")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args()

    run = RunFolder(Path(args.run))
    meta = run.read()
    summary = json.loads((run.eval / "summary.json").read_text()) if (run.eval / "summary.json").exists() else {}
    gammas = summary.get("original", {}).get("gamma", {})
    unet, scheduler = models.load_for_run(meta)
    replay = models.replay_for_run(meta)
    oracle = load_annotator("oracle")
    names = list(oracle.names)
    binary = [c for c in names if c not in ("yaw", "pitch", "roll")]
    attributes = [a for a in binary if run.direction(a).exists()]
    n_total = meta["config"]["n"]
    indices = list(range(n_total - args.n, n_total))  # the last samples: held out from every direction
    sparse = get("hdae-sparse")
    rows = []
    t0 = time.perf_counter()
    base = metrics.edit_scores(unet, scheduler, oracle, replay, indices, None, 0.0)
    for attribute in attributes:
        d = read(run.direction(attribute))
        if int(d.meta.get("samples_ranked", n_total)) > n_total - args.n:
            raise SystemExit(f"{attribute}: its direction ranked samples beyond {n_total - args.n}; lower --n")
        size = d.v[0].numel()
        gamma = float(gammas.get(attribute, 1.0))
        for k in [int(x) for x in args.ks.split(",")]:
            k = k or size
            m = metrics.leakage_matrix(unet, scheduler, oracle, replay, indices, [sparse(d.v, k=k)], gamma, base=base)[
                0
            ]
            own = float(m[names.index(attribute)])
            leak = float(np.mean([abs(m[names.index(c)]) for c in binary if c != attribute]))
            pose = float(np.mean([abs(m[names.index(c)]) for c in ("yaw", "pitch", "roll") if c in names]))
            rows.append(
                {
                    "attribute": attribute,
                    "k": k,
                    "of": size,
                    "gamma": gamma,
                    "own": own,
                    "leakage": leak,
                    "ratio": leak / max(abs(own), 1e-9),
                    "pose_degrees": pose,
                }
            )
            print(
                f"{attribute:12s} k={k:5d}/{size}  own {own:+.3f}  leakage {leak:.3f}  "
                f"ratio {leak / max(abs(own), 1e-9):.2f}  pose {pose:.2f} deg",
                flush=True,
            )
    print(f"{len(rows)} rows on {args.n} held-out samples in {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
