"""PCA stage benchmarks (unsupervised global directions). Prints figures:

1. peak RSS of one timestep's fit for n = 2k and 8k samples of the toy shape (64, 8, 8)
   (target: within 10%: memory must not grow with n),
2. wall time of the whole stage with 1 and 2 Dask workers (target >= 1.6x),
3. sklearn IncrementalPCA in one process on the same data held in RAM (baseline),
4. both engines on synthetic data of the CelebA-HQ model's h shape (512, 8, 8), D = 32,768,
   n = 2k, T timesteps: time and top-K subspace agreement (principal angles).

    python tests/benchmarks/bench_pca.py [--celeba-timesteps 10] [--skip-celeba]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hspace.data.stores import SampleLayout, SampleStore  # noqa: E402


def synthetic_store(path: Path, n: int, steps: int, h_shape, batch: int = 256, k_signal: int = 10, seed: int = 0):
    """A samples.zarr whose h_t has k_signal strong directions over isotropic noise."""
    d = int(np.prod(h_shape))
    rng = np.random.default_rng(seed)
    store = SampleStore.create(
        path, SampleLayout(n, steps, tuple(h_shape), (3, 8, 8), batch), np.arange(n), np.arange(steps)[::-1]
    )
    bases = [np.linalg.qr(rng.standard_normal((d, k_signal)))[0].astype(np.float32) for _ in range(steps)]
    scales = np.linspace(10, 3, k_signal).astype(np.float32)
    for k in range(store.layout.n_shards):
        rows = store.layout.shard_rows(k)
        h = np.empty((len(rows), steps, d), np.float16)
        for t in range(steps):
            z = rng.standard_normal((len(rows), k_signal)).astype(np.float32) * scales
            h[:, t] = z @ bases[t].T + rng.standard_normal((len(rows), d)).astype(np.float32) * 0.5
        store.write_shard(k, h.reshape(len(rows), steps, *h_shape), np.zeros((len(rows), 3, 8, 8), np.uint8))
    return store


def rss_of_fit(samples: Path, method: str, k: int) -> float:
    """Peak RSS (MiB) of a fresh process that imports and fits one timestep."""
    root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import resource, sys; sys.path.insert(0, {root!r}); from tasks.pca import fit_timestep; "
        f"fit_timestep({str(samples)!r}, 0, {method!r}, {k}, 256, 0); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0])


def celeba_engines(args, tmp: Path) -> None:
    """Part 4: both engines on data of the CelebA-HQ model's h shape, time and accuracy."""
    from hspace.hcore import pca as hpca
    from hspace.tasks.pca import fit_timestep

    # 4. CelebA-HQ shape
    store = synthetic_store(tmp / "celeba.zarr", args.celeba_n, args.celeba_timesteps, (512, 8, 8))
    times, angles, passes = {"ipca": 0.0, "randomized": 0.0}, [], []
    for t in range(args.celeba_timesteps):
        res = {}
        for method in ("randomized", "ipca"):
            t0 = time.perf_counter()
            res[method] = fit_timestep(str(tmp / "celeba.zarr"), t, method, args.k, 256, 0, blas_threads=2)
            times[method] += time.perf_counter() - t0
        angles.append(hpca.principal_angles_deg(res["ipca"].components, res["randomized"].components).max())
        passes.append(res["randomized"].passes)
        if t == 0:
            res0 = res
    # exact reference for the first timestep: numpy SVD of the centred data
    x = store.h[:, 0].reshape(args.celeba_n, -1).astype(np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    exact = {m: hpca.principal_angles_deg(vt[: args.k], res0[m].components).max() for m in res0}
    del store, x
    print(
        f"[4] D=32768 n={args.celeba_n} T={args.celeba_timesteps}: ipca {times['ipca']:.1f} s, "
        f"randomized {times['randomized']:.1f} s ({np.mean(passes):.1f} passes), "
        f"speed-up {times['ipca'] / times['randomized']:.1f}x "
        f"(target >= 10); max principal angle between the engines {max(angles):.3f} deg (target < 1); "
        f"vs exact SVD at t=0: ipca {exact['ipca']:.3f} deg, randomized {exact['randomized']:.3f} deg"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--toy-timesteps", type=int, default=10)
    ap.add_argument("--celeba-timesteps", type=int, default=10)
    ap.add_argument("--celeba-n", type=int, default=2000)
    ap.add_argument("--skip-celeba", action="store_true")
    ap.add_argument("--only-celeba", action="store_true", help="run part 4 only")
    args = ap.parse_args()
    from hspace.tasks.pca import run_pca

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only_celeba:
            celeba_engines(args, tmp)
            return
        # 1. memory vs n
        stores = {n: synthetic_store(tmp / f"toy{n}.zarr", n, 2, (64, 8, 8)) for n in (2000, 8000)}
        for method in ("randomized", "ipca"):
            rss = {n: rss_of_fit(tmp / f"toy{n}.zarr", method, args.k) for n in stores}
            print(
                f"[1] peak RSS {method:<10} n=2k {rss[2000]:7.1f} MiB  n=8k {rss[8000]:7.1f} MiB  "
                f"ratio {rss[8000] / rss[2000]:.3f} (target <= 1.10)"
            )
        # 2. workers
        from hspace.data.catalog import RunFolder

        run = RunFolder(tmp / "run")
        run.init(
            {
                "n": 8000,
                "steps": args.toy_timesteps,
                "eta": 0.0,
                "seed": 0,
                "batch_size": 256,
                "h_point": "output",
                "dtype": "float32",
            },
            {"id": "synthetic", "path": "-", "revision": None, "fingerprint": "0" * 64, "scheduler": "x"},
            {},
        )
        synthetic_store(run.samples, 8000, args.toy_timesteps, (64, 8, 8))
        walls = {}
        for w in (1, 2):
            t0 = time.perf_counter()
            run_pca(str(run.root), args.k, method="randomized", workers=w)
            walls[w] = time.perf_counter() - t0
        print(
            f"[2] stage wall (randomized, n=8k, T={args.toy_timesteps}, cluster start included): "
            f"1 worker {walls[1]:.1f} s, 2 workers {walls[2]:.1f} s, "
            f"speed-up {walls[1] / walls[2]:.2f}x (target >= 1.6)"
        )
        # 3. in-RAM sklearn baseline on the same data
        from sklearn.decomposition import IncrementalPCA

        h = SampleStore(run.samples).h
        t0 = time.perf_counter()
        for t in range(args.toy_timesteps):
            x = h[:, t].reshape(8000, -1).astype(np.float32)
            IncrementalPCA(args.k, batch_size=256).fit(x)
        print(f"[3] sklearn IncrementalPCA in RAM, one process, same data: {time.perf_counter() - t0:.1f} s")
        if args.skip_celeba:
            return
        celeba_engines(args, tmp)
    print(f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
