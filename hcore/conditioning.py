"""Text conditioning and classifier-free guidance for the sampler, so every U-Net is
called the same way (``unet_output``).

The paper samples unconditional pixel models; its eqs. (2)-(5) need only the U-Net's
prediction at x_t. For text-conditioned latent models (Stable Diffusion 1.x / 2.x, SDXL)
that prediction is the classifier-free-guided one (Ho & Salimans):

    out = out_u + s (out_c - out_u),

with out_u, out_c the U-Net's outputs for the unconditional (empty or negative prompt) and
the conditional text, from one U-Net pass over the batch [uncond; cond] (2B rows), s the
guidance scale. (For a v-prediction model out is v; v and eps are affine in the model
output with the same x_t for both halves, so guiding v and then converting equals
converting and then guiding eps.)

- ``UNet2DModel`` (the paper's models): ``conditioning=None``, no extra arguments.
- ``UNet2DConditionModel`` (SD 1.x / 2.x): ``encoder_hidden_states`` (B, L, D).
- SDXL adds ``added_cond_kwargs={"text_embeds": (B, P), "time_ids": (B, 6)}``.

``encode_prompt`` builds a ``Conditioning`` from tokenizer(s) and text encoder(s) the way
diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline ``encode_prompt`` do
(checked against diffusers 0.42 by tests/test_sd_core.py, which compares whole sampling runs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

log = logging.getLogger(__name__)


@dataclass
class TextEmbedding:
    """What one branch (conditional or unconditional) hands the U-Net.

    hidden_states: (B, L, D) ``encoder_hidden_states``; text_embeds: (B, P) SDXL's pooled
    text embedding; time_ids: (B, 6) SDXL's (original size, crop top-left, target size).
    Transformer denoisers (hcore.transformer): text_embeds is SD3's / FLUX's pooled CLIP
    embedding; attention_mask PixArt's T5 padding mask; guidance FLUX's embedded guidance value.
    B may be 1 for a prompt shared by the whole batch."""

    hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # PixArt's T5 padding mask (B, L)
    guidance: torch.Tensor | None = None  # FLUX's embedded guidance value (B,)

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    def _fields(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def expand(self, n: int) -> TextEmbedding:
        """The same embedding for a batch of ``n`` (from B = 1 or B = n)."""
        if self.batch_size == n:
            return self
        if self.batch_size != 1:
            raise ValueError(f"conditioning has {self.batch_size} rows for a batch of {n}: give 1 or {n}")
        return replace(self, **{k: v.expand(n, *v.shape[1:]) for k, v in self._fields().items()})

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextEmbedding:
        """On ``device`` in ``dtype`` (the attention mask keeps its integer dtype)."""
        return replace(
            self,
            **{
                k: v.to(device=device, dtype=None if k == "attention_mask" else dtype)
                for k, v in self._fields().items()
            },
        )


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else torch.cat([a, b])


@dataclass
class Conditioning:
    """The text a U-Net is conditioned on, with optional classifier-free guidance.

    cond: the prompt's embedding. uncond: the empty / negative prompt's embedding, or None
    for no guidance (one pass, out = out_c). guidance_scale: s in out_u + s (out_c - out_u).
    With guidance the U-Net sees [uncond; cond] and ``HSpaceHook.guided`` must be set (the
    sampler does)."""

    cond: TextEmbedding
    uncond: TextEmbedding | None = None
    guidance_scale: float = 1.0

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    def unet_kwargs(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments of ``unet(x, t, **kwargs)`` for ``batch_size`` samples: 2B rows
        [uncond; cond] when guided, else B."""
        cond = self.cond.expand(batch_size)
        if self.guided:
            u = self.uncond.expand(batch_size)
            cond = TextEmbedding(**{k: _cat(getattr(u, k), v) for k, v in vars(cond).items()})
        cond = cond.to(device, dtype)
        kwargs = {"encoder_hidden_states": cond.hidden_states}
        added = {k: v for k, v in cond._fields().items() if k != "hidden_states"}
        if added:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids, **added}
        return kwargs

    def check(self, unet: torch.nn.Module) -> None:
        """Raise ValueError if ``unet`` cannot take this conditioning (text width, SDXL's
        added embeddings), before any sampling time is spent."""
        cfg = unet.config
        width = getattr(cfg, "cross_attention_dim", None)
        if width is None:
            raise ValueError(f"{type(unet).__name__} takes no text conditioning: sample it with conditioning=None")
        branches = [self.cond] + ([self.uncond] if self.guided else [])
        for emb in branches:
            if emb.hidden_states.shape[-1] != width:
                raise ValueError(
                    f"text embedding width {emb.hidden_states.shape[-1]} != the U-Net's cross_attention_dim {width}"
                )
        text_time = getattr(cfg, "addition_embed_type", None) == "text_time"
        if getattr(cfg, "addition_embed_type", None) == "pooled":  # SD3 / FLUX (hcore.transformer)
            for emb in branches:
                if emb.text_embeds is None or emb.text_embeds.shape[-1] != cfg.pooled_dim:
                    got = None if emb.text_embeds is None else emb.text_embeds.shape[-1]
                    raise ValueError(f"this transformer needs a pooled text embedding of {cfg.pooled_dim}, got {got}")
            return
        for emb in branches:
            if text_time and (emb.text_embeds is None or emb.time_ids is None):
                raise ValueError("this U-Net (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
            if text_time:
                got = cfg.addition_time_embed_dim * emb.time_ids.shape[-1] + emb.text_embeds.shape[-1]
                if got != cfg.projection_class_embeddings_input_dim:
                    raise ValueError(
                        f"added embedding size {got} (time ids x {cfg.addition_time_embed_dim} + pooled "
                        f"{emb.text_embeds.shape[-1]}) != the U-Net's {cfg.projection_class_embeddings_input_dim}"
                    )
            if not text_time and (emb.text_embeds is not None or emb.time_ids is not None):
                raise ValueError("text_embeds / time_ids given for a U-Net without addition_embed_type='text_time'")


def unet_output(
    unet: torch.nn.Module, x_t: torch.Tensor, t: int, conditioning: Conditioning | None = None
) -> torch.Tensor:
    """The U-Net's prediction at (x_t, t) as float32 (eps, or v for a v-prediction model).

    conditioning None: ``unet(x_t, t)`` (pixel models). Otherwise with the text, and when
    guided from one pass over [x_t; x_t] with out = out_u + s (out_c - out_u). x_t is cast
    to the U-Net's dtype; the guidance is combined in float32."""
    dtype = next(unet.parameters()).dtype
    if conditioning is None:
        return unet(x_t.to(dtype), t).sample.float()
    batch = x_t.shape[0]
    x_in = torch.cat([x_t, x_t]) if conditioning.guided else x_t
    kwargs = conditioning.unet_kwargs(batch, x_t.device, dtype)
    out = unet(x_in.to(dtype), t, **kwargs).sample.float()
    if not conditioning.guided:
        return out
    out_u, out_c = out.chunk(2)
    return out_u + conditioning.guidance_scale * (out_c - out_u)


def _as_list(prompt: str | Sequence[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _tokens(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids padded to ``max_length`` and truncated there (logged, as diffusers does)."""
    for text in prompts:
        n = len(tokenizer(text).input_ids)
        if n > max_length:
            log.warning("prompt %r has %d tokens: truncated to the text encoder's %d", text, n, max_length)
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def _negatives(negative: str | Sequence[str] | None, n: int) -> list[str]:
    negs = [negative or ""] * n if negative is None or isinstance(negative, str) else list(negative)
    if len(negs) != n:
        raise ValueError(f"{len(negs)} negative prompts for {n} prompts")
    return negs


@torch.no_grad()
def _encode_sd(tokenizer, text_encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    """SD 1.x / 2.x: the text encoder's last hidden state (after its final layer norm)."""
    device = next(text_encoder.parameters()).device
    tokens = _tokens(tokenizer, prompts, max_length)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens["attention_mask"].to(device)
    out = text_encoder(tokens["input_ids"].to(device), attention_mask=mask)
    return out.last_hidden_state.to(text_encoder.dtype)


@torch.no_grad()
def _encode_xl(tokenizers, text_encoders, prompts: list[list[str]], max_length: int | None = None):
    """SDXL: the penultimate hidden states of both encoders, concatenated along the
    width, and the pooled (projected) text embedding of the last encoder. Tokens are
    padded to ``max_length`` (None: each tokenizer's model_max_length)."""
    states, pooled = [], None
    for tokenizer, encoder, texts in zip(tokenizers, text_encoders, prompts, strict=True):
        device = next(encoder.parameters()).device
        length = tokenizer.model_max_length if max_length is None else max_length
        out = encoder(_tokens(tokenizer, texts, length)["input_ids"].to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise ValueError(
            f"SDXL's last text encoder must give a pooled projection (CLIPTextModelWithProjection), "
            f"got {type(text_encoders[-1]).__name__}"
        )
    dtype = text_encoders[-1].dtype
    return torch.cat(states, dim=-1).to(dtype), pooled.to(dtype)


def encode_prompt(
    prompt: str | Sequence[str],
    tokenizers,
    text_encoders,
    *,
    negative_prompt: str | Sequence[str] | None = None,
    guidance_scale: float = 7.5,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    force_zeros_for_empty_prompt: bool = True,
) -> Conditioning:
    """Encode prompts into a ``Conditioning``, as diffusers' pipelines' ``encode_prompt``.

    tokenizers / text_encoders: one each (SD 1.x / 2.x) or two each (SDXL: CLIPTextModel,
    CLIPTextModelWithProjection), or a single object for one. Each prompt is tokenized,
    padded to ``tokenizer.model_max_length`` and truncated.

    - SD: the last hidden state of the encoder. Guidance (``guidance_scale > 1``, as in
      diffusers) encodes ``negative_prompt`` (default "", one per prompt).
    - SDXL: penultimate hidden states of both encoders concatenated; the pooled output of
      encoder 2 as ``text_embeds``; ``time_ids`` = original size + crop top-left + target
      size (each (height, width), in pixels; both sizes default to ``image_size``, which
      SDXL needs). ``prompt_2`` / ``negative_prompt_2`` go to encoder 2 (default: the same
      texts). With no negative prompt and ``force_zeros_for_empty_prompt`` (the SDXL base
      pipeline's setting), the unconditional branch is all zeros, embeddings and pooled
      alike, while its time ids equal the conditional ones.

    Returns embeddings with one row per prompt (1 for a single string: it broadcasts over
    the sampler's batch) in the text encoder's dtype.
    """
    tokenizers = list(tokenizers) if isinstance(tokenizers, list | tuple) else [tokenizers]
    text_encoders = list(text_encoders) if isinstance(text_encoders, list | tuple) else [text_encoders]
    if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
        raise ValueError(
            f"give 1 or 2 tokenizers and as many text encoders, got {len(tokenizers)} and {len(text_encoders)}"
        )
    prompts = _as_list(prompt)
    guided = guidance_scale > 1
    n = len(prompts)
    if len(tokenizers) == 1:
        tokenizer, encoder = tokenizers[0], text_encoders[0]
        cond = _encode_sd(tokenizer, encoder, prompts, tokenizer.model_max_length)
        uncond = None
        if guided:
            uncond = TextEmbedding(_encode_sd(tokenizer, encoder, _negatives(negative_prompt, n), cond.shape[1]))
        return Conditioning(TextEmbedding(cond), uncond, float(guidance_scale))

    original_size = original_size or image_size
    target_size = target_size or image_size
    if original_size is None or target_size is None:
        raise ValueError("SDXL's time ids need the image size: pass image_size=(height, width) in pixels")
    prompts_2 = _as_list(prompt_2) if prompt_2 is not None else prompts
    hidden, pooled = _encode_xl(tokenizers, text_encoders, [prompts, prompts_2])
    time_ids = torch.tensor([[*original_size, *crops_coords_top_left, *target_size]], dtype=hidden.dtype)
    cond = TextEmbedding(hidden, pooled, time_ids.expand(n, -1).to(hidden.device))
    uncond = None
    if guided and negative_prompt is None and force_zeros_for_empty_prompt:
        uncond = TextEmbedding(torch.zeros_like(hidden), torch.zeros_like(pooled), cond.time_ids)
    elif guided:
        negs = _negatives(negative_prompt, n)
        negs_2 = _negatives(negative_prompt_2, n) if negative_prompt_2 is not None else negs
        u_hidden, u_pooled = _encode_xl(tokenizers, text_encoders, [negs, negs_2], hidden.shape[1])
        uncond = TextEmbedding(u_hidden, u_pooled, cond.time_ids)
    return Conditioning(cond, uncond, float(guidance_scale))


def encode_for_pipeline(pipe, prompt: str | Sequence[str], **kwargs) -> Conditioning:
    """``encode_prompt`` with a loaded diffusers pipeline's tokenizer(s) and text
    encoder(s) (read as attributes, nothing of the pipeline runs), its
    ``force_zeros_for_empty_prompt`` setting and its default image size
    (``unet.config.sample_size * vae_scale_factor``) for SDXL's time ids."""
    tokenizers, encoders = [pipe.tokenizer], [pipe.text_encoder]
    if getattr(pipe, "text_encoder_2", None) is not None:
        tokenizers.append(pipe.tokenizer_2)
        encoders.append(pipe.text_encoder_2)
        kwargs.setdefault("force_zeros_for_empty_prompt", bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
        size = pipe.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        kwargs.setdefault("image_size", tuple(s * pipe.vae_scale_factor for s in size))
    return encode_prompt(prompt, tokenizers, encoders, **kwargs)
