"""Transformer denoisers (PixArt-alpha, SD3, FLUX) behind the U-Net's call, so the sampler, the
h hook and every stage drive them as they drive a U-Net (composition: the diffusers model runs
its own forward, unchanged).

A transformer has no bottleneck: h is the output of one of its blocks, the image tokens
(B, N, D) (of a joint text-image block's (text, image) pair, the image stream: hcore.hooks).
The tokens lie row-major on the latent's patch grid (diffusers' PatchEmbed: a stride-p conv,
flattened; FLUX packs 2x2 latent cells per token), so h is viewed as (B, D, rows, cols) by a
reshape (``to_chw``; ``to_tokens`` is its exact inverse) and stored, projected and edited in
that shape like a U-Net's (C, H, W).

``TransformerDenoiser(transformer)(x_t, t, encoder_hidden_states=..., added_cond_kwargs=...)``
takes the latent x_t as (B, C, H, W) and returns ``.sample`` in that shape, each family's
input conventions applied the way its diffusers pipeline applies them:

- PixArt-alpha (``PixArtTransformer2DModel``; eps-prediction, DDPM betas, so DDIM as for SD):
  the T5 text with its attention mask; a learned-sigma output (2C channels) gives its first C
  (the eps); the 1024-px model's micro-conditions (resolution, aspect ratio) from the size.
- SD3 (``SD3Transformer2DModel``; flow matching, v): the joint text and the pooled CLIP
  embedding; the timestep is sigma * 1000.
- FLUX (``FluxTransformer2DModel``; flow matching, v): the latent packed 2x2 into tokens
  (the pipeline's ``_pack_latents``), position ids of the text (zeros) and of the image
  (row, col), the timestep sigma * 1000 cast to the model dtype and divided by 1000 (the
  pipeline's order), and for guidance-distilled models the guidance value as an embedding
  (the conditioning's ``guidance``; FLUX has no classifier-free guidance pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

FAMILIES = {"PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PIPELINES = {"PixArtAlphaPipeline": "pixart", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLOW_FAMILIES = ("sd3", "flux")
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (its config has no sample size): 1024 px


def latent_shape(config, sample_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of a transformer's latent x_t from its config (config.json's dict or the model's):
    FLUX packs 2x2 latent cells per token (C = in_channels / 4) and has no sample size of its own."""
    flux = config.get("_class_name") == "FluxTransformer2DModel"
    channels = config["in_channels"] // 4 if flux else config["in_channels"]
    size = int(sample_size or config.get("sample_size") or DEFAULT_SAMPLE_SIZE)
    return channels, size, size


@dataclass
class DenoiserOutput:
    sample: torch.Tensor


