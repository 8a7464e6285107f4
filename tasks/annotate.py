"""Annotation task: score every stored x0 with an annotator, chunk by chunk (resumable:
a chunk's done marker is written after its scores)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError, RunFolder
from hspace.tasks.stages import Context, Stage, outputs

log = logging.getLogger(__name__)


def annotate_run(
    run_dir: str, annotator: str, batch_size: int = 256, device: str = "cpu", progress=None, net=None
) -> dict:
    """Score pending chunks of ``annotator``'s array; returns {annotator, names, recomputed}.
    ``net``: the annotator already loaded from that spec (else it is loaded here)."""
    from hspace.data.annotators import annotator_id, load_annotator
    from hspace.data.stores import AnnotationStore, SampleStore
    from hspace.hcore.sampler import to_unit

    run = RunFolder(Path(run_dir))
    samples = SampleStore(run.samples)
    if not samples.complete():
        raise RunError(
            f"{run.samples} has pending shards {samples.pending_shards()[:10]}; finish `hspace sample` first"
        )
    net = net if net is not None else load_annotator(annotator, device)
    store = AnnotationStore(run.annotations)
    key = annotator_id(annotator)
    arr, done = store.annotator_array(key, list(net.names), samples.layout.n, batch_size)
    chunk = arr.chunks[0]  # fixed when the array was created; --batch-size may differ on resume
    pending = [int(k) for k in np.flatnonzero(done[:] != 1)]
    for k in pending:
        rows = slice(k * chunk, min(samples.layout.n, (k + 1) * chunk))
        x0 = to_unit(samples.x0[rows])
        arr[rows] = net.score(x0).numpy()
        done[k] = 1
        if progress is not None:
            progress(rows.stop - rows.start)
    names = store.rebuild_scores()
    return {"annotator": key, "names": names, "recomputed_chunks": len(pending)}


# ----------------------------------------------------------------------------- the stage


def _check(run: RunFolder, cfg, ctx: Context) -> None:
    from hspace.data.annotators import load_annotator

    for spec in cfg.annotate.annotators:  # a bad spec or weight file fails before anything runs
        load_annotator(spec, ctx.device)


def annotate_stage(run: RunFolder, annotate, ctx: Context) -> dict:
    from hspace.data.annotators import load_annotator
    from hspace.data.stores import SampleStore

    nets = {spec: load_annotator(spec, ctx.device) for spec in annotate.annotators}  # bad ones fail first
    names, n = [], SampleStore(run.samples).layout.n
    with ctx.progress() as bar:
        for spec, net in nets.items():
            job = bar.add_task(f"annotate ({spec.split(':')[0]})", total=n, rate="")
            advance = lambda k, job=job: bar.advance(job, k)  # noqa: E731
            result = annotate_run(str(run.root), spec, annotate.batch_size, ctx.device, advance, net)
            names = result["names"]
    return {"outputs": outputs(run, [run.annotations]), "annotators": annotate.annotators, "attributes": names}


STAGE = Stage(
    "annotate",
    sections=("annotate",),
    inputs=("sample",),
    outputs=("annotations",),
    body=annotate_stage,
    summary=lambda r: f"{len(r['attributes'])} attributes",
    check=_check,
    doc="Score every stored x0 with annotators into RUN/annotations.zarr (resumable).",
)
