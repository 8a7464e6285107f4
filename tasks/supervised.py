"""Supervised directions (paper sec. 5): eq. (10) from annotated samples, streamed from
samples.zarr (the directions stage; eq. (11) is tasks/disentangle.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError, RunFolder
from hspace.data.stores import AnnotationStore, SampleStore
from hspace.hcore import supervised
from hspace.tasks.stages import Context, Stage, outputs


def run_scores(run: RunFolder) -> tuple[np.ndarray, list[str]]:
    """The run's annotator scores (n, A) and their names; RunError where it has none."""
    if not run.annotations.exists():
        raise RunError(f"{run.root} has no annotations; run `hspace annotate {run.root}` first")
    return AnnotationStore(run.annotations).scores()


def attribute_scores(run: RunFolder, attributes, where: str) -> tuple[np.ndarray, list[str]]:
    """``run_scores``, refusing ``attributes`` the annotations lack (``where``: the option that
    named them) with one line."""
    scores, names = run_scores(run)
    missing = [a for a in attributes if a not in names]
    if missing:
        raise RunError(f"{where}: {', '.join(missing)} not in the run's annotations ({', '.join(names)})")
    return scores, names


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
    scores, names = run_scores(run)
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
    store = SampleStore(run.samples, h_array=getattr(run, "h_array", "h"))  # a PointView: h at its point
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
                from hspace.data.models import noise_shape, replay_for_run

                q = replay_for_run(meta).x_T(part.tolist(), noise_shape(meta) or store.layout.image_shape).numpy()
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
    point: str | None = None,
) -> dict:
    """eq. (10) (``mean_difference``), saved as RUN/directions/NAME.safetensors (at an extra h
    ``point``: RUN/directions/points/POINT/NAME.safetensors, data/points.py)."""
    from hspace.data import directions as dirfile
    from hspace.data.points import PointView

    run = RunFolder(Path(run_dir)) if point is None else PointView(RunFolder(Path(run_dir)), point)
    v, md, picked = mean_difference(run, attribute, top, latent, batch_size, first)
    path = dirfile.save(run.direction(name or direction_name(attribute, latent)), v, md)
    return {"path": str(path), **picked, "norm": float(v.norm())}


def build_prompt_pair(
    run: RunFolder,
    a: str,
    b: str,
    first: int,
    name: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    attribute: str | None = None,
) -> dict:
    """A supervised direction with the prompt as the label (eq. (10) with q = h_{T:1}): the
    run's samples 0..first-1 drawn again from their own seeds under text A and under text
    B, v = mean over them of h_B - h_A (h of the conditional branch, as samples store it).
    Saved as RUN/directions/NAME.safetensors like any other direction."""
    import torch

    from hspace.data import directions as dirfile
    from hspace.data import models

    meta = run.read()
    if models.model_kind(meta) == "pixel":
        raise RunError(
            "--prompt-pair needs a run of a text-conditioned model (Stable Diffusion); this one takes no text"
        )
    unet, scheduler = models.load_for_run(meta, device=device)
    replay = models.replay_for_run(meta, device=device)
    total = None
    for start in range(0, first, batch_size):
        rows = list(range(start, min(first, start + batch_size)))
        per_prompt = []
        for p in (a, b):
            steps: list = []
            keep = lambda s, t, h, steps=steps: steps.append(h.detach().to("cpu", torch.float64))  # noqa: E731
            replay.render(unet, scheduler, rows, prompts=[p] * len(rows), on_step=keep)
            per_prompt.append(torch.stack(steps, 1))  # (B, T, C, H, W)
        diff = (per_prompt[1] - per_prompt[0]).sum(0)
        total = diff if total is None else total + diff
    v = (total / first).float()
    if not torch.isfinite(v).all():
        raise RunError("the prompt-pair direction holds NaN/Inf (fp16 overflow? sample with --dtype float32)")
    out_name = name or "prompt_pair"
    md = dirfile.metadata_for_run(
        meta,
        method="prompt pair (eq. 10 with the prompt as the label): mean(h_B - h_A)",
        source=f"{run.root}: samples 0..{first - 1} under A={a!r} and B={b!r}",
        scale_unit="gamma = 1 moves h from text A's to text B's, on average",
        attribute=attribute or out_name,
        prompt_a=a,
        prompt_b=b,
        samples_ranked=first,  # samples 0..first-1 were used; the rest stay held out
    )
    path = dirfile.save(run.direction(out_name), v, md)
    return {"path": str(path), "norm": float(v.norm())}


# ----------------------------------------------------------------------------- the stage


def directions_stage(run: RunFolder, directions, ctx: Context) -> dict:
    from hspace.data.points import extra_points

    run_config = run.read()["config"]
    n, held_out = run_config["n"], directions.held_out_of(run_config)
    if held_out >= n - 1:
        given = "" if directions.held_out is not None else " (the default, which `hspace run` keeps for evaluate)"
        raise RunError(
            f"--held-out {held_out}{given} leaves no samples of this run's {n} to build directions from: pass "
            f"--held-out N with N at most {max(n - 2, 0)} (e.g. --held-out {n // 4}), or --held-out 0 to use them all"
        )
    if directions.prompt_pair:
        r = build_prompt_pair(run, *directions.prompt_pair, first=n - held_out, name=directions.name, device=ctx.device)
        return {"outputs": outputs(run, [r["path"]]), "prompt_pair": list(directions.prompt_pair), "held_out": held_out}
    if directions.name and len(directions.attributes) > 1:
        raise RunError("--name names one direction: give a single --attribute with it")
    d, ranked = directions, n - held_out
    points = [None, *(extra_points(run.read()) if d.latent == "h" else [])]  # eq. (10) at each h point
    files = [
        build_direction(str(run.root), a, d.top, d.latent, d.name, first=ranked, point=p)["path"]
        for p in points
        for a in d.attributes
    ]
    first = min(n - held_out, directions.pair_samples or n)
    for attribute, (a, b) in directions.prompt_pairs.items():  # attribute-named, so evaluate calibrates and scores them
        r = build_prompt_pair(run, a, b, first, f"{attribute}_prompt", ctx.device, attribute=attribute)
        files.append(r["path"])
    return {"outputs": outputs(run, files), "top": directions.top, "held_out": held_out}


STAGE = Stage(
    "directions",
    sections=("directions",),
    inputs=("annotate", "sample"),
    outputs=("directions",),
    body=directions_stage,
    summary=lambda r: f"{len(r['outputs'])} directions",
    doc="Mean-difference direction per attribute (paper eq. (10)).",
)
