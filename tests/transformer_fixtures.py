"""Tiny random-weight transformer pipelines (PixArt-alpha, SD3, FLUX), built offline as diffusers'
fast tests build theirs and saved with ``save_pretrained``, so tests load them through the same
``from_pretrained`` path a user's folder takes.

Tokenizers are made from in-memory vocabularies (transformers 5's CLIPTokenizer and T5Tokenizer
take them: no hub, no sentencepiece): a byte-level CLIP vocabulary without merges, a unigram T5
vocabulary of letters. The VAE halves the image (vae_scale_factor 2), the transformers patch 2x2,
so 32 px images are 16x16 latents and 8x8 grids of image tokens. Schedulers as the real models
ship them: PixArt's DPM-Solver (hspace samples it with DDIM, same betas), SD3-medium's flow
matching with shift 3, FLUX.1-dev's with dynamic shifting. ``flux`` is FLUX.1-schnell-like (no
guidance embedding), ``flux-dev`` embeds the guidance value.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

FAMILIES = ("pixart", "sd3", "flux", "flux-dev")
IMAGE = 32  # px; latents 16x16
CALL = {  # what the pipelines are called with (PixArt's size binning needs a 32/64/128 model)
    "pixart": dict(guidance_scale=4.5, use_resolution_binning=False, clean_caption=False),
    "sd3": dict(guidance_scale=5.0),
    "flux": dict(guidance_scale=3.5),
    "flux-dev": dict(guidance_scale=3.5),
}


def clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted(ByteLevel.alphabet())
    vocab.update({c: 2 + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip(seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=514, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(cfg).eval()


def vae(seed: int, flow: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return AutoencoderKL(
        in_channels=3, out_channels=3, sample_size=IMAGE, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, **(kw if flow else dict(scaling_factor=0.18215)),
    ).eval()  # fmt: skip


def build(family: str):
    """The pipeline object of ``family`` (random weights, fixed seeds)."""
    import diffusers as d

    torch.manual_seed(0)
    if family == "pixart":
        transformer = d.PixArtTransformer2DModel(
            sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6,
        )  # fmt: skip
        return d.PixArtAlphaPipeline(
            transformer=transformer.eval(), scheduler=d.DPMSolverMultistepScheduler(), vae=vae(1, False),
            text_encoder=t5(4), tokenizer=t5_tokenizer(),
        )  # fmt: skip
    if family == "sd3":
        transformer = d.SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32,
        )  # fmt: skip
        return d.StableDiffusion3Pipeline(
            transformer=transformer.eval(), scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(1, True),
            text_encoder=clip(2, True), tokenizer=clip_tokenizer(), text_encoder_2=clip(3, True),
            tokenizer_2=clip_tokenizer(), text_encoder_3=t5(4), tokenizer_3=t5_tokenizer(),
        )  # fmt: skip
    transformer = d.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=family == "flux-dev", axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    scheduler = d.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return d.FluxPipeline(
        transformer=transformer.eval(), scheduler=scheduler, vae=vae(1, True), text_encoder=clip(2, False),
        tokenizer=clip_tokenizer(), text_encoder_2=t5(4), tokenizer_2=t5_tokenizer(),
    )  # fmt: skip


def save(family: str, folder: Path) -> Path:
    """``build(family)`` saved with save_pretrained into ``folder`` (safetensors). FLUX's config
    has no sample size (its pipeline defaults to 128 latent cells, 1024 px): the tiny one records
    16 there, which hspace reads (diffusers keeps the key, warning that the model ignores it)."""
    import json

    build(family).save_pretrained(folder, safe_serialization=True)
    if family.startswith("flux"):
        path = Path(folder) / "transformer" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "sample_size": IMAGE // 2}))
    return Path(folder)


def latents(family: str, x_T: torch.Tensor) -> torch.Tensor:
    """hspace's x_T (B, C, H, W) as the family's pipeline takes ``latents=`` (FLUX: packed 2x2)."""
    from diffusers import FluxPipeline

    if not family.startswith("flux"):
        return x_T
    b, c, h, w = x_T.shape
    return FluxPipeline._pack_latents(x_T, b, c, h, w)


def pipeline(folder: Path, family: str, dtype=torch.float32):
    """The saved pipeline loaded with diffusers' own from_pretrained; PixArt's scheduler swapped
    for DDIM of the same betas, P_t unclipped (as hspace samples it); ``dtype`` for the transformer."""
    import json

    import diffusers

    cls = getattr(diffusers, json.loads((Path(folder) / "transformer" / "config.json").read_text())["_class_name"])
    transformer = cls.from_pretrained(Path(folder) / "transformer", dtype=dtype)  # as diffusers casts, buffers too
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        folder, transformer=transformer, dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    if family == "pixart":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe
