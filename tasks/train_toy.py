"""Prefect task that trains the toy DDPM, checkpointing as it goes, resumable after a kill."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from prefect import task

from data import toy
from hcore import training

log = logging.getLogger(__name__)


def train_toy_model(checkpoint: Path, recipe: toy.ToyRecipe, progress=None) -> int:
    """Train (or resume training) up to ``recipe.steps``; returns the final step.

    The checkpoint folder is rewritten atomically every ``recipe.checkpoint_every`` steps
    and at the end; a kill loses at most the steps since the last one, and the resumed run
    is step-for-step the run that was not killed (data and noise are functions of step).
    """
    checkpoint = Path(checkpoint)
    if checkpoint.exists() or checkpoint.with_name(checkpoint.name + ".old").exists():
        unet, ema_model, opt_state, step, saved = toy.load_checkpoint(checkpoint)
        if saved.block_out_channels != recipe.block_out_channels or saved.layers_per_block != recipe.layers_per_block:
            raise ValueError(
                f"checkpoint {checkpoint} was trained with a different architecture "
                f"({saved.block_out_channels}, {saved.layers_per_block} layers/block): "
                "use a new --checkpoint folder"
            )
        log.info("resuming %s at step %d", checkpoint, step)
    else:
        unet, ema_model, opt_state, step = toy.build_unet(recipe), None, None, 0
    ema = training.EMA(unet, recipe.ema_decay)
    if ema_model is not None:
        ema.model.load_state_dict(ema_model.state_dict())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    scheduler = toy.build_scheduler(recipe)
    t0, losses = time.time(), []
    while step < recipe.steps:
        x0 = toy.training_batch(recipe, step)
        loss = training.train_step(
            unet, ema, optimizer, scheduler, x0, step, toy.step_generator(recipe, step),
            recipe.lr, recipe.warmup,
        )
        losses.append(loss)
        step += 1
        if progress is not None:
            progress(step, loss)
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            toy.save_checkpoint(checkpoint, unet, ema.model, optimizer, step, recipe)
            log.info(
                "step %d loss %.4f (%.2f s/step)", step, sum(losses) / len(losses),
                (time.time() - t0) / len(losses),
            )
    return step


@task(name="train-toy", log_prints=False)
def train_toy(checkpoint: str, recipe: dict) -> int:
    return train_toy_model(Path(checkpoint), toy.ToyRecipe(**recipe))
