"""PCA stage (paper sec. 4.1): one Dask task per timestep fits a streaming PCA of h_t read
chunk by chunk from samples.zarr; the results are sign-aligned, written to pca.zarr, and
turned into direction files pcNN (and the norm-matched random baseline randomNN).

Engines (``method``): ``ipca`` is scikit-learn's IncrementalPCA; ``randomized`` is
streaming randomized subspace iteration (hcore.pca). ``auto`` picks ``ipca`` while the
data is small (D <= 4096 and n <= 5000: its cost, one (K + B) x D SVD per batch, is then
seconds) and ``randomized`` above that, where IncrementalPCA costs ~25-30 ms per sample
per timestep at D = 32,768 (hours for a CelebA-HQ run) and the randomized engine reads
each timestep n_iter + 1 times with O(D (K + p)) memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError, RunFolder
from hspace.data.points import PointView, h_array, views
from hspace.data.stores import PCAStore, SampleStore, timestep_batches
from hspace.hcore import pca as hpca
from hspace.tasks.stages import Context, Stage, outputs

log = logging.getLogger(__name__)

PCA_CODE_VERSION = "pca-2"  # pca-2: signs chained step to step


def choose_method(method: str, n: int, d: int) -> str:
    if method != "auto":
        return method
    return "ipca" if d <= 4096 and n <= 5000 else "randomized"


def fit_timestep(
    samples_path: str,
    t: int,
    method: str,
    k: int,
    batch_size: int,
    seed: int,
    rows: list[int] | None = None,
    blas_threads: int = 1,
    h_array: str = "h",
) -> hpca.TimestepPCA:
    """Runs on a Dask worker: PCA of h_t (``h_array``: the run's h or an extra point's). BLAS
    threads are set explicitly (Dask workers pin OMP/MKL to 1)."""
    from threadpoolctl import threadpool_limits

    store = SampleStore(Path(samples_path), h_array=h_array)
    source = timestep_batches(store, t, batch_size, None if rows is None else np.asarray(rows))
    try:
        with threadpool_limits(blas_threads):
            if method == "ipca":
                return hpca.fit_ipca(source, k, batch_size)
            return hpca.fit_randomized(source, k, seed=seed + t)
    except (ValueError, OSError) as e:
        if isinstance(e, OSError) or "checksum" in str(e).lower():
            raise RunError(f"reading h at step {t} failed ({e}); run `hspace verify {store.path.parent}`") from None
        raise


def dask_client(workers: int, address: str | None, timeout: float = 10.0):
    from dask.distributed import Client, LocalCluster

    if address:
        try:
            return Client(address, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise RunError(
                f"cannot reach the Dask scheduler at {address} within {timeout:.0f} s ({e}); "
                "check the address or leave --dask-address out for a local cluster"
            ) from None
    import logging

    # the in-process scheduler logs every client and worker at INFO: keep the CLI readable
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # the workers' own logs: CRITICAL only. A task that fails raises in this process through its
    # future; what the workers log besides is shutdown noise (a heartbeat to a scheduler already
    # closed when a SIGTERM stops a scheduled run prints a traceback that reports nothing wrong)
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL
    )
    return Client(cluster)


def run_pca(
    run_dir: str,
    k: int,
    method: str = "auto",
    batch_size: int = 256,
    workers: int = 1,
    dask_address: str | None = None,
    reference_step: int | None = None,
    complete_only: bool = False,
    seed: int = 0,
    progress=None,
    point: str | None = None,
) -> dict:
    """Fit every timestep, align signs, write pca.zarr and the direction files; ``point``: at one
    of the run's extra h points (data/points.py: its own pca.zarr and direction folder)."""
    from dask.distributed import as_completed

    run = RunFolder(Path(run_dir)) if point is None else PointView(RunFolder(Path(run_dir)), point)
    meta = run.read()
    if not run.samples.exists():
        raise RunError(f"{run.root} has no samples.zarr; run `hspace sample --out {run.root}` first")
    store = SampleStore(run.samples, h_array=h_array(point))
    pending = store.pending_shards()
    rows = None
    if pending:
        if not complete_only:
            raise RunError(
                f"samples.zarr has {len(pending)} unfinished shards {pending[:10]}"
                f"{' ...' if len(pending) > 10 else ''}; finish `hspace sample` or pass "
                "--complete-shards-only to use the complete ones"
            )
        rows = [i for s in store.done_shards() for i in store.layout.shard_rows(int(s))]
    n = store.layout.n if rows is None else len(rows)
    steps, h_shape = store.layout.steps, store.layout.h_shape
    d = int(np.prod(h_shape))
    if n < 2:
        raise RunError(f"PCA needs at least 2 samples, this run has {n}")
    method = choose_method(method, n, d)
    limit = min(n - 1, d) if method != "ipca" else min(n - 1, d, batch_size)
    if not (1 <= k <= limit):
        raise RunError(
            f"--components {k} is not allowed with {method}: it must be between 1 and {limit} "
            f"(n - 1 = {n - 1}, D = {d}{f', --batch-size = {batch_size}' if method == 'ipca' else ''})"
        )
    ref = steps // 2 if reference_step is None else reference_step
    if not (0 <= ref < steps):
        raise RunError(f"--reference-step {ref} must be in [0, {steps})")
    t0 = time.perf_counter()
    client = dask_client(workers, dask_address)
    try:
        futures = {
            client.submit(
                fit_timestep,
                str(run.samples),
                t,
                method,
                k,
                batch_size,
                seed,
                rows,
                h_array=h_array(point),
                pure=False,
                key=f"pca-{t}-{time.time_ns()}",
            ): t
            for t in range(steps)
        }
        results: dict[int, hpca.TimestepPCA] = {}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(1)
    finally:
        client.close()
        if not dask_address and client.cluster is not None:
            client.cluster.close()
    wall = time.perf_counter() - t0
    components = np.stack([results[t].components for t in range(steps)])
    components, flips, alignment = hpca.align_signs(components, ref)
    weak = hpca.weak_alignments(alignment)
    if weak:
        where = "; ".join(
            f"pc{j:02d} at step {','.join(map(str, at[:6]))}{'...' if len(at) > 6 else ''}" for j, at in weak.items()
        )
        # not a warning: past the leading PCs, components reorder between steps in every run; the
        # stage's summary line (terminal, inspect, report) says what it means
        log.info(
            f"PCA signs chained through a weak match where a component's |cos| with its neighbouring step's is < "
            f"{hpca.WEAK_ALIGNMENT} (components reorder there): {where}; see pca.zarr 'sign_alignment'"
        )
    ev = np.stack([results[t].explained_variance for t in range(steps)])
    ratio = np.stack([results[t].explained_variance_ratio for t in range(steps)]).astype(np.float32)
    std = np.sqrt(np.maximum(ev, 0)).astype(np.float32)
    run.pca.parent.mkdir(parents=True, exist_ok=True)  # RUN/points/POINT/ at an extra point
    PCAStore(run.pca).write(
        {
            "mean": np.stack([results[t].mean for t in range(steps)]),
            "components": components.astype(np.float32),
            "explained_variance": ev,
            "explained_variance_ratio": ratio,
            "std": std,
            "sign_flips": flips,
            "sign_alignment": alignment,
        },
        {
            "method": method,
            "n_samples": n,
            "reference_step": ref,
            "h_shape": list(h_shape),
            "code_version": PCA_CODE_VERSION,
            "wall_seconds": wall,
            "workers": workers,
        },
    )
    names = write_directions(run, meta, components, std, h_shape, seed)
    return {
        "method": method,
        "n": n,
        "k": k,
        "wall_seconds": wall,
        "directions": names,
        "explained_variance_ratio_mean": ratio.mean(0).tolist(),
        "weak_sign_alignment": {f"pc{j:02d}": at for j, at in weak.items()},
    }


