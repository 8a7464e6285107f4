"""The ``train-toy`` flow: train the toy DDPM (resumable from its checkpoint folder),
export its EMA weights as a diffusers folder, and train the oracle annotator."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, task

from hspace.data.toy import train, train_clip, train_sd
from hspace.data.toy.train_sd import resolve_recipe
from hspace.flows.prefect_server import prefect_api

# the toy world's training as Prefect tasks (not cached: the checkpoint folder is the state)
train_toy = task(name="train-toy")(train.train_toy)
export_toy = task(name="export-toy")(train.export_toy)
train_oracle = task(name="train-oracle")(train.train_oracle)


@task(name="train-toy-sd")
def train_toy_sd(checkpoint: str, out: str, recipe: dict) -> dict:
    from prefect.logging import get_run_logger

    return train_sd.train_toy_sd(checkpoint, out, recipe, report=get_run_logger().info)


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


def train_sd_command(checkpoint: Path, out: Path, steps, checkpoint_every, console) -> None:
    """The body of `hspace train-toy --recipe toy-sd`: ``train_toy_sd_flow`` on the local
    Prefect server; resumable."""
    if checkpoint == Path("runs/toy-train/checkpoint"):  # the toy DDPM's defaults: keep the two apart
        checkpoint = Path("runs/toy-sd-train/checkpoint")
    if out == Path("runs/toy-train/model"):
        out = Path("runs/toy-sd-train/model")
    recipe = resolve_recipe(checkpoint, steps, checkpoint_every)
    with prefect_api(console):
        state = train_toy_sd_flow(str(checkpoint), str(out), asdict(recipe))
    console.print(f"toy-sd at U-Net step {state['unet_step']}: [bold]{out}[/] (checkpoint {checkpoint})")


@task(name="train-toy-clip")
def train_toy_clip(checkpoint: str, out: str, recipe: dict) -> dict:
    from prefect.logging import get_run_logger

    return train_clip.train_clip(checkpoint, out, train_clip.ClipRecipe(**recipe), report=get_run_logger().info)


@flow(name="hspace-train-toy-clip")
def train_toy_clip_flow(checkpoint: str, out: str, recipe: dict) -> dict:
    return train_toy_clip(checkpoint, out, recipe)


@task(name="train-toy-diffae")
def train_toy_diffae(checkpoint: str, out: str, recipe: dict) -> dict:
    from prefect.logging import get_run_logger

    from hspace.data.toy import train_diffae

    made = train_diffae.recipe_from_dict(recipe)
    return train_diffae.train_diffae(checkpoint, out, made, report=get_run_logger().info)


@flow(name="hspace-train-toy-diffae")
def train_toy_diffae_flow(checkpoint: str, out: str, recipe: dict) -> dict:
    return train_toy_diffae(checkpoint, out, recipe)


def train_recipe_command(name: str, checkpoint: Path, out: Path, steps, checkpoint_every, console) -> None:
    """The body of `hspace train-toy --recipe clip|diffae|hdae`: toy-clip (data/toy/train_clip.py),
    toy-diffae or toy-hdae (data/toy/train_diffae.py; hdae: data.diffae.HDAE_RECIPE) as a flow on
    the local Prefect server; resumable (a checkpoint of another recipe is refused)."""
    import json

    from hspace.data.catalog import RunError
    from hspace.data.diffae import HDAE_RECIPE
    from hspace.data.toy import train_diffae

    make, flow_fn = {
        "clip": (lambda d: train_clip.ClipRecipe(**d), train_toy_clip_flow),
        "diffae": (train_diffae.recipe_from_dict, train_toy_diffae_flow),
        "hdae": (lambda d: train_diffae.recipe_from_dict({**HDAE_RECIPE, **d}), train_toy_diffae_flow),
    }[name]
    if checkpoint == Path("runs/toy-train/checkpoint"):
        checkpoint = Path(f"runs/toy-{name}-train/checkpoint")
    if out == Path("runs/toy-train/model"):
        out = Path(f"runs/toy-{name}-train/model")
    recipe = make(json.loads((checkpoint / "recipe.json").read_text()) if (checkpoint / "recipe.json").exists() else {})
    if name in ("diffae", "hdae") and bool(recipe.levels) != (name == "hdae"):  # a resumed run keeps its recipe
        held = "toy-hdae" if recipe.levels else "toy-diffae"
        raise RunError(f"{checkpoint} holds a {held} run: --recipe {name} needs another --checkpoint")
    recipe.steps = steps or recipe.steps
    recipe.checkpoint_every = checkpoint_every or recipe.checkpoint_every
    with prefect_api(console):
        state = flow_fn(str(checkpoint), str(out), asdict(recipe))
    console.print(f"toy-{name} at step {state['step']}: [bold]{out}[/] (checkpoint {checkpoint})")
