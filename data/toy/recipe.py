"""The toy world's model recipe and training checkpoints.

The shipped model lives in ``data/toy_model/`` (a diffusers folder: ``unet/`` with the
EMA weights and ``scheduler/``); ``--model toy`` means that folder. Training checkpoints
are folders holding ``unet/`` (online weights), ``ema/`` (EMA weights), both in diffusers
format, and ``trainer.pt`` (optimizer state, step, recipe), replaced atomically.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from hspace.data.catalog import RunError, replace_folder
from hspace.data.models import TOY_MODEL_DIR  # noqa: F401  (re-exported: where the toy model ships)
from hspace.data.toy import faces as toyfaces
from hspace.hcore.sampler import to_unit


@dataclass(frozen=True)
class ToyRecipe:
    """Training recipe of a toy DDPM. The defaults are what made the v1 model (a recipe.json
    without the later fields reads as v1); ``RECIPES`` holds the named ones."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    attention_levels: tuple[int, ...] = ()  # levels (0 = full resolution) with attention blocks
    mid_attention: bool = False  # attention in the mid block, whose output is h
    attention_head_dim: int = 8
    style: str = "v1"  # toyfaces.STYLES: how the training renders are drawn
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    decay_from: int | None = None  # cosine learning-rate decay from this step to 0 at `steps`
    skip_dropout: float = 0.0  # P(zero the skips of the deepest up blocks) per training sample
    skip_dropout_levels: int = 1  # how many of the deepest up blocks (hcore.training.SkipDropout)
    seed: int = 0
    steps: int = 5000
    checkpoint_every: int = 250


RECIPES = {
    "v1": ToyRecipe(steps=20000),
    # v2: shaped like google/ddpm-ema-celebahq-256, scaled down: the 4x4 bottleneck
    # after three downsamplings, attention at 8x8 and in the mid block, multi-head; v2 renders;
    # skip dropout on the three deepest up blocks, without which the decoder ignores h.
    "v2": ToyRecipe(
        block_out_channels=(32, 64, 96, 128),
        attention_levels=(2,),
        mid_attention=True,
        attention_head_dim=32,
        style="v2",
        skip_dropout=0.5,
        skip_dropout_levels=3,
        steps=20000,
    ),
}
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "decay_from")  # may change when a checkpoint resumes


def recipe_from_json(cls, raw: dict, tuples: tuple[str, ...], what: str = "toy"):
    """A recipe dataclass ``cls`` from its JSON form: the ``tuples`` fields back from lists to
    tuples; a field ``cls`` does not know is refused (a newer hspace wrote it)."""
    raw = dict(raw)
    for key in tuples:
        if key in raw:
            raw[key] = tuple(raw[key])
    unknown = set(raw) - set(cls.__dataclass_fields__)
    if unknown:
        raise RunError(f"unknown {what} recipe field(s) {', '.join(sorted(unknown))}: written by a newer hspace?")
    return cls(**raw)


def recipe_changes(saved, recipe, resumable: tuple[str, ...]) -> list[str]:
    """The fields (other than ``resumable``) in which ``recipe`` differs from the ``saved``
    recipe of a checkpoint, as "field old -> new": a resume with any of them is refused."""
    return [
        f"{k} {getattr(saved, k)!r} -> {getattr(recipe, k)!r}"
        for k in saved.__dataclass_fields__
        if k not in resumable and getattr(saved, k) != getattr(recipe, k)
    ]


def recipe_from_dict(raw: dict) -> ToyRecipe:
    """A recipe from its JSON form (lists back to tuples; missing later fields read as v1)."""
    return recipe_from_json(ToyRecipe, raw, ("block_out_channels", "attention_levels"))


def build_unet(recipe: ToyRecipe) -> UNet2DModel:
    n = len(recipe.block_out_channels)
    attn = set(recipe.attention_levels)
    return UNet2DModel(
        sample_size=recipe.image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=recipe.layers_per_block,
        block_out_channels=tuple(recipe.block_out_channels),
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("AttnUpBlock2D" if n - 1 - i in attn else "UpBlock2D" for i in range(n)),
        add_attention=recipe.mid_attention,
        attention_head_dim=recipe.attention_head_dim,
        norm_num_groups=8,
    )


def build_scheduler(recipe: ToyRecipe) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=recipe.num_train_timesteps,
        beta_schedule=recipe.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def training_batch(recipe: ToyRecipe, step: int) -> torch.Tensor:
    """The renders of training step ``step`` as (B, 3, H, W) in [-1, 1]; seeds are a pure
    function of (recipe seed, step), so a resumed run sees the same data."""
    first = (recipe.seed << 32) + step * recipe.batch_size
    images, _ = toyfaces.render_batch(
        np.arange(first, first + recipe.batch_size), recipe.image_size, style=recipe.style
    )
    return to_unit(images.transpose(0, 3, 1, 2))


def step_generator(recipe: ToyRecipe, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((recipe.seed << 32) + step + 1)


def dropout_generator(recipe: ToyRecipe, step: int) -> torch.Generator:
    """The skip-dropout mask's own stream (so the noise and timesteps do not depend on it)."""
    return torch.Generator().manual_seed(((recipe.seed << 32) + step + 1) ^ (1 << 61))


def save_checkpoint(path: Path, unet, ema_model, optimizer, step: int, recipe: ToyRecipe) -> None:
    """Write a checkpoint folder atomically: build ``path.tmp`` then swap it in."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    ema_model.save_pretrained(tmp / "ema")
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp / "trainer.pt")
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    replace_folder(tmp, path)


def load_checkpoint(path: Path) -> tuple[UNet2DModel, UNet2DModel, dict, int, ToyRecipe]:
    """Inverse of ``save_checkpoint``: (unet, ema_unet, optimizer_state, step, recipe)."""
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # crashed between the two renames
    missing = [p for p in ("recipe.json", "unet", "ema", "trainer.pt") if not (path / p).exists()]
    if missing:
        raise RunError(
            f"{path} is not a toy training checkpoint (missing {', '.join(missing)}); "
            "point --checkpoint at a new or an existing checkpoint folder"
        )
    recipe = recipe_from_dict(json.loads((path / "recipe.json").read_text()))
    unet = UNet2DModel.from_pretrained(path / "unet")
    ema = UNet2DModel.from_pretrained(path / "ema")
    state = torch.load(path / "trainer.pt", weights_only=True)
    return unet, ema, state["optimizer"], int(state["step"]), recipe


def model_recipe(folder: Path) -> ToyRecipe | None:
    """The recipe an exported toy model folder was trained with (its recipe.json), or None
    for a model that is not a toy export."""
    path = Path(folder) / "recipe.json"
    return recipe_from_dict(json.loads(path.read_text())) if path.exists() else None


def export_model(ema_model: UNet2DModel, recipe: ToyRecipe, out: Path) -> None:
    """Write the shipped diffusers folder: EMA ``unet/`` plus a DDIM ``scheduler/``."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ema_model.save_pretrained(tmp / "unet")
    DDIMScheduler.from_config(build_scheduler(recipe).config).save_pretrained(tmp / "scheduler")
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    replace_folder(tmp, out)  # the previous model stays until the new one is complete
