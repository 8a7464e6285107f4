"""Annotation task: score every stored x0 with an annotator, chunk by chunk (resumable:
a chunk's done marker is written after its scores)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hspace.data.annotators import annotator_id, load_annotator
from hspace.data.catalog import RunError, RunFolder
from hspace.data.stores import AnnotationStore, SampleStore
from hspace.hcore.sampler import to_unit

log = logging.getLogger(__name__)


def annotate_run(
    run_dir: str, annotator: str, batch_size: int = 256, device: str = "cpu", progress=None, net=None
) -> dict:
    """Score pending chunks of ``annotator``'s array; returns {annotator, names, recomputed}.
    ``net``: the annotator already loaded from that spec (else it is loaded here)."""

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
