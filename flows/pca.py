"""The ``pca`` flow: per-timestep PCA of h (Dask), pca.zarr and pcNN/randomNN directions."""

from __future__ import annotations

from prefect import flow

from tasks.pca import pca_task


@flow(name="hspace-pca")
def pca_flow(
    run_dir: str,
    k: int = 10,
    method: str = "auto",
    batch_size: int = 256,
    workers: int = 1,
    dask_address: str | None = None,
    reference_step: int | None = None,
    complete_only: bool = False,
    show_progress: bool = True,
) -> dict:
    return pca_task(run_dir, k, method, batch_size, workers, dask_address, reference_step, complete_only, show_progress)
