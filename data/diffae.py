"""Loading a diffusion autoencoder folder (data/toy/train_diffae.py writes one; toy-diffae is
shipped in data/toy_diffae_model): unet/ through diffusers' own loader, the encoder and the
latent DDPM from safetensors, the architecture from recipe.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hspace.data.catalog import RunError

TOY_DIFFAE_DIR = Path(__file__).resolve().parent / "toy_diffae_model"
TOY_HDAE_DIR = Path(__file__).resolve().parent / "toy_hdae_model"
SHIPPED = {"toy-diffae": TOY_DIFFAE_DIR, "toy-hdae": TOY_HDAE_DIR}


@dataclass
class DiffAERecipe:
    """How toy-diffae is built and trained (the shipped folder's recipe.json records it)."""

    image_size: int = 32
    style: str = "v2"
    z_dim: int = 128  # the toy world has 8 factors and colours: 128 holds them with room, and stays cheap
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    attention: bool = True  # at the deepest level (8 x 8)
    num_train_timesteps: int = 1000
    steps: int = 4800  # the shipped model's (40 min on one core of the 2-core EPYC, shared)
    batch_size: int = 16
    lr: float = 3e-4
    ema_decay: float = 0.999
    latent_n: int = 8192
    latent_steps: int = 3000
    seed: int = 0
    checkpoint_every: int = 200
    levels: tuple[int, ...] = ()  # HDAE: code sizes of the encoder's shallower stages, finest first (none: DiffAE)
    init_from: str = ""  # an autoencoder (toy-diffae, a folder) whose weights start the training: a fine-tune

    @property
    def code_dim(self) -> int:
        """z_sem's size: the deepest code and (HDAE) every level's."""
        return self.z_dim + sum(self.levels)


HDAE_RECIPE = {"levels": (32, 32), "init_from": "toy-diffae", "steps": 1600, "lr": 1e-4, "seed": 1}
"""toy-hdae: toy-diffae fine-tuned with codes of its encoder's 16 px and 8 px stages (32 numbers
each: global-average-pooled features, mostly colour and texture statistics at 32 px) read by the
decoder's 32 px and 16 px levels; the level maps start at zero, so step 0 is toy-diffae."""


def recipe_from_dict(d: dict) -> DiffAERecipe:
    d = dict(d)
    for key in ("encoder_channels", "block_out_channels", "levels"):
        if key in d:
            d[key] = tuple(d[key])
    return DiffAERecipe(**d)


def build(recipe: DiffAERecipe):
    """(DiffAE, DDPMScheduler) of the recipe, randomly initialised."""
    from diffusers import DDPMScheduler, UNet2DModel

    from hspace.hcore.diffae import DiffAE, SemanticEncoder

    torch.manual_seed(recipe.seed)
    n = len(recipe.block_out_channels)
    down, up = ["DownBlock2D"] * n, ["UpBlock2D"] * n
    if recipe.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    unet = UNet2DModel(
        sample_size=recipe.image_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=recipe.block_out_channels, down_block_types=tuple(down), up_block_types=tuple(up),
        class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8,
        attention_head_dim=min(32, recipe.block_out_channels[-1]),
    )  # fmt: skip
    encoder = SemanticEncoder(recipe.z_dim, recipe.encoder_channels, recipe.image_size, recipe.levels)
    scheduler = DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              clip_sample=False)  # fmt: skip
    return DiffAE(encoder, unet, recipe.z_dim, recipe.levels), scheduler


def diffae_files(folder: Path) -> dict[str, Path]:
    """The folder's safetensors files: the encoder (and z_sem's map into the time embedding),
    and the latent DDPM with z_sem's mean and std."""
    return {"encoder": Path(folder) / "encoder.safetensors", "latent": Path(folder) / "latent.safetensors"}


def diffae_fingerprint(spec: str | Path) -> str:
    """sha256 over the decoder's config and weights and the encoder's file: what a z_sem
    direction records, so that it is refused on another autoencoder's code."""
    import hashlib

    from hspace.data.models import weights_sha256

    folder = diffae_folder(spec)
    encoder = diffae_files(folder)["encoder"]
    if not encoder.is_file():
        raise RunError(
            f"{folder} is no diffusion-autoencoder folder (no {encoder.name}): `hspace train-toy --recipe diffae`"
        )
    digest = hashlib.sha256(weights_sha256(folder / "unet").encode())
    digest.update(encoder.read_bytes())
    return digest.hexdigest()


def diffae_folder(spec: str | Path) -> Path:
    """``toy-diffae`` or ``toy-hdae`` (the shipped ones) or a folder."""
    return SHIPPED.get(str(spec)) or Path(spec).expanduser()


def encoder_state(model) -> dict:
    """What encoder.safetensors holds: the encoder and the maps of its codes into the decoder's
    time embedding (prefixed ``encoder.``, ``z_to_emb.``, ``level_to_emb.``)."""
    parts = {"encoder": model.encoder, "z_to_emb": model.z_to_emb, "level_to_emb": model.level_to_emb}
    return {f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()}


def load_diffae(spec: str | Path, device: str = "cpu"):
    """(DiffAE, its DDPMScheduler, LatentDDPM, {"mean", "std"} of z_sem); RunError naming what
    is missing or does not fit."""
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import load_file

    from hspace.hcore.diffae import LatentDDPM

    folder = diffae_folder(spec)
    try:
        recipe = recipe_from_dict(json.loads((folder / "recipe.json").read_text()))
        model, _ = build(recipe)
        model.unet = UNet2DModel.from_pretrained(folder / "unet")
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        enc = load_file(str(diffae_files(folder)["encoder"]))
        for name in ("encoder", "z_to_emb", "level_to_emb"):
            getattr(model, name).load_state_dict(_part(enc, f"{name}."))
        lat = load_file(str(diffae_files(folder)["latent"]))
        latent = LatentDDPM(recipe.code_dim)
        latent.load_state_dict({k.removeprefix("latent."): v for k, v in lat.items() if k.startswith("latent.")})
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise RunError(f"{folder} is no diffusion-autoencoder folder ({type(e).__name__}: {str(e)[:160]})") from None
    stats = {"mean": lat["z_mean"], "std": lat["z_std"]}
    return model.to(device).eval(), scheduler, latent.to(device).eval(), stats


def _part(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
