"""The ``train-toy`` flow: train the toy DDPM (resumable from its checkpoint folder),
export its EMA weights as a diffusers folder, and train the oracle annotator."""

from __future__ import annotations

from prefect import flow

from hspace.tasks.train_toy import export_toy, train_oracle, train_toy
from hspace.tasks.train_toy_sd import train_toy_sd


@flow(name="hspace-train-toy")
def train_toy_flow(
    checkpoint: str,
    out: str,
    recipe: dict,
    oracle_out: str | None = None,
    oracle_steps: int = 1200,
    oracle_blur: float = 0.0,
    oracle_style: str = "v1",
) -> dict:
    step = train_toy(checkpoint, recipe)
    export_toy(checkpoint, out, wait_for=[step])
    metrics = train_oracle(oracle_out, oracle_steps, oracle_blur, oracle_style) if oracle_out else None
    return {"step": step, "model": out, "oracle": metrics}


@flow(name="hspace-train-toy-sd")
def train_toy_sd_flow(checkpoint: str, out: str, recipe: dict) -> dict:
    return train_toy_sd(checkpoint, out, recipe)
