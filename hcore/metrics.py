"""Table 1 and PC naming: how much a direction moves each attribute (paper sec. 5,
Table 1; sec. 4.1 names PCs by eye, this measures it). Edit samples along a direction,
score them with an annotator, and average the change of every attribute.

Pure: the samples replay their own x_T and z_{T:1} (hcore.sampler), so the only
difference between an edited and an unedited render is the edit. No file IO.
"""

from __future__ import annotations

import numpy as np
import torch

from hspace.hcore.calibrate import calibrate_gamma
from hspace.hcore.edits import Bound, EditMethod
from hspace.hcore.generator import Replay
from hspace.hcore.sampler import Edit


def attribute_changes(unet, scheduler, annotator, replay: Replay, indices: list, vectors: list, gamma: float):
    """Mean over samples of score(+gamma) - score(-gamma), halved: (len(vectors), A).

    Every edited sample replays its own x_T and z_{T:1} (same generator), so the only
    difference between the two renders is the edit."""
    zero = np.zeros((len(indices), len(annotator.names)))
    up = leakage_matrix(unet, scheduler, annotator, replay, indices, vectors, gamma, base=zero)
    down = leakage_matrix(unet, scheduler, annotator, replay, indices, vectors, -gamma, base=zero)
    return (up - down) / 2


def name_by_spread(
    changes: np.ndarray, names: list[str], direction_names: list[str], attribute_scale: np.ndarray
) -> list[dict]:
    """Name each direction after the attribute it moves most, measured in units of that
    attribute's spread (``attribute_scale``, e.g. the std of its scores over the run), so
    probabilities and degrees compare: pc02 ~ yaw."""
    rel = np.abs(changes) / np.maximum(attribute_scale, 1e-6)
    table = []
    for j, dname in enumerate(direction_names):
        best = int(np.argmax(rel[j]))
        table.append(
            {
                "direction": dname,
                "name": names[best],
                "change": float(changes[j, best]),
                "relative": float(rel[j, best]),
                "changes": {n: float(c) for n, c in zip(names, changes[j], strict=True)},
            }
        )
    return table


def edit_scores(
    unet,
    scheduler,
    annotator,
    replay: Replay,
    indices: list[int],
    v: torch.Tensor | EditMethod | Bound | None,
    gamma: float,
    batch_size: int = 64,
) -> np.ndarray:
    """Annotator scores (len(indices), A) of the samples edited by gamma * v (None: unedited).
    ``v``: an h direction (T, C, H, W), or any editing method (hcore.edits) at strength gamma,
    made or bound to the samples (``Bound``: made per batch, rendered under its prompt).
    Each sample is replayed as it was drawn (``replay``: its generator, and for a
    text-conditioned model its prompt, with the VAE decoding it before it is scored)."""
    out = []
    for start in range(0, len(indices), batch_size):
        part = indices[start : start + batch_size]
        how = {}
        if v is None:
            edit = None
        elif isinstance(v, Bound):
            edit = v.make(part).action(gamma)
            how = {"prompts": [v.prompt] * len(part)} if v.prompt is not None else {}
        elif isinstance(v, EditMethod):
            edit = v.action(gamma)
        else:
            edit = Edit([v], [gamma])
        x0 = replay.render(unet, scheduler, part, edit=edit, **how)
        out.append(annotator.score(x0).numpy())
    return np.concatenate(out)


def leakage_matrix(
    unet,
    scheduler,
    annotator,
    replay: Replay,
    indices: list[int],
    vectors: list[torch.Tensor],
    gamma: float | list[float],
    base: np.ndarray | None = None,
    on_row=None,
) -> np.ndarray:
    """Table 1: mean change of every attribute (columns) when editing with each direction
    (rows): mean over samples of score(edited) - score(original). (len(vectors), A).
    gamma: one for all rows or one per row; base: the unedited scores if already known;
    on_row(): called after each row (progress)."""
    gammas = [gamma] * len(vectors) if isinstance(gamma, int | float) else list(gamma)
    if base is None:
        base = edit_scores(unet, scheduler, annotator, replay, indices, None, 0.0)
    rows = []
    for v, g in zip(vectors, gammas, strict=True):
        rows.append((edit_scores(unet, scheduler, annotator, replay, indices, v, g) - base).mean(0))
        if on_row is not None:
            on_row()
    return np.stack(rows)


def calibrate_edit(
    unet,
    scheduler,
    annotator,
    replay: Replay,
    indices: list[int],
    v: torch.Tensor,
    column: int,
    target: float,
    base: np.ndarray | None = None,
):
    """``--gamma auto``: the gamma at which the mean change of annotator column ``column``
    over ``indices`` reaches ``target`` (hcore.calibrate, bisection)."""
    if base is None:
        base = edit_scores(unet, scheduler, annotator, replay, indices, None, 0.0)

    def effect(g: float) -> float:
        scores = edit_scores(unet, scheduler, annotator, replay, indices, v, g)
        return float((scores[:, column] - base[:, column]).mean())

    return calibrate_gamma(effect, target)


def leakage_means(matrix: np.ndarray, rows: list[str], columns: list[str], keep: set[str]) -> dict:
    """Mean |diagonal| (each direction's change of its own attribute) and mean
    |off-diagonal| (its changes of the others) of a Table-1 matrix, over the columns in ``keep``."""
    diag = [abs(matrix[i, columns.index(r)]) for i, r in enumerate(rows) if r in columns and r in keep]
    off = [abs(matrix[i, j]) for i, r in enumerate(rows) for j, c in enumerate(columns) if c != r and c in keep]
    return {
        "mean_diagonal": float(np.mean(diag)) if diag else None,
        "mean_offdiagonal": float(np.mean(off)) if off else None,
    }
