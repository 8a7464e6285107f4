"""The ``annotate`` flow: score a run's samples with an annotator."""

from __future__ import annotations

from prefect import flow

from tasks.annotate import annotate


@flow(name="hspace-annotate")
def annotate_flow(
    run_dir: str, annotator: str = "oracle", batch_size: int = 256, device: str = "cpu", show_progress: bool = True
) -> dict:
    return annotate(run_dir, annotator, batch_size, device, show_progress)
