"""Jacobian subspace iteration cost (paper sec. 4.2, Alg. 1; SM Alg. 2): wall time per
iteration for K = 1, 4, 8, 16 with Alg. 1 (all K in one batched forward-mode pass) and
Alg. 2 with b = 1 (one vector at a time, deflated, like the seed code), and iterations to
converge at the default tolerance. Target: one K = 8 iteration of Alg. 1 <= 3x a K = 1
iteration.

    python tests/benchmarks/bench_jacobian.py [--model toy] [--step 10] [--iters 5]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hspace.data import models  # noqa: E402
from hspace.hcore import jacobian as jac  # noqa: E402
from hspace.hcore.hooks import HSpaceHook  # noqa: E402
from hspace.hcore.sampler import ddim_scheduler, make_generators, sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    unet, scheduler = models.load(models.resolve(args.model))
    x_t = sample(unet, scheduler, make_generators(0, [0]), args.steps, stop_before=args.step)[0]
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(args.steps)
    t = int(sched.timesteps[args.step])
    with torch.no_grad(), HSpaceHook(unet) as hs:
        unet(x_t[None], t)
        h0 = hs.last_h[0].clone()
    f = jac.eps_of_h(unet, x_t, t)
    print(f"model {args.model}, h {tuple(h0.shape)} (d = {h0.numel()}), step {args.step} (t = {t})")
    per_iter = {}
    for k in (1, 4, 8, 16):
        for name, run in (
            ("Alg. 1", lambda k=k: jac.subspace_iteration(f, h0, k, tol=0, max_iters=args.iters)),
            (
                "Alg. 2 b=1",
                lambda k=k: jac.sequential_subspace_iteration(f, h0, k, block=1, tol=0, max_iters=args.iters),
            ),
        ):
            if name.startswith("Alg. 2") and k == 1:
                continue
            t0 = time.perf_counter()
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run()
            wall = (time.perf_counter() - t0) / result.iterations
            per_iter[(name, k)] = wall
            print(
                f"{name:<11} K={k:<3} {wall * 1000:8.1f} ms per iteration (sigma_1 = {result.singular_values[0]:.3g})"
            )
    print(f"Alg. 1: K=8 / K=1 iteration time = {per_iter[('Alg. 1', 8)] / per_iter[('Alg. 1', 1)]:.2f} (target <= 3)")
    result = jac.subspace_iteration(f, h0, 8)
    print(f"Alg. 1 K=8 converges in {result.iterations} iterations at tol 1e-4 (converged={result.converged})")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
