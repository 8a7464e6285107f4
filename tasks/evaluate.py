"""How much does a direction move each attribute? Edit samples at -gamma and +gamma,
score both with an annotator, and average the change (paper sec. 4.1 judges PCs by eye;
Table 1 measures this for supervised directions). Used to name PCs ("pc02 ~ yaw") and for
the PC vs random comparison of Fig. 6."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data import directions as dirfile
from data.catalog import RunFolder


def attribute_changes(
    unet,
    scheduler,
    annotator,
    sample_cfg: dict,
    indices: list[int],
    vectors: list[torch.Tensor],
    gamma: float,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean over samples of score(+gamma) - score(-gamma), halved: (len(vectors), A).

    Every edited sample replays its own x_T and z_{T:1} (same generator), so the only
    difference between the two renders is the edit."""
    from hcore.sampler import Edit, make_generators, sample

    out = np.zeros((len(vectors), len(annotator.names)), np.float64)
    for j, v in enumerate(vectors):
        for start in range(0, len(indices), batch_size):
            part = indices[start : start + batch_size]
            signs = torch.tensor([gamma] * len(part) + [-gamma] * len(part))
            gens = make_generators(sample_cfg["seed"], list(part) + list(part))
            x0 = sample(
                unet,
                scheduler,
                gens,
                sample_cfg["steps"],
                sample_cfg["eta"],
                edit=Edit([v], [signs]),
                h_point=sample_cfg["h_point"],
            )
            scores = annotator.score(x0).numpy()
            plus, minus = scores[: len(part)], scores[len(part) :]
            out[j] += ((plus - minus) / 2).sum(0)
    return out / len(indices)


def name_directions(
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


def changes_table_md(table: list[dict], names: list[str], gamma: float) -> str:
    head = "| direction | ≈ | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names) + "\n"
    rows = "".join(
        f"| {row['direction']} | {row['name']} | " + " | ".join(f"{row['changes'][n]:+.3f}" for n in names) + " |\n"
        for row in table
    )
    return f"Mean change of each attribute between γ = -{gamma:g} and +{gamma:g} (halved)\n\n" + head + rows


def load_run_directions(run: RunFolder, direction_names: list[str]) -> list[torch.Tensor]:
    return [dirfile.load(run.directions / f"{name}.safetensors")[0] for name in direction_names]


def save_naming(run: RunFolder, table: list[dict], names: list[str], gamma: float) -> Path:
    out = run.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pc_names.json").write_text(json.dumps({"gamma": gamma, "directions": table}, indent=2))
    (out / "pc_names.md").write_text(changes_table_md(table, names, gamma))
    return out / "pc_names.md"
