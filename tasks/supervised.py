"""Supervised directions (paper sec. 5): eq. (10) from annotated samples, streamed from
samples.zarr (the directions stage; eq. (11) is tasks/disentangle.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError, RunFolder
from hspace.data.stores import AnnotationStore, SampleStore
from hspace.hcore import supervised
from hspace.tasks.stages import Context, Stage, outputs


def mean_difference(
    run: RunFolder, attribute: str, top: int, latent: str = "h", batch_size: int = 64, first: int | None = None
) -> tuple:
    """v = mean(q+) - mean(q-) over the top/bottom ``top`` samples by ``attribute`` (eq. 10).
    latent 'h': q = h_{T:1} read in batches of rows; 'xT': q = x_T re-drawn from the seeds.
    first: rank only samples 0..first-1 (the rest stay held out for evaluation).
    Returns (v as a torch tensor, its direction-file metadata, {positives, negatives});
    nothing is written."""
    import torch

    from hspace.data import directions as dirfile

    meta = run.read()
    if latent not in ("h", "xT"):
        raise RunError(f"--latent must be h or xT, got {latent!r}")
    scores, names = AnnotationStore(run.annotations).scores() if run.annotations.exists() else (None, [])
    if scores is None:
        raise RunError(f"{run.root} has no annotations; run `hspace annotate {run.root}` first")
    if attribute not in names:
        raise RunError(f"unknown attribute {attribute!r}; this run's annotations have: {', '.join(names)}")
    column = scores[:, names.index(attribute)]
    if first is not None:
        if not (2 <= first <= len(column)):
            raise RunError(f"{first} samples left to rank (the rest held out); need 2 to the run's {len(column)}")
        column = column[:first]
    try:
        pos, neg = supervised.top_bottom(column, top)
    except ValueError as e:
        raise RunError(f"--top {top}: {e}") from None
    store = SampleStore(run.samples)
    if not store.complete():
        raise RunError(f"samples.zarr has unfinished shards {store.pending_shards()[:10]}; rerun `hspace sample`")
    acc = supervised.MeanDifference()
    for positive, idx in ((True, pos), (False, neg)):
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            if latent == "h":
                q = store.h.get_orthogonal_selection((part,)).astype(np.float32)
            elif "xT" in store.group:  # inverted real images: their x_T is stored
                q = store.group["xT"].get_orthogonal_selection((part,)).astype(np.float32)
            else:
                from hspace.hcore.sampler import draw_noise, make_generators

                q = draw_noise(make_generators(meta["config"]["seed"], part.tolist()), store.layout.image_shape).numpy()
            acc.add(q, positive)
    v = acc.direction()
    if not np.isfinite(v).all():
        raise RunError("the direction holds NaN/Inf (damaged samples?); run `hspace verify RUN`")
    md = dirfile.metadata_for_run(
        meta,
        method="mean-difference (eq. 10)",
        source=f"{run.root}: top/bottom {top} of {attribute} in annotations.zarr",
        scale_unit="gamma = 1 moves mean(q-) to mean(q+)",
        attribute=attribute,
        top=top,
        latent=latent,
        samples_ranked=len(column),  # samples 0..samples_ranked-1 were ranked; the rest are held out
    )
    if latent == "xT":
        md["h_point"] = "xT"
        v = v[None]  # (1, 3, R, R): one "timestep", the initial noise
    return torch.from_numpy(v), md, {"positives": pos.tolist(), "negatives": neg.tolist()}


def direction_name(attribute: str, latent: str) -> str:
    """The file name of an attribute's eq. (10) direction: ``Smiling`` in h, ``Smiling_xT`` in x_T."""
    return attribute if latent == "h" else f"{attribute}_xT"


def build_direction(
    run_dir: str,
    attribute: str,
    top: int,
    latent: str = "h",
    name: str | None = None,
    batch_size: int = 64,
    first: int | None = None,
) -> dict:
    """eq. (10) (``mean_difference``), saved as RUN/directions/NAME.safetensors."""
    from hspace.data import directions as dirfile

    run = RunFolder(Path(run_dir))
    v, md, picked = mean_difference(run, attribute, top, latent, batch_size, first)
    path = dirfile.save(run.direction(name or direction_name(attribute, latent)), v, md)
    return {"path": str(path), **picked, "norm": float(v.norm())}


# ----------------------------------------------------------------------------- the stage


def directions_stage(run: RunFolder, d, ctx: Context) -> dict:
    run_config = run.read()["config"]
    n, held_out = run_config["n"], d.held_out_of(run_config)
    if held_out >= n - 1:
        raise RunError(f"--held-out {held_out} leaves no samples of this run's {n} to build directions from")
    if d.name and len(d.attributes) > 1:
        raise RunError("--name names one direction: give a single --attribute with it")
    files = [
        build_direction(str(run.root), a, d.top, d.latent, d.name, first=n - held_out)["path"] for a in d.attributes
    ]
    return {"outputs": outputs(run, files), "top": d.top, "held_out": held_out}


STAGE = Stage(
    "directions",
    order=50,
    sections=("directions",),
    inputs=("annotate", "sample"),
    outputs=("directions",),
    body=directions_stage,
    summary=lambda r: f"{len(r['outputs'])} directions",
    doc="Mean-difference direction per attribute (paper eq. (10)).",
)
