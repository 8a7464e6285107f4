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


@flow(name="hspace-sample", log_prints=False)
def sample_flow(run_dir: str, show_progress: bool = True) -> dict:
    """Sample every pending shard of the run in ``run_dir`` (its run.json holds the config)."""
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