def write_directions(
    run: RunFolder, meta: dict, components: np.ndarray, std: np.ndarray, h_shape: tuple[int, int, int], seed: int
) -> list[str]:
    """pcNN = concatenation over t of component j scaled by its std (gamma in sigma);
    randomNN = norm-matched random baseline of pcNN (Fig. 6)."""
    steps, k, d = components.shape
    import torch

    from hspace.data import directions as dirfile

    pcs = hpca.directions_from_pca(components, std)
    randoms = hpca.random_directions(std, d, seed)
    for stale in [
        *run.direction_files("pc[0-9][0-9]"),
        *run.direction_files("random[0-9][0-9]"),
    ]:
        if int(stale.stem.lstrip("pcrandom")) >= k:  # from an earlier fit with more components
            stale.unlink()
    names = []
    for j in range(k):
        for prefix, vectors, method, unit in (
            ("pc", pcs, "pca", "std of the component at each timestep"),
            ("random", randoms, "random", f"norm-matched to pc{j:02d}"),
        ):
            name = f"{prefix}{j:02d}"
            md = dirfile.metadata_for_run(meta, method=method, source=f"{run.root}:pca component {j}", scale_unit=unit)
            dirfile.save(
                run.direction(name),
                torch.from_numpy(np.ascontiguousarray(vectors[j])).reshape(steps, *h_shape),
                md,
            )
            names.append(name)
    return names


# ----------------------------------------------------------------------------- the stage


def pca_stage(run: RunFolder, pca, ctx: Context) -> dict:
    if not pca.enabled:
        return {"outputs": [], "skipped": True}
    at = views(run)  # the run's h point, then each of its extra points (sample.h_points)
    files, first = [], None
    with ctx.progress() as bar:
        job = bar.add_task("pca (timesteps)", total=run.read()["config"]["steps"] * len(at), rate="")
        for view in at:
            r = run_pca(
                str(run.root),
                pca.components,
                pca.method,
                pca.batch_size,
                pca.workers,
                ctx.dask_address,
                pca.reference_step,
                pca.complete_shards_only,
                progress=lambda i: bar.advance(job, i),
                point=getattr(view, "point", None),
            )
            first = first or r
            files += [view.pca] + [view.direction(d) for d in r["directions"]]
    r = first
    return {
        "outputs": outputs(run, files),
        "method": r["method"],
        "k": pca.components,
        "n_samples": r["n"],
        "wall_seconds": round(r["wall_seconds"], 2),
        "variance_ratio": r["explained_variance_ratio_mean"][:5],
        "weak_sign_alignment": r["weak_sign_alignment"],
    }


def pca_line(r: dict) -> str:
    ratios = ", ".join(f"{x:.3f}" for x in r["variance_ratio"])
    weak = r.get("weak_sign_alignment") or {}
    signs = (
        f"; {', '.join(weak)}: at some steps the component reorders with a neighbour's (|cos| < 0.5), so its sign "
        "there is a weaker guess (normal past the leading PCs; pca.zarr 'sign_alignment' has every step)"
        if weak
        else ""
    )
    return f"{r['method']}, n={r['n_samples']}; explained variance ratio of PC0-4 {ratios}{signs}"


STAGE = Stage(
    "pca",
    sections=("pca",),
    inputs=("sample",),
    outputs=("pca", "directions"),
    body=pca_stage,
    summary=pca_line,
    runtime=("dask_address",),
    doc="Per-timestep PCA of h (paper sec. 4.1): RUN/pca.zarr and directions pcNN + randomNN.",
)
