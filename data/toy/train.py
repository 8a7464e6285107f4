"""Prefect task that trains the toy DDPM, checkpointing as it goes, resumable after a kill."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from hspace.data.toy import recipe as toy
from hspace.hcore import training
from hspace.hcore.sampler import to_unit

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
        differ = toy.recipe_changes(saved, recipe, toy.RESUMABLE_FIELDS)
        if differ:
            raise ValueError(
                f"checkpoint {checkpoint} was trained with another recipe ({'; '.join(differ)}): "
                "resume it with its own recipe or use a new --checkpoint folder"
            )
        log.info("resuming %s at step %d", checkpoint, step)
    else:
        with torch.random.fork_rng():  # initial weights from the recipe's seed, not global state
            torch.manual_seed(recipe.seed)
            unet = toy.build_unet(recipe)
        ema_model, opt_state, step = None, None, 0
    ema = training.EMA(unet, recipe.ema_decay)
    if ema_model is not None:
        ema.model.load_state_dict(ema_model.state_dict())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    scheduler = toy.build_scheduler(recipe)
    drop = None  # hooked after the EMA copy, so the EMA model is a plain UNet2DModel
    if recipe.skip_dropout > 0:
        drop = training.SkipDropout(unet, recipe.skip_dropout, recipe.skip_dropout_levels)
    t0, losses = time.time(), []
    while step < recipe.steps:
        x0 = toy.training_batch(recipe, step)
        if drop is not None:
            drop.draw(x0.shape[0], toy.dropout_generator(recipe, step))
        loss = training.train_step(
            unet,
            ema,
            optimizer,
            scheduler,
            x0,
            step,
            toy.step_generator(recipe, step),
            recipe.lr,
            recipe.warmup,
            decay_from=recipe.decay_from,
            total=recipe.steps,
        )
        losses.append(loss)
        step += 1
        if progress is not None:
            progress(step, loss)
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            toy.save_checkpoint(checkpoint, unet, ema.model, optimizer, step, recipe)
            log.info(
                "step %d loss %.4f (%.2f s/step)",
                step,
                sum(losses) / len(losses),
                (time.time() - t0) / len(losses),
            )
    return step


def train_toy(checkpoint: str, recipe: dict) -> int:
    """Train (or resume) the toy DDPM; flows/train_toy.py runs it as a Prefect task, not
    cached by Prefect: the checkpoint folder is the state, and resuming from it is exactly
    what a re-run should do."""
    from rich.progress import Progress

    r = toy.recipe_from_dict(recipe)
    with Progress() as bar:
        job = bar.add_task("training toy DDPM", total=r.steps)
        return train_toy_model(Path(checkpoint), r, progress=lambda step, loss: bar.update(job, completed=step))


def export_toy(checkpoint: str, out: str) -> str:
    _, ema_model, _, _, recipe = toy.load_checkpoint(Path(checkpoint))
    toy.export_model(ema_model, recipe, Path(out))
    return out


def train_oracle(out: str, steps: int, blur: float = 0.0, style: str = "v1") -> dict:
    return train_oracle_model(Path(out), steps=steps, blur=blur, style=style)


# ----------------------------------------------------------------------------- oracle

ORACLE_TRAIN_SEED = 1 << 40  # oracle training renders: seeds from here on
ORACLE_HELDOUT_SEED = 2 << 40  # held-out renders for its accuracy (never trained on)


def soften(x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Per-image blend between x and its blur by a binomial [1,4,6,4,1]/16 kernel (sigma
    ~1 px): ``amount`` (n,) in [0, 1], 0 = sharp. Generated images are softer than renders."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    k = (k1[:, None] * k1[None]).expand(x.shape[1], 1, 5, 5).contiguous()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    blurred = torch.nn.functional.conv2d(padded, k, groups=x.shape[1])
    a = amount.view(-1, 1, 1, 1)
    return (1 - a) * x + a * blurred


def oracle_batch(
    first_seed: int, n: int, size: int = 32, noise: float = 0.0, blur: float = 0.0, generator=None, style: str = "v1"
):
    """Renders (in ``style``) and their targets: images (n, 3, size, size) in [-1, 1], targets
    (n, A). ``noise``: Gaussian noise of std up to this; ``blur``: ``soften`` by up to this."""
    import numpy as np

    from hspace.data.toy import faces as toyfaces

    images, factors = toyfaces.render_batch(np.arange(first_seed, first_seed + n), size, style=style)
    x = to_unit(images.transpose(0, 3, 1, 2))
    if blur > 0:  # a generated image is softer than a render: judge the face, not the sharpness
        x = soften(x, blur * torch.rand(n, generator=generator))
    if noise > 0:  # generated images are a little noisy; make the oracle indifferent to it
        sigma = noise * torch.rand(n, 1, 1, 1, generator=generator)
        x = x + sigma * torch.randn(x.shape, generator=generator)
    return x, torch.from_numpy(factors.labels())


def train_oracle_model(
    out: Path,
    steps: int = 1200,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    blur: float = 0.0,
    progress=None,
    style: str = "v1",
):
    """Train the toy oracle on fresh renders (one new batch per step; no epochs), with noise
    and optional blur augmentation (``blur`` > 0). The shipped oracle (blur 0) reads a
    render softened by a 3x3 binomial blur as smiling 16% of the time instead of 51%, and
    glasses never; trained with blur 1.0 it keeps 99.8-100% accuracy on renders softened
    by 1.0 and on sharp ones (oracle_accuracy below)."""
    from hspace.data.annotators import save_oracle
    from hspace.data.toy import faces as toyfaces
    from hspace.hcore.annotators import OracleNet

    torch.manual_seed(seed)
    net = OracleNet(list(toyfaces.BINARY_ATTRIBUTES), list(toyfaces.POSE_ATTRIBUTES), width=24)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        x, y = oracle_batch(
            ORACLE_TRAIN_SEED + (seed << 24) + step * batch, batch, noise=0.08, blur=blur, generator=gen, style=style
        )
        loss = net.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, loss.item())
        if (step + 1) % 100 == 0:
            log.info("oracle step %d loss %.4f", step + 1, loss.item())
    net.eval()
    metrics = oracle_accuracy(net, n=2000, style=style)
    metrics.update({f"{k}_soft": v for k, v in oracle_accuracy(net, n=2000, blur=1.0, style=style).items()})
    save_oracle(net, out, extra={"heldout": metrics, "train_steps": steps, "blur": blur, "style": style})
    return metrics


def oracle_accuracy(
    net, n: int = 2000, first_seed: int = ORACLE_HELDOUT_SEED, blur: float = 0.0, style: str = "v1"
) -> dict:
    """Accuracy per binary attribute and MAE (degrees) per pose angle on fresh renders
    (``blur``: each softened by exactly this amount)."""
    x, y = oracle_batch(first_seed, n, style=style)
    if blur > 0:
        x = soften(x, torch.full((n,), blur))
    scores = torch.cat([net.score(x[i : i + 256]) for i in range(0, n, 256)])
    nb = len(net.binary)
    out = {name: float(((scores[:, i] > 0.5).float() == y[:, i]).float().mean()) for i, name in enumerate(net.binary)}
    out.update(
        {f"{name}_mae": float((scores[:, nb + j] - y[:, nb + j]).abs().mean()) for j, name in enumerate(net.pose)}
    )
    return out


def resolve_recipe(checkpoint: Path, name: str | None, overrides: dict) -> toy.ToyRecipe:
    """The recipe `hspace train-toy` trains with: ``name`` (toy.RECIPES), else the
    checkpoint's own when it exists (a resume), else v2; with the resumable ``overrides``
    (steps, checkpoint_every, decay_from) applied and checked."""
    import dataclasses
    import json

    from hspace.data.catalog import RunError

    if name is not None and name not in toy.RECIPES:
        raise RunError(f"--recipe must be one of {', '.join(toy.RECIPES)}, got {name!r}")
    checkpoint = Path(checkpoint)
    candidates = (checkpoint / "recipe.json", checkpoint.with_name(checkpoint.name + ".old") / "recipe.json")
    saved = next((p for p in candidates if p.exists()), None)
    if name is None and saved is not None:
        try:
            recipe = toy.recipe_from_dict(json.loads(saved.read_text()))
        except (ValueError, TypeError) as e:
            raise RunError(f"cannot read the recipe of checkpoint {checkpoint}: {e}") from None
    else:
        recipe = toy.RECIPES[name or "v2"]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if any(v <= 0 for v in overrides.values()):
        raise RunError("--steps, --checkpoint-every and --decay-from must be positive")
    recipe = dataclasses.replace(recipe, **overrides)
    if recipe.decay_from is not None and recipe.decay_from >= recipe.steps:
        raise RunError(f"--decay-from {recipe.decay_from} must be below the total steps ({recipe.steps})")
    return recipe
