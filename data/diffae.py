"""Loading a diffusion autoencoder folder (data/toy/train_diffae.py writes one; toy-diffae is
shipped in data/toy_diffae_model): unet/ through diffusers' own loader, the encoder and the
latent DDPM from safetensors, the architecture from recipe.json."""

from __future__ import annotations

import json
from pathlib import Path

from hspace.data.catalog import RunError

TOY_DIFFAE_DIR = Path(__file__).resolve().parent / "toy_diffae_model"


def diffae_folder(spec: str | Path) -> Path:
    """``toy-diffae`` (the shipped one) or a folder."""
    return TOY_DIFFAE_DIR if str(spec) == "toy-diffae" else Path(spec).expanduser()


def load_diffae(spec: str | Path, device: str = "cpu"):
    """(DiffAE, its DDPMScheduler, LatentDDPM, {"mean", "std"} of z_sem); RunError naming what
    is missing or does not fit."""
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import load_file

    from hspace.data.toy.train_diffae import build, recipe_from_dict
    from hspace.hcore.diffae import LatentDDPM

    folder = diffae_folder(spec)
    try:
        recipe = recipe_from_dict(json.loads((folder / "recipe.json").read_text()))
        model, _ = build(recipe)
        model.unet = UNet2DModel.from_pretrained(folder / "unet")
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        enc = load_file(str(folder / "encoder.safetensors"))
        model.encoder.load_state_dict(
            {k.removeprefix("encoder."): v for k, v in enc.items() if k.startswith("encoder.")}
        )
        model.z_to_emb.load_state_dict(
            {k.removeprefix("z_to_emb."): v for k, v in enc.items() if k.startswith("z_to_emb.")}
        )
        lat = load_file(str(folder / "latent.safetensors"))
        latent = LatentDDPM(recipe.z_dim)
        latent.load_state_dict({k.removeprefix("latent."): v for k, v in lat.items() if k.startswith("latent.")})
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise RunError(f"{folder} is no diffusion-autoencoder folder ({type(e).__name__}: {str(e)[:160]})") from None
    stats = {"mean": lat["z_mean"], "std": lat["z_std"]}
    return model.to(device).eval(), scheduler, latent.to(device).eval(), stats


def _part(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