class TransformerDenoiser(torch.nn.Module):
    """A diffusers transformer called like a U-Net (see the module doc).

    sample_size: the latent side the model is sampled at (default: the transformer's config,
    else FLUX's pipeline default 128)."""

    def __init__(self, transformer: torch.nn.Module, sample_size: int | None = None):
        super().__init__()
        name = type(transformer).__name__
        if name not in FAMILIES:
            raise ValueError(f"{name} is not a transformer hspace drives (known: {', '.join(FAMILIES)})")
        self.transformer = transformer
        self.family = FAMILIES[name]
        self.grid: tuple[int, int] | None = None
        cfg = transformer.config
        channels, size, _ = latent_shape({**cfg, "_class_name": name}, sample_size)
        text = cfg.caption_channels if self.family == "pixart" else cfg.joint_attention_dim
        self.config = FrozenDict(
            in_channels=channels,
            out_channels=channels,
            sample_size=size,
            cross_attention_dim=int(text),
            addition_embed_type=None if self.family == "pixart" else "pooled",
            pooled_dim=None if self.family == "pixart" else int(cfg.pooled_projection_dim),
            family=self.family,
            patch=2 if self.family == "flux" else int(cfg.patch_size),
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """The transformer blocks in the order they run, with their names."""
        named = [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.transformer.transformer_blocks)]
        singles = getattr(self.transformer, "single_transformer_blocks", None) or []
        return named + [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(singles)]

    @property
    def mid_block(self) -> torch.nn.Module:
        """The middle block (of all blocks in running order): the default h point."""
        blocks = self.blocks()
        return blocks[len(blocks) // 2][1]

    def middle_name(self) -> str:
        blocks = self.blocks()
        return blocks[len(blocks) // 2][0]

    # the token <-> (D, rows, cols) view of h (row-major tokens on the patch grid)
    def to_chw(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, cols = self._grid(tokens.shape[1])
        return tokens.reshape(tokens.shape[0], rows, cols, tokens.shape[2]).permute(0, 3, 1, 2)

    def to_tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.flatten(2).transpose(1, 2)

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid is None or self.grid[0] * self.grid[1] != n:
            raise ValueError(f"{n} image tokens do not fit the patch grid {self.grid} of the latest forward")
        return self.grid

    def note_call(self, args: tuple, kwargs: dict) -> None:
        """Set the token grid from a call of the transformer itself (inside its diffusers pipeline:
        hspace.apply), as ``forward`` sets it: the latent's side over the patch, FLUX's from its
        image position ids."""
        if self.family == "flux":
            ids = kwargs["img_ids"]
            self.grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            return
        x = args[0] if args else kwargs["hidden_states"]
        self.grid = (x.shape[2] // self.config.patch, x.shape[3] // self.config.patch)

    def zero_inputs(self) -> tuple[tuple, dict]:
        """One zero sample and zero text (for the shape probe of an h point)."""
        cfg, dtype = self.config, self.dtype
        device = next(self.transformer.parameters()).device
        x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=dtype, device=device)
        added = {"guidance": torch.ones(1, dtype=dtype, device=device)}  # read by FLUX.1-dev-like models only
        if cfg.pooled_dim:
            added["text_embeds"] = torch.zeros(1, cfg.pooled_dim, dtype=dtype, device=device)
        text = torch.zeros(1, 1, cfg.cross_attention_dim, dtype=dtype, device=device)
        return (x, torch.tensor([500.0], device=device)), {"encoder_hidden_states": text, "added_cond_kwargs": added}

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        added = added_cond_kwargs or {}
        batch, _, height, width = sample.shape
        p = self.config.patch
        if height % p or width % p:
            raise ValueError(f"latent {height}x{width} is not a multiple of the patch size {p}")
        self.grid = (height // p, width // p)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        if self.family == "pixart":
            out = self._pixart(sample, t, encoder_hidden_states, added)
        elif self.family == "sd3":
            out = self.transformer(
                hidden_states=sample,
                timestep=t,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=added["text_embeds"],
                return_dict=False,
            )[0]
        else:
            out = self._flux(sample, t, encoder_hidden_states, added)
        return DenoiserOutput(out) if return_dict else (out,)

    def _pixart(self, x, t, text, added):
        cfg = self.transformer.config
        micro = {"resolution": None, "aspect_ratio": None}
        if cfg.sample_size == 128:  # the 1024-px model's micro-conditions, as PixArtAlphaPipeline
            pixels = [x.shape[2] * 8, x.shape[3] * 8]
            micro = {
                "resolution": torch.tensor([pixels], dtype=text.dtype, device=x.device).repeat(x.shape[0], 1),
                "aspect_ratio": torch.tensor([[pixels[0] / pixels[1]]], dtype=text.dtype, device=x.device).repeat(
                    x.shape[0], 1
                ),
            }
        out = self.transformer(
            x,
            encoder_hidden_states=text,
            encoder_attention_mask=added.get("attention_mask"),
            timestep=t,
            added_cond_kwargs=micro,
            return_dict=False,
        )[0]
        if cfg.out_channels // 2 == cfg.in_channels:  # learned sigma: the eps is the first half
            out = out.chunk(2, dim=1)[0]
        return out

    def _flux(self, x, t, text, added):
        from diffusers import FluxPipeline

        batch, channels, height, width = x.shape
        tokens = FluxPipeline._pack_latents(x, batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:  # FLUX.1-dev: the guidance value as an embedding
            guidance = added.get("guidance")
            if guidance is None:
                raise ValueError("this FLUX model embeds a guidance value: encode the text with a guidance scale")
        out = self.transformer(
            hidden_states=tokens,
            timestep=t.to(x.dtype) / 1000,  # the pipeline casts, then divides (exact in bfloat16 too)
            guidance=guidance,
            pooled_projections=added["text_embeds"],
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, height, width, 1)

    def flow_sigmas(self, scheduler, steps: int):
        """A fresh copy of the flow-matching scheduler set for ``steps`` as the family's pipeline
        sets it: FLUX passes sigmas linspace(1, 1/steps) and the resolution-dependent shift mu;
        SD3 lets the scheduler space them (mu only where its config shifts dynamically)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = type(scheduler).from_config(scheduler.config)
        cfg = sched.config
        seq = (self.config.sample_size // self.config.patch) ** 2
        kwargs = {}
        if cfg.get("use_dynamic_shifting"):
            kwargs["mu"] = calculate_shift(
                seq,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15 if self.family == "flux" else 1.16),
            )
        if self.family == "flux":
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kwargs)
        else:
            sched.set_timesteps(steps, **kwargs)
        return sched


def family_of_pipeline(pipe) -> str:
    name = type(pipe).__name__
    if name not in PIPELINES:
        raise ValueError(f"{name} is not a transformer pipeline hspace knows (known: {', '.join(PIPELINES)})")
    return PIPELINES[name]


@torch.no_grad()
def encode_with_pipeline(pipe, prompts: list[str], negative_prompt: str | None = None, guidance_scale: float = 1.0):
    """A ``Conditioning`` from the pipeline's own ``encode_prompt`` (its tokenizers and text
    encoders; nothing else of the pipeline runs), one row per prompt, at the pipeline's default
    text length. PixArt and SD3: classifier-free guidance for ``guidance_scale`` > 1 with the
    negative prompt ("" by default), as their pipelines; FLUX: no guidance pass, the scale is
    the embedded guidance value (guidance-distilled models; ignored by the others)."""
    from hspace.hcore.conditioning import Conditioning, TextEmbedding

    family = family_of_pipeline(pipe)
    device = next(p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()).device
    guided = guidance_scale > 1 and family != "flux"
    negative = negative_prompt or ""
    if family == "pixart":
        pe, pm, npe, npm = pipe.encode_prompt(
            prompts, guided, negative_prompt=negative, device=device, clean_caption=False
        )
        uncond = TextEmbedding(npe, attention_mask=npm) if guided else None
        return Conditioning(TextEmbedding(pe, attention_mask=pm), uncond, float(guidance_scale))
    if family == "sd3":
        pe, npe, pp, npp = pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=guided, negative_prompt=negative
        )
        uncond = TextEmbedding(npe, npp) if guided else None
        return Conditioning(TextEmbedding(pe, pp), uncond, float(guidance_scale))
    pe, pp, _ = pipe.encode_prompt(prompts, None, device=device)
    value = torch.full([len(prompts)], float(guidance_scale))  # read only by models with guidance_embeds
    return Conditioning(TextEmbedding(pe, pp, guidance=value), None, float(guidance_scale))
