"""The ``sample`` flow: prepare samples.zarr, then map the shard tasks over pending shards."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from data.catalog import RunFolder, SampleStore
from tasks.sample import prepare_samples, sample_shard, shard_fingerprint


def progress_bar(**kwargs) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        **kwargs,
    )


def _sample_on_dask(run_dir: str, pending: list[int], address: str, store, bar, job) -> list[int]:
    """Pending shards as tasks on an existing Dask cluster (the run folder must be on a
    path every worker sees); each worker loads the model once and writes whole shards,
    one file per shard, so workers never write the same file."""
    from dask.distributed import as_completed

    from tasks.pca import dask_client
    from tasks.sample import run_shard

    client = dask_client(0, address)
    try:
        futures = [client.submit(run_shard, run_dir, k, key=f"hspace-shard-{k}-{run_dir}", pure=False) for k in pending]
        done = []
        for future in as_completed(futures):
            result = future.result()
            done.append(result["shard"])
            bar.advance(job, len(store.layout.shard_rows(result["shard"])))
        return sorted(done)
    finally:
        client.close()


@flow(name="hspace-sample", log_prints=False)
def sample_flow(run_dir: str, show_progress: bool = True, dask_address: str | None = None) -> dict:
    """Sample every pending shard of the run in ``run_dir`` (its run.json holds the config);
    with ``dask_address``, on that Dask cluster."""
    run = RunFolder(Path(run_dir))
    plan = prepare_samples(run_dir)
    meta = run.read()
    key = shard_fingerprint(meta)
    store = SampleStore(run.samples)
    storage = run.prefect_results
    pending = set(plan["pending"])
    recomputed = []
    with progress_bar(disable=not show_progress) as bar:
        job = bar.add_task("sampling", total=store.layout.n, rate="")
        bar.advance(job, sum(len(store.layout.shard_rows(k)) for k in range(plan["n_shards"]) if k not in pending))
        if dask_address:
            recomputed = _sample_on_dask(run_dir, sorted(pending), dask_address, store, bar, job)
            return {"n_shards": plan["n_shards"], "recomputed": recomputed}
        done_new = 0
        for k in range(plan["n_shards"]):
            # a pending shard must run even if Prefect remembers a result for its key
            task = sample_shard.with_options(result_storage=storage, refresh_cache=k in pending)
            task(run_dir, k, key)
            if k in pending:
                recomputed.append(k)
                done_new += len(store.layout.shard_rows(k))
                elapsed = bar.get_time() - bar.tasks[job].start_time
                bar.update(job, rate=f"{done_new / max(elapsed, 1e-9):.2f} samples/s")
                bar.advance(job, len(store.layout.shard_rows(k)))
    return {"n_shards": plan["n_shards"], "recomputed": recomputed}
