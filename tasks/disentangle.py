"""Disentanglement by projection (paper eq. (11)): each direction minus its projection on
the span of others, written once by the disentangle stage for every variant later stages
score: ``NAME_disentangled`` (rescaled to the original's norm unless keep_norm is off)
and, with keep_norm, ``NAME_disentangled_as_written`` (eq. (11) without the rescaling).
The evaluate stage loads these files through the catalog; it projects nothing itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError, RunFolder
from hspace.hcore import supervised
from hspace.tasks.stages import Context, Stage, outputs
from hspace.tasks.supervised import direction_name

AS_WRITTEN = "_as_written"  # suffix of the unrescaled variant written beside a keep-norm one


def disentangled_name(direction: str) -> str:
    """The file a direction's eq. (11) projection is written to (and evaluate reads)."""
    return f"{direction}_disentangled"


def disentangle_direction(
    run_dir: str, direction: str, against: list[str], name: str | None = None, keep_norm: bool = True
) -> dict:
    """eq. (11) against the listed directions (all from this run's directions folder);
    ``keep_norm``: rescaled to the original's norm (hcore.supervised.disentangle)."""
    import torch

    from hspace.data import directions as dirfile

    run = RunFolder(Path(run_dir))
    run.read()
    if not against:
        raise RunError("--against needs at least one direction name")
    if direction in against:
        raise RunError(f"--against lists {direction!r} itself; projecting it out would leave nothing")
    loaded = {}
    for d in [direction, *against]:
        v, md = dirfile.load(run.direction(d))
        loaded[d] = (v.numpy(), md)
    v0, md0 = loaded[direction]
    for d in against:
        v, md = loaded[d]
        for key in ("model", "steps", "h_point", "scheduler"):
            if md.get(key) != md0.get(key):
                raise RunError(
                    f"direction {d!r} was made for another {key} than {direction!r}; "
                    "disentangle only directions of one model, schedule and latent"
                )
        if v.shape != v0.shape:
            raise RunError(f"direction {d!r} has shape {v.shape}, {direction!r} has {v0.shape}")
    try:
        v = supervised.disentangle(v0, [loaded[d][0] for d in against], keep_norm=keep_norm)
    except ValueError as e:
        raise RunError(f"{direction}: {e}") from None
    out_name = name or disentangled_name(direction)
    md = {
        **md0,
        "method": f"disentangled (eq. 11) from {md0.get('method')}",
        "against": ",".join(against),
        "keep_norm": str(keep_norm).lower(),
        "source": f"{run.root}: {direction} minus its projection on {', '.join(against)}",
    }
    path = dirfile.save(run.direction(out_name), torch.from_numpy(v), md)
    cos = float(np.dot(v.ravel(), v0.ravel()) / (np.linalg.norm(v) * np.linalg.norm(v0) + 1e-12))
    return {"path": str(path), "cosine_with_original": cos}


def against_for(name: str, names: list[str], s, latent: str) -> list[str]:
    """What ``name`` is projected against: --against, else its conditions, else every other
    listed direction."""
    attribute = name.removesuffix("_xT")
    against = s.against or [direction_name(a, latent) for a in s.conditions.get(attribute, [])]
    return against or [x for x in names if x != name]


# ----------------------------------------------------------------------------- the stage


def disentangle_stage(run: RunFolder, disentangle, directions, ctx: Context) -> dict:
    if not disentangle.enabled:
        return {"outputs": [], "skipped": True}
    latent = directions.latent
    names = disentangle.directions or [direction_name(a, latent) for a in directions.attributes]
    if disentangle.name and len(names) > 1:
        raise RunError("--name names one direction: give a single --direction with it")
    files, cosines = [], {}
    for name in names:
        against = against_for(name, names, disentangle, latent)
        if not against:
            continue
        out = disentangle.name or disentangled_name(name)
        r = disentangle_direction(str(run.root), name, against, out, keep_norm=disentangle.keep_norm)
        files.append(r["path"])
        cosines[name] = round(r["cosine_with_original"], 4)
        if disentangle.keep_norm:  # eq. (11) as written beside the rescaled one: evaluate scores both
            files.append(disentangle_direction(str(run.root), name, against, out + AS_WRITTEN, keep_norm=False)["path"])
    return {"outputs": outputs(run, files), "cosine_with_original": cosines}


STAGE = Stage(
    "disentangle",
    sections=("disentangle", "directions"),
    inputs=("directions",),
    outputs=("directions",),
    body=disentangle_stage,
    summary=lambda r: f"{len(r['outputs'])} directions",
    doc="Disentangle directions by projection (paper eq. (11)); with keep-norm also eq. (11) as written.",
)
