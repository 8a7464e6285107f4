"""Tiny random-weight Stable Diffusion-family pipelines, built offline and saved with
``save_pretrained`` so tests load them through the same ``from_pretrained`` path a user's
folder takes.

- ``sd1``: StableDiffusionPipeline, epsilon prediction (like SD 1.x).
- ``sd2``: the same with ``prediction_type="v_prediction"`` and linear projections in the
  transformer blocks (like SD 2.x at 768 px).
- ``sdxl``: StableDiffusionXLPipeline: two text encoders (a CLIPTextModel and a
  CLIPTextModelWithProjection, of different widths so a mix-up shows), two tokenizers,
  ``addition_embed_type="text_time"``.

Shapes follow the real models in miniature: a four-level VAE (scale factor 8, as the real
ones), 8x8 latents (64 px images), a two-level U-Net whose mid block cross-attends to the
text (h is 64x4x4), and the real schedulers' configs (PNDM / DDIM / Euler for SD 1.x /
2.x / SDXL: scaled_linear betas, 1000 steps, steps_offset 1, set_alpha_to_one False,
clip_sample False). Building and saving all three takes about 3 s on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

KINDS = ("sd1", "sd2", "sdxl")
LATENT_SIZE = 8
VAE_LEVELS = 4  # vae_scale_factor = 2 ** (VAE_LEVELS - 1) = 8, as in SD
MAX_TOKENS = 16  # tokenizer.model_max_length = the text encoders' max_position_embeddings
IMAGE_SIZE = LATENT_SIZE * 2 ** (VAE_LEVELS - 1)  # 64 px


def char_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """A character-level CLIPTokenizer (no merges) written to ``folder``: every lowercase
    letter, digit and a little punctuation, each also in its end-of-word form."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789!,.-":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=MAX_TOKENS
    )


def _text_config(vocab_size: int, hidden: int, num_layers: int = 2, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
        **extra,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * VAE_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * VAE_LEVELS,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    ).eval()


def _scheduler(kind: str):
    """The shipped schedulers' configs in kind: PNDM for SD 1.x, DDIM (v-prediction) for
    SD 2.x, Euler for SDXL; all with the SD noise schedule and ``clip_sample: false`` (a key
    the real PNDM / Euler configs carry for the DDIM they may be swapped for)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
        timestep_spacing="leading",
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )
    cls = {"sd1": PNDMScheduler, "sd2": DDIMScheduler, "sdxl": EulerDiscreteScheduler}[kind]
    if kind == "sd1":
        config["skip_prk_steps"] = True
    return cls.from_config(config)


def tiny_sd_pipeline(kind: str = "sd1", seed: int = 0):
    """The pipeline object, not saved (the tokenizers' vocabularies are written to a
    temporary folder and read back)."""
    import tempfile

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with tempfile.TemporaryDirectory() as work:
        return _build(kind, seed, Path(work))


def _build(kind: str, seed: int, work: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind in ("sd1", "sd2"):
        tokenizer = char_tokenizer(work / "_tok")
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(len(tokenizer), 32)).eval()
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4) if kind == "sd2" else 4,
            norm_num_groups=8,
            use_linear_projection=kind == "sd2",
            upcast_attention=kind == "sd2",
        ).eval()
        torch.manual_seed(seed + 2)
        vae = _vae(0.18215)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(kind),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tokenizer = char_tokenizer(work / "_tok")
    tokenizer_2 = char_tokenizer(work / "_tok2", pad_token="!")  # as SDXL's second tokenizer
    hidden_1, hidden_2, projection_dim, time_dim = 16, 32, 24, 8
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), hidden_1)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(len(tokenizer_2), hidden_2, projection_dim=projection_dim)
    ).eval()
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=hidden_1 + hidden_2,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # six size/crop numbers, each embedded in time_dim, plus encoder 2's pooled output
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = _vae(0.13025)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(kind),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_sd(folder: Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Save a tiny random ``kind`` pipeline ("sd1" | "sd2" | "sdxl") into ``folder`` (a
    diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, and text_encoder_2/ + tokenizer_2/ for sdxl). Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_sd_pipeline(kind, seed).save_pretrained(folder)
    return folder


def load_tiny_sd(folder: Path, kind: str):
    """The pipeline saved by ``save_tiny_sd``, loaded back with ``from_pretrained``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
