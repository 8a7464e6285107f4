"""toy-sd: a tiny latent, text-conditioned model shaped like Stable Diffusion, trained on the
toy world's renders and their captions (data/toy/captions.py), shipped in ``data/toy_sd_model/``
as a StableDiffusionPipeline folder (``--model toy-sd``).

    vae/           AutoencoderKL, 32 px renders <-> 4x8x8 latents (3 levels: 4 px per cell)
    text_encoder/  CLIPTextModel, trained from scratch with the U-Net
    tokenizer/     CLIPTokenizer whose BPE merges make every caption word one token
    unet/          UNet2DConditionModel on 8x8 latents: a plain level at 8x8, cross-attention at
                   4x4 and in the mid block, whose output h is 128x4x4 (as the toy DDPM's)
    scheduler/     DDIM with SD's betas (scaled_linear 0.00085..0.012, 1000 steps), epsilon

Training (data/toy/train_sd.py) runs in two phases from one checkpoint folder: the VAE on
fresh renders, then the U-Net and text encoder on the VAE latents of a fixed set of renders
with their captions, dropping the caption (the empty text) for ``caption_dropout`` of them
so classifier-free guidance works, and dropping the skips of the deepest up block for half
of them (hcore.training.SkipDropout: as for the toy DDPM, a small model otherwise decodes
from the skips and ignores h).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hspace.data.catalog import replace_folder

TOY_SD_DIR = Path(__file__).resolve().parent / "toy_sd_model"
CAPTION_WORDS = (
    "a smiling serious young old man woman person wearing without glasses and or hat head turned left right ,"
).split()


@dataclass(frozen=True)
class ToySDRecipe:
    """How toy-sd is built and trained (the shipped folder's recipe.json records it)."""

    image_size: int = 32
    style: str = "v2"  # toyfaces.STYLES
    p_state: float = 0.7  # captions: P(an attribute is stated)
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # on the per-image KL against the per-image squared error (as SD's VAE)
    # text encoder
    text_hidden: int = 64
    text_layers: int = 3
    max_tokens: int = 24
    # U-Net
    unet_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    heads: int = 4
    unet_steps: int = 12000
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 300
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1
    skip_dropout: float = 0.5
    data_n: int = 50_000  # renders (seeds DATA_SEED..) whose latents the U-Net trains on
    seed: int = 0
    checkpoint_every: int = 500


DATA_SEED = 3 << 40  # toy-sd training renders: seeds from here on (the oracle's are 1 << 40, 2 << 40)
RESUMABLE_FIELDS = ("unet_steps", "checkpoint_every")


def recipe_from_dict(raw: dict) -> ToySDRecipe:
    from hspace.data.toy.recipe import recipe_from_json

    return recipe_from_json(ToySDRecipe, raw, ("vae_channels", "unet_channels"), "toy-sd")


def latent_size(recipe: ToySDRecipe) -> int:
    return recipe.image_size // 2 ** (len(recipe.vae_channels) - 1)


# ----------------------------------------------------------------------------- tokenizer


def bpe_merges(words) -> list[tuple[str, str]]:
    """BPE merges learnt on ``words`` (each counted once) until every word is one symbol, in
    CLIP's convention (the last character carries ``</w>``): the most frequent adjacent pair
    first, ties broken by the pair's text, so the list is a function of the word set."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter((a, b) for s in seqs for a, b in zip(s[:-1], s[1:], strict=True))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1
    return merges


def write_tokenizer(folder: Path, max_tokens: int):
    """A CLIPTokenizer whose vocabulary is every letter, digit and a little punctuation (so
    any text tokenizes) plus the merges that make each caption word a single token."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789!,.-'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = bpe_merges(CAPTION_WORDS)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_tokens)
    tok.save_pretrained(folder)
    return tok


# ----------------------------------------------------------------------------- models


def build_vae(recipe: ToySDRecipe, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    n = len(recipe.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(recipe.vae_channels),
        layers_per_block=1,
        latent_channels=recipe.latent_channels,
        norm_num_groups=16,
        sample_size=recipe.image_size,
        scaling_factor=scaling_factor,
    )


def build_text_encoder(recipe: ToySDRecipe, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=recipe.text_hidden,
            intermediate_size=4 * recipe.text_hidden,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=4,
            max_position_embeddings=recipe.max_tokens,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="quick_gelu",
        )
    )


def build_unet(recipe: ToySDRecipe):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size(recipe),
        in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels,
        layers_per_block=recipe.layers_per_block,
        block_out_channels=tuple(recipe.unet_channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=recipe.text_hidden,
        attention_head_dim=recipe.heads,  # diffusers' name for the number of heads here
        norm_num_groups=16,
    )


def build_scheduler():
    """SD's noise schedule as a DDIM config (what hspace samples with)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, recipe: ToySDRecipe, quality: dict | None = None):
    """Write ``out`` as a StableDiffusionPipeline folder (atomically: ``out.tmp`` swapped in),
    with recipe.json (and quality.json: the measured VAE error, adherence, probe)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp)
    # SD's classic tokenizer files beside tokenizer.json, for readers of the slow format
    (tmp / "tokenizer" / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    merges = "".join(f"{a} {b}\n" for a, b in bpe_merges(CAPTION_WORDS))
    (tmp / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + merges)
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    if quality is not None:
        (tmp / "quality.json").write_text(json.dumps(quality, indent=2))
    replace_folder(tmp, out)
    return out


def renders(first_seed: int, n: int, recipe: ToySDRecipe) -> tuple[torch.Tensor, list[str], object]:
    """Renders of seeds first_seed.. as (n, 3, H, W) in [-1, 1], their captions and factors."""
    import numpy as np

    from hspace.data.toy import captions
    from hspace.data.toy import faces as toyfaces
    from hspace.hcore.sampler import to_unit

    seeds = np.arange(first_seed, first_seed + n)
    images, factors = toyfaces.render_batch(seeds, recipe.image_size, style=recipe.style)
    texts = [captions.caption(factors, i, int(s), recipe.p_state)[0] for i, s in enumerate(seeds)]
    return to_unit(images.transpose(0, 3, 1, 2)), texts, factors
