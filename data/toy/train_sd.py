"""Training of toy-sd (data/toy/sd.py), resumable from one checkpoint folder after a kill.

Phases, in order, each resumed where its last checkpoint left it:
  1. ``vae``: AutoencoderKL on fresh renders (squared error + kl_weight x KL per image, as
     SD's VAE less its perceptual and adversarial terms), cosine learning-rate decay;
  2. ``latents``: the VAE's posterior (mean, log-variance) of ``data_n`` renders and their
     captions' tokens, once, into ``latents.pt``; the latent scaling factor is 1 / std of
     the latents, as SD's 0.18215 was chosen;
  3. ``unet``: U-Net and text encoder together on those latents (eq. (1) of the paper in
     latent space: the epsilon-prediction loss), captions dropped for ``caption_dropout``
     of the samples, skip dropout on the deepest up block, EMA of both.
Every random draw is a function of (seed, phase, step), so a resumed run is the run that
was not killed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hspace.data.catalog import RunError, replace_folder
from hspace.data.toy import sd as toy_sd
from hspace.data.toy.recipe import recipe_changes
from hspace.hcore import training

log = logging.getLogger(__name__)
VAE_SEED = 4 << 40  # the VAE's training renders


def _gen(recipe, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((recipe.seed << 40) + (phase << 32) + step + 1)


class Checkpoint:
    """The folder: recipe.json, state.json (phase steps, scaling factor), vae/, and from
    phase 3 unet/, unet_ema/, text_encoder/, text_ema/, optim.pt; latents.pt beside them.
    Rewritten atomically (``.tmp`` swapped in; latents.pt is linked, not copied)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists() and self.path.with_name(self.path.name + ".old").exists():
            os.replace(self.path.with_name(self.path.name + ".old"), self.path)  # killed between renames

    def exists(self) -> bool:
        return (self.path / "state.json").exists()

    def state(self) -> dict:
        return json.loads((self.path / "state.json").read_text())

    def recipe(self) -> toy_sd.ToySDRecipe:
        return toy_sd.recipe_from_dict(json.loads((self.path / "recipe.json").read_text()))

    def save(self, recipe, state: dict, modules: dict, optim: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            module.save_pretrained(tmp / name)
        torch.save(optim, tmp / "optim.pt")
        (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if (self.path / "latents.pt").exists():
            os.link(self.path / "latents.pt", tmp / "latents.pt")
        replace_folder(tmp, self.path)


def _lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(ck: Checkpoint, recipe, state: dict, report) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    step = state.get("vae_step", 0)
    if step:
        vae = AutoencoderKL.from_pretrained(ck.path / "vae")
    else:
        with torch.random.fork_rng():
            torch.manual_seed(recipe.seed)
            vae = toy_sd.build_vae(recipe)
    if step >= recipe.vae_steps:
        return vae.eval()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    if step:
        opt.load_state_dict(torch.load(ck.path / "optim.pt", weights_only=True)["vae"])
    vae.train()
    t0, losses = time.time(), []
    while step < recipe.vae_steps:
        g = _gen(recipe, 1, step)
        x, _, _ = toy_sd.renders(VAE_SEED + step * recipe.vae_batch, recipe.vae_batch, recipe)
        _lr(opt, training.lr_at(step, recipe.vae_lr, 200, recipe.vae_steps // 2, recipe.vae_steps))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + recipe.kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(mse.detach()))
        step += 1
        if step % recipe.checkpoint_every == 0 or step == recipe.vae_steps:
            state["vae_step"] = step
            ck.save(recipe, state, {"vae": vae}, {"vae": opt.state_dict()})
            report(
                f"vae step {step} mse {sum(losses) / len(losses):.5f} ({(time.time() - t0) / len(losses):.3f} s/step)"
            )
            t0, losses = time.time(), []
    return vae.eval()


@torch.no_grad()
def encode_latents(ck: Checkpoint, recipe, vae, tokenizer, report, chunk: int = 1000) -> dict:
    """Phase 2: posterior mean and log-variance of the ``data_n`` training renders, and the
    token ids of their captions (padded to max_tokens, as the pipeline encodes prompts)."""
    path = ck.path / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    means, logvars, ids = [], [], []
    for start in range(0, recipe.data_n, chunk):
        n = min(chunk, recipe.data_n - start)
        x, texts, _ = toy_sd.renders(toy_sd.DATA_SEED + start, n, recipe)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.half())
        logvars.append(dist.logvar.half())
        ids.append(
            tokenizer(
                texts, padding="max_length", max_length=recipe.max_tokens, truncation=True, return_tensors="pt"
            ).input_ids.short()
        )
        if (start // chunk) % 10 == 0:
            report(f"latents {start + n}/{recipe.data_n}")
    mean = torch.cat(means)
    data = {"mean": mean, "logvar": torch.cat(logvars), "ids": torch.cat(ids)}
    data["scaling_factor"] = torch.tensor(1.0 / float(mean.float().std()))
    tmp = path.with_name("latents.pt.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


def train_unet(ck: Checkpoint, recipe, state: dict, vae, tokenizer, data: dict, report):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    step = state.get("unet_step", 0)
    if step:
        unet = UNet2DConditionModel.from_pretrained(ck.path / "unet")
        text = CLIPTextModel.from_pretrained(ck.path / "text_encoder")
    else:
        with torch.random.fork_rng():
            torch.manual_seed(recipe.seed + 1)
            unet = toy_sd.build_unet(recipe)
            text = toy_sd.build_text_encoder(recipe, len(tokenizer))
    ema_unet, ema_text = training.EMA(unet, recipe.ema_decay), training.EMA(text, recipe.ema_decay)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    if step:
        ema_unet.model.load_state_dict(UNet2DConditionModel.from_pretrained(ck.path / "unet_ema").state_dict())
        ema_text.model.load_state_dict(CLIPTextModel.from_pretrained(ck.path / "text_ema").state_dict())
        opt.load_state_dict(torch.load(ck.path / "optim.pt", weights_only=True)["unet"])
    drop = training.SkipDropout(unet, recipe.skip_dropout, 1) if recipe.skip_dropout > 0 else None
    scheduler = DDPMScheduler.from_config(toy_sd.build_scheduler().config)
    scale = float(data["scaling_factor"])
    empty = tokenizer([""], padding="max_length", max_length=recipe.max_tokens, return_tensors="pt").input_ids[0]
    n = data["mean"].shape[0]
    t0, losses = time.time(), []
    while step < recipe.unet_steps:
        g = _gen(recipe, 3, step)
        b = recipe.batch_size
        idx = torch.randint(0, n, (b,), generator=g)
        mean, logvar = data["mean"][idx].float(), data["logvar"][idx].float()
        z0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)) * scale
        ids = data["ids"][idx].long()
        ids[torch.rand(b, generator=g) < recipe.caption_dropout] = empty
        if drop is not None:
            drop.draw(b, g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        _lr(opt, training.lr_at(step, recipe.lr, recipe.warmup, int(recipe.unet_steps * 0.7), recipe.unet_steps))
        unet.train()
        text.train()
        emb = text(ids).last_hidden_state
        eps = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=emb).sample
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text, step)
        losses.append(float(loss.detach()))
        step += 1
        if step % recipe.checkpoint_every == 0 or step == recipe.unet_steps:
            state["unet_step"] = step
            modules = {
                "vae": vae,
                "unet": unet,
                "text_encoder": text,
                "unet_ema": ema_unet.model,
                "text_ema": ema_text.model,
            }
            ck.save(recipe, state, modules, {"unet": opt.state_dict()})
            report(
                f"unet step {step} loss {sum(losses) / len(losses):.4f} ({(time.time() - t0) / len(losses):.3f} s/step)"
            )
            t0, losses = time.time(), []
    if drop is not None:
        drop.remove()
    return ema_unet.model.eval(), ema_text.model.eval()


def train_toy_sd_model(checkpoint: Path, recipe: toy_sd.ToySDRecipe, out: Path | None = None, report=log.info) -> dict:
    """Run (or resume) all phases; with ``out``, export the EMA weights there as a
    StableDiffusionPipeline folder. Returns the checkpoint's state."""
    ck = Checkpoint(checkpoint)
    if not ck.exists() and ck.path.is_dir() and any(ck.path.iterdir()):  # never overwrite another folder
        raise RunError(
            f"{ck.path} is not a toy-sd checkpoint (no state.json) and not empty; "
            "point --checkpoint at a new folder or at a toy-sd checkpoint"
        )
    if ck.exists():
        differ = recipe_changes(ck.recipe(), recipe, toy_sd.RESUMABLE_FIELDS)
        if differ:
            raise RunError(
                f"checkpoint {ck.path} was trained with another recipe ({'; '.join(differ)}): "
                "resume it with its own recipe or use a new checkpoint folder"
            )
        state = ck.state()
    else:
        state = {}
    tokenizer = toy_sd.write_tokenizer(ck.path.with_name(ck.path.name + ".tokenizer"), recipe.max_tokens)
    vae = train_vae(ck, recipe, state, report)
    data = encode_latents(ck, recipe, vae, tokenizer, report)
    vae.register_to_config(scaling_factor=float(data["scaling_factor"]))
    state["scaling_factor"] = float(data["scaling_factor"])
    unet, text = train_unet(ck, recipe, state, vae, tokenizer, data, report)
    if out is not None:
        toy_sd.save_pipeline(Path(out), vae, text, tokenizer, unet, recipe)
    return state


def export_checkpoint(checkpoint: Path, out: Path, quality: dict | None = None) -> Path:
    """The checkpoint's EMA U-Net and text encoder with its VAE, as a StableDiffusionPipeline
    folder at ``out`` (also mid-training: a look at the model so far)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    ck = Checkpoint(checkpoint)
    if not ck.exists() or not (ck.path / "unet_ema").exists():
        raise RunError(f"{ck.path} holds no U-Net yet (the VAE phase is not finished); train on and export then")
    recipe, state = ck.recipe(), ck.state()
    vae = AutoencoderKL.from_pretrained(ck.path / "vae")
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    tokenizer = toy_sd.write_tokenizer(ck.path.with_name(ck.path.name + ".tokenizer"), recipe.max_tokens)
    unet = UNet2DConditionModel.from_pretrained(ck.path / "unet_ema")
    text = CLIPTextModel.from_pretrained(ck.path / "text_ema")
    return toy_sd.save_pipeline(Path(out), vae, text, tokenizer, unet, recipe, quality)


def resolve_recipe(checkpoint: Path, steps: int | None, checkpoint_every: int | None) -> toy_sd.ToySDRecipe:
    """`hspace train-toy --recipe toy-sd`: the checkpoint's own recipe when it exists (a
    resume), else the default, with --steps (the U-Net's) and --checkpoint-every applied."""
    import dataclasses

    ck = Checkpoint(checkpoint)
    recipe = ck.recipe() if ck.exists() else toy_sd.ToySDRecipe()
    overrides = {k: v for k, v in {"unet_steps": steps, "checkpoint_every": checkpoint_every}.items() if v is not None}
    if any(v <= 0 for v in overrides.values()):
        raise RunError("--steps and --checkpoint-every must be positive")
    return dataclasses.replace(recipe, **overrides)


def train_toy_sd(checkpoint: str, out: str, recipe: dict, report=print) -> dict:
    """Train (or resume) toy-sd; flows/train_toy.py runs it as a Prefect task, not cached by
    Prefect: the checkpoint folder is the state (as train-toy). ``report``: the progress lines."""
    return train_toy_sd_model(Path(checkpoint), toy_sd.recipe_from_dict(recipe), Path(out), report=report)
