"""The ``invert`` flow: prepare samples.zarr for real images, then one cached task per shard."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data.catalog import RunFolder, SampleStore
from flows.sample import progress_bar
from tasks.invert import invert_fingerprint, invert_shard, prepare_inversion


@flow(name="hspace-invert", log_prints=False)
def invert_flow(run_dir: str, image_shape: tuple[int, int, int], show_progress: bool = True) -> dict:
    """DDIM-invert every pending shard of the run in ``run_dir`` (its run.json lists the images)."""
    run = RunFolder(Path(run_dir))
    plan = prepare_inversion(run_dir, image_shape)
    key = invert_fingerprint(run.read())
    store = SampleStore(run.samples)
    pending = set(plan["pending"])
    recomputed = []
    with progress_bar(disable=not show_progress) as bar:
        job = bar.add_task("inverting", total=store.layout.n, rate="")
        bar.advance(job, sum(len(store.layout.shard_rows(k)) for k in range(plan["n_shards"]) if k not in pending))
        for k in range(plan["n_shards"]):
            task = invert_shard.with_options(result_storage=run.prefect_results, refresh_cache=k in pending)
            task(run_dir, k, key)
            if k in pending:
                recomputed.append(k)
                bar.advance(job, len(store.layout.shard_rows(k)))
    mse = SampleStore(run.samples).group["recon_mse"][:]
    return {"n_shards": plan["n_shards"], "recomputed": recomputed, "recon_mse": float(mse.mean())}
