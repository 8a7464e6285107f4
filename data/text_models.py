"""Latent, text-conditioned models (Stable Diffusion 1.x / 2.x, SDXL): what their pipeline
folder holds besides the U-Net and scheduler (data/models.py loads those), loaded through
diffusers' and transformers' own ``from_pretrained`` from a local folder or the HF cache.

    model_index.json   _class_name StableDiffusionPipeline | StableDiffusionXLPipeline
    unet/ scheduler/   as for pixel models (the scheduler is replaced by DDIM, same betas)
    vae/               AutoencoderKL: x_0 = D(z_0 / scaling_factor), kept in float32
    text_encoder/ tokenizer/         CLIP (SD 1.x / 2.x)
    text_encoder_2/ tokenizer_2/     OpenCLIP with projection (SDXL)

Transformer pipelines (PixArtAlphaPipeline, StableDiffusion3Pipeline, FluxPipeline: kinds
pixart, sd3, flux) keep their denoiser in transformer/ (hcore.transformer drives it); their
tokenizers, T5 / CLIP encoders and VAE are loaded as the pipeline object itself without the
transformer and scheduler, and prompts go through its own ``encode_prompt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hspace.data.catalog import RunError

KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
TRANSFORMER_PIPELINES = {"PixArtAlphaPipeline": "pixart", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def _index(folder: Path) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e}); restore the model folder") from None


def pipeline_kind(folder: Path) -> str:
    """'pixel' (an unconditional U-Net), 'sd' (SD 1.x / 2.x), 'sdxl', or a transformer's 'pixart',
    'sd3', 'flux'; RunError for a model hspace cannot work in (a pipeline it does not know)."""
    folder = Path(folder)
    index = _index(folder)
    name = index.get("_class_name", "")
    if name in TRANSFORMER_PIPELINES:
        return TRANSFORMER_PIPELINES[name]
    if "unet" not in index and ("transformer" in index or (folder / "transformer").is_dir()):
        raise RunError(
            f"{folder} is a {name or 'transformer model'}: hspace samples the transformers of "
            f"{', '.join(TRANSFORMER_PIPELINES)} folders; save yours as one of those"
        )
    if name in KINDS:
        return KINDS[name]
    if "text_encoder" in index or "prior" in index:
        raise RunError(
            f"{folder} is a {name}: hspace knows StableDiffusionPipeline and StableDiffusionXLPipeline folders "
            "among text-conditioned models; save yours as one of those, or use a pixel DDPM"
        )
    return "pixel"


@dataclass
class TextParts:
    """The VAE, tokenizer(s) and text encoder(s) of an SD-family pipeline, in float32 (the
    SDXL VAE overflows in half precision; text is encoded once per prompt)."""

    kind: str
    vae: object
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    force_zeros_for_empty_prompt: bool = True
    pipeline: object = None  # a transformer pipeline without its transformer: encodes the prompts

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for every SD model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _load(cls, path: Path, what: str, **kw):
    if not path.is_dir():
        raise RunError(f"{path.parent} has no {path.name}/ ({what}); copy the whole pipeline folder")
    try:
        return cls.from_pretrained(path, local_files_only=True, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot load {what} from {path}: {first}; the files may be truncated or incomplete") from None


def _transformer_parts(folder: Path, kind: str, device: str) -> TextParts:
    """The pipeline of ``folder`` without its transformer and scheduler, in float32."""
    import diffusers
    import torch
    import transformers

    name = next(n for n, k in TRANSFORMER_PIPELINES.items() if k == kind)
    missing = [d for d in ("vae", "text_encoder", "tokenizer") if not (folder / d).is_dir()]
    if missing:
        raise RunError(f"{folder} has no {missing[0]}/; copy the whole pipeline folder")
    libs = [lib.utils.logging for lib in (diffusers, transformers)]
    bars = [log.is_progress_bar_enabled() for log in libs]
    for log in libs:
        log.disable_progress_bar()  # hspace shows its own progress
    try:
        pipe = getattr(diffusers, name).from_pretrained(
            folder, transformer=None, scheduler=None, dtype=torch.float32, local_files_only=True
        )
        pipe.to(device)
    except (OSError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot load the VAE / text encoders of {folder}: {first}; the files may be damaged") from None
    finally:
        for log, on in zip(libs, bars, strict=True):
            if on:
                log.enable_progress_bar()
    encoders = [m for k, m in sorted(pipe.components.items()) if k.startswith("text_encoder") and m is not None]
    tokenizers = [m for k, m in sorted(pipe.components.items()) if k.startswith("tokenizer") and m is not None]
    for m in [pipe.vae, *encoders]:
        m.eval().requires_grad_(False)
    return TextParts(kind, pipe.vae, tokenizers, encoders, False, pipe)


def load_text_parts(folder: Path, kind: str, device: str = "cpu") -> TextParts:
    """VAE, tokenizers and text encoders of the pipeline folder (``kind`` 'sd', 'sdxl', or a
    transformer's: then also the pipeline object that encodes prompts)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    if kind in TRANSFORMER_PIPELINES.values():
        return _transformer_parts(folder, kind, device)
    vae = _load(AutoencoderKL, folder / "vae", "the VAE", torch_dtype=torch.float32)
    tokenizers = [_load(CLIPTokenizer, folder / "tokenizer", "the tokenizer")]
    encoders = [_load(CLIPTextModel, folder / "text_encoder", "the text encoder", torch_dtype=torch.float32)]
    if kind == "sdxl":
        tokenizers.append(_load(CLIPTokenizer, folder / "tokenizer_2", "the second tokenizer"))
        encoders.append(
            _load(
                CLIPTextModelWithProjection,
                folder / "text_encoder_2",
                "the second text encoder",
                torch_dtype=torch.float32,
            )
        )
    try:
        vae = vae.to(device).eval().requires_grad_(False)
        encoders = [e.to(device).eval().requires_grad_(False) for e in encoders]
    except (RuntimeError, AssertionError) as e:
        raise RunError(f"cannot move the VAE / text encoders to device {device!r}: {str(e).splitlines()[0]}") from None
    zeros = bool(_index(folder).get("force_zeros_for_empty_prompt", True))
    return TextParts(kind, vae, tokenizers, encoders, zeros)
