"""toy-diffae: a diffusion autoencoder (hcore/diffae.py) trained on fresh toy renders, resumable
from one checkpoint folder, then saved as a folder: ``unet/`` (a diffusers UNet2DModel,
``save_pretrained``), ``scheduler/``, ``encoder.safetensors`` (the semantic encoder and the map
of z_sem into the time embedding), ``latent.safetensors`` (the latent DDPM and z_sem's mean and
std), recipe.json.

Phases: 1. the autoencoder end to end with L_simple (EMA of its weights); 2. the z_sem of
``latent_n`` renders through the EMA encoder, their mean and std, and the latent DDPM on the
normalised codes. Every batch is a function of (seed, phase, step), so a resumed run is the run
that was not killed. A recipe with ``init_from`` starts phase 1 from that autoencoder's weights
(toy-hdae: toy-diffae with HDAE's level codes, data.diffae.HDAE_RECIPE); its renders are other
seeds than the autoencoder it starts from saw (``seed`` << 37 further on).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hspace.data.catalog import RunError, replace_folder
from hspace.data.diffae import DiffAERecipe, build, diffae_files, encoder_state, load_diffae, recipe_from_dict

__all__ = ["DiffAERecipe", "build", "recipe_from_dict", "train_diffae"]

DATA_SEED = 7 << 40  # toy-diffae's training renders (the oracle's 1-2 << 40, toy-sd's 3, toy-clip's 5-6)
EVAL_SEED = 8 << 40  # held-out renders for its measured quality


def renders(recipe: DiffAERecipe, first_seed: int, n: int) -> torch.Tensor:
    """Toy renders of seeds first_seed .. first_seed + n - 1 as (n, 3, R, R) in [-1, 1]."""
    import numpy as np

    from hspace.data.toy import faces as toyfaces

    images, _ = toyfaces.render_batch(np.arange(first_seed, first_seed + n), recipe.image_size, style=recipe.style)
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype("float32") / 127.5 - 1.0)


def _gen(recipe: DiffAERecipe, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((recipe.seed << 40) + (phase << 32) + step + 1)


def train_diffae(checkpoint: Path, out: Path, recipe: DiffAERecipe | None = None, report=print) -> dict:
    """Train (or resume) toy-diffae in ``checkpoint`` and save the result to ``out``."""
    from hspace.hcore.diffae import LatentDDPM
    from hspace.hcore.training import EMA

    checkpoint, out = Path(checkpoint), Path(out)
    if (checkpoint / "state.json").exists():
        saved = recipe_from_dict(json.loads((checkpoint / "recipe.json").read_text()))
        free = {"steps": 0, "checkpoint_every": 0, "latent_steps": 0}
        if recipe is not None and {**asdict(saved), **free} != {**asdict(recipe), **free}:
            raise RunError(f"{checkpoint} holds a toy-diffae run of another recipe; give another --checkpoint")
        given = recipe or saved
        recipe = recipe_from_dict({**asdict(saved), **{k: getattr(given, k) for k in free}})
        state = json.loads((checkpoint / "state.json").read_text())
    else:
        recipe, state = recipe or DiffAERecipe(), {"step": 0, "latent_step": 0, "loss": None, "seconds": 0.0}
    model, scheduler = build(recipe)
    if recipe.init_from and state["step"] == 0:
        start_from(model, recipe.init_from)
    ema = EMA(model, recipe.ema_decay)
    optim = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)

    def fresh_latent():
        torch.manual_seed(recipe.seed + 1)
        net = LatentDDPM(recipe.code_dim)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-3)

    latent, latent_optim = fresh_latent()
    if (checkpoint / "weights.pt").exists():
        saved_w = torch.load(checkpoint / "weights.pt")
        model.load_state_dict(saved_w["model"])
        ema.model.load_state_dict(saved_w["ema"])
        latent.load_state_dict(saved_w["latent"])
        optim.load_state_dict(saved_w["optim"])
        latent_optim.load_state_dict(saved_w["latent_optim"])
        stats = saved_w.get("stats")
    else:
        stats = None

    def save():
        weights = {"model": model.state_dict(), "ema": ema.model.state_dict(), "latent": latent.state_dict(),
                   "optim": optim.state_dict(), "latent_optim": latent_optim.state_dict(), "stats": stats}  # fmt: skip
        save_checkpoint(checkpoint, weights, recipe, state)

    start, losses = time.perf_counter(), []
    model.train()
    while state["step"] < recipe.steps:
        step = state["step"]
        gen = _gen(recipe, 1, step)
        x0 = renders(recipe, DATA_SEED + (recipe.seed << 37) + step * recipe.batch_size, recipe.batch_size)
        loss = model.loss(x0, scheduler, gen)
        optim.zero_grad()
        loss.backward()
        optim.step()
        ema.update(model, step)
        losses.append(loss.item())
        state["step"] = step + 1
        if state["step"] % recipe.checkpoint_every == 0 or state["step"] == recipe.steps:
            state["loss"] = sum(losses) / len(losses)
            state["seconds"] += time.perf_counter() - start
            start, losses = time.perf_counter(), []
            save()
            report(f"toy-diffae step {state['step']}/{recipe.steps}: L_simple {state['loss']:.4f}")
    auto = ema.model.eval()
    if stats is None or state.get("stats_at") != state["step"]:  # phase 2a: latent_n renders' codes, mean, std
        latent, latent_optim = fresh_latent()  # (again, where phase 1 went on after them)
        state["latent_step"] = 0
        with torch.no_grad():
            z = torch.cat([auto.encoder(renders(recipe, DATA_SEED + (1 << 36) + i, 512))
                           for i in range(0, recipe.latent_n, 512)])  # fmt: skip
        stats = {"codes": z, "mean": z.mean(0), "std": z.std(0) + 1e-6}
        state["stats_at"] = state["step"]
        save()
    codes = (stats["codes"] - stats["mean"]) / stats["std"]
    while state["latent_step"] < recipe.latent_steps:
        step = state["latent_step"]
        gen = _gen(recipe, 2, step)
        z0 = codes[torch.randint(len(codes), (256,), generator=gen)]
        t = torch.randint(0, recipe.num_train_timesteps, (256,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(latent(scheduler.add_noise(z0, noise, t), t), noise)
        latent_optim.zero_grad()
        loss.backward()
        latent_optim.step()
        state["latent_step"] = step + 1
        if state["latent_step"] % 500 == 0 or state["latent_step"] == recipe.latent_steps:
            state["latent_loss"] = loss.item()
            save()
            report(f"toy-diffae latent DDPM step {state['latent_step']}/{recipe.latent_steps}: {loss.item():.4f}")
    export(auto, latent.eval(), scheduler, stats, recipe, out)
    return state


def export(auto, latent, scheduler, stats: dict, recipe: DiffAERecipe, out: Path) -> Path:
    """The shipped folder (see the module's docstring), written aside and swapped in."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    auto.unet.save_pretrained(tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    enc = encoder_state(auto)
    files = diffae_files(tmp)
    save_file({k: v.contiguous() for k, v in enc.items()}, str(files["encoder"]))
    lat = {f"latent.{k}": v for k, v in latent.state_dict().items()}
    lat.update({"z_mean": stats["mean"], "z_std": stats["std"]})
    save_file({k: v.contiguous() for k, v in lat.items()}, str(files["latent"]))
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(tmp, out)
    return out


def start_from(model, spec: str) -> None:
    """``model``'s weights from the autoencoder ``spec`` wherever it has them (a hierarchical
    model's level heads and maps stay as built: the maps zero); RunError where the shapes differ."""
    source = load_diffae(spec)[0]
    got = source.state_dict()
    own = model.state_dict()
    wrong = [k for k, v in got.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise RunError(f"init_from {spec}: its weights do not fit this recipe ({wrong[0]})")
    model.load_state_dict(got, strict=False)


def save_checkpoint(checkpoint: Path, weights: dict, recipe: DiffAERecipe, state: dict) -> None:
    """Written aside (``.tmp``) and swapped in: a kill leaves the previous checkpoint."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(weights, tmp / "weights.pt")
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    replace_folder(tmp, checkpoint)
