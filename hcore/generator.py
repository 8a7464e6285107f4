"""From noise to images for every U-Net hspace samples (paper sec. 3, eqs. (2)-(5)).

A pixel model's sampler output is the image. A latent, text-conditioned model (Stable
Diffusion 1.x / 2.x, SDXL) adds two things around the same sampler: the text conditioning
with classifier-free guidance (hcore.conditioning, out = out_u + s (out_c - out_u)), and the
VAE decoder that turns the sampled latent z_0 into the image, x_0 = D(z_0 / scaling factor).
``TextSetup`` holds both with the run's prompts (sample i gets prompt i mod len, so every
replay conditions a sample on the text it was drawn with), and ``generate`` is the sampler
with them applied: ``generate(unet, scheduler, generators, ..., text=None)`` is exactly
``hcore.sampler.sample`` for a pixel model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from hspace.hcore.conditioning import Conditioning, encode_prompt
from hspace.hcore.sampler import draw_noise, make_generators, sample

EDIT_BRANCHES = ("both", "cond", "uncond")


@dataclass
class TextSetup:
    """How a text-conditioned latent model is sampled and decoded.

    prompts: one or more texts, sample i gets ``prompts[i % len(prompts)]``; negative_prompt:
    the unconditional branch's text (None: empty, or zeros where the SDXL pipeline does so);
    guidance_scale s (<= 1: no guidance, one U-Net pass); edit_branch: which half of the
    guided batch h-space edits go to (both, cond, uncond); image_size: pixels (SDXL's time
    ids). vae, tokenizers, text_encoders: the pipeline's own (data/text_models.py)."""

    vae: torch.nn.Module
    tokenizers: list
    text_encoders: list
    prompts: list[str]
    negative_prompt: str | None = None
    guidance_scale: float = 7.5
    edit_branch: str = "both"
    image_size: int | None = None
    force_zeros_for_empty_prompt: bool = True
    pipeline: object = None  # a transformer pipeline (PixArt, SD3, FLUX): its own encode_prompt
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("a text-conditioned model needs at least one prompt (an empty one is allowed)")
        if self.edit_branch not in EDIT_BRANCHES:
            raise ValueError(f"edit_branch must be one of {EDIT_BRANCHES}, got {self.edit_branch!r}")

    @property
    def guided(self) -> bool:
        """Whether the sampler runs [uncond; cond] (FLUX embeds its guidance value instead)."""
        return self.guidance_scale > 1 and type(self.pipeline).__name__ != "FluxPipeline"

    def prompts_for(self, indices: Sequence[int]) -> list[str]:
        return [self.prompts[int(i) % len(self.prompts)] for i in indices]

    def conditioning(self, prompts: Sequence[str]) -> Conditioning:
        """The guided conditioning of one batch, one prompt per row (encoded once per set and
        setting: a changed guidance scale or negative prompt is encoded anew)."""
        key = (tuple(prompts), self.guidance_scale, self.negative_prompt, self.image_size)
        if key not in self._cache:
            self._cache[key] = self._encode(list(prompts))
            if len(self._cache) > 64:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Conditioning:
        if self.pipeline is not None:  # PixArt, SD3, FLUX: the pipeline's own encode_prompt
            from hspace.hcore.transformer import encode_with_pipeline

            return encode_with_pipeline(self.pipeline, prompts, self.negative_prompt, self.guidance_scale)
        size = (self.image_size, self.image_size) if self.image_size else None
        return encode_prompt(
            prompts,
            self.tokenizers,
            self.text_encoders,
            negative_prompt=self.negative_prompt,
            guidance_scale=self.guidance_scale,
            image_size=size,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
        )

    def decode(self, z: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """x_0 = D(z_0 / scaling_factor (+ shift)) in [-1, 1], float32 (the VAE runs in float32);
        ``grad``: differentiable in z (a loss on the image that trains what made z)."""
        cfg = self.vae.config
        z = z.to(next(self.vae.parameters()).device, torch.float32) / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        with torch.set_grad_enabled(grad):
            return self.vae.decode(z).sample.float().clamp(-1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z_0 = E(x_0) * scaling_factor (the mean of the posterior: deterministic)."""
        cfg = self.vae.config
        x = x.to(next(self.vae.parameters()).device, torch.float32)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mean
        if getattr(cfg, "shift_factor", None):
            z = z - cfg.shift_factor
        return z * cfg.scaling_factor


def generate(
    unet: torch.nn.Module,
    scheduler,
    generators: Sequence[torch.Generator],
    num_inference_steps: int,
    eta=1.0,
    text: TextSetup | None = None,
    indices: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    **kwargs,
) -> torch.Tensor:
    """``hcore.sampler.sample`` (eqs. (2)-(5)), then, for a latent model, the VAE decoder:
    images (B, 3, R, R) in [-1, 1]. ``indices``: the samples' run indices, which pick their
    prompts (or give ``prompts``, one per generator). With ``stop_before`` the latent x_t
    is returned undecoded. An edit goes to the text setup's ``edit_branch``. An edit that
    ``decodes`` (a semantic code's decoder: hcore/edits/zsem.py) gives the images itself."""
    edit = kwargs.get("edit")
    if edit is not None and edit.decodes:
        given = [k for k in ("stop_before", "x_T", "noise") if kwargs.get(k) is not None]
        given += ["start_at"] if kwargs.get("start_at") else []
        if given:
            raise ValueError(f"a method that decodes with its own model gives finished images only, not {given[0]}")
        return edit.images()
    if text is None:
        edit = kwargs.get("edit")
        if edit is not None and edit.paired([]) is not None:
            raise ValueError("this editing method runs a source and a target prompt: it needs a text-conditioned model")
        return sample(unet, scheduler, generators, num_inference_steps, eta, **kwargs)
    if prompts is None:
        if indices is None:
            raise ValueError("a text-conditioned model needs the samples' indices (or their prompts)")
        prompts = text.prompts_for(indices)
    if len(prompts) != len(generators):
        raise ValueError(f"{len(prompts)} prompts for {len(generators)} samples")
    edit = kwargs.get("edit")
    if edit is not None:  # an h edit goes to the text setup's branch of the guided batch
        kwargs["edit"] = edit.with_branch(text.edit_branch if text.guided else "both")
    targets = kwargs["edit"].paired(list(prompts)) if edit is not None else None
    n = len(generators)
    if targets is not None:  # [sources; edits]: the same x_T and z_t (hcore/edits/attention.py)
        generators = [*generators, *(_twin(g) for g in generators)]
        prompts = [*prompts, *targets]
        for key in ("x_T", "noise"):
            if kwargs.get(key) is not None:
                kwargs[key] = torch.cat([kwargs[key], kwargs[key]])
    z = sample(unet, scheduler, generators, num_inference_steps, eta, conditioning=text.conditioning(prompts), **kwargs)
    z = z[n:] if targets is not None else z
    return z if kwargs.get("stop_before") is not None else text.decode(z)


def _twin(g: torch.Generator) -> torch.Generator:
    """A generator in the same state as ``g`` (it will draw what ``g`` draws)."""
    twin = torch.Generator(g.device)
    twin.set_state(g.get_state())
    return twin


@dataclass(frozen=True, eq=False)
class Replay:
    """Everything that regenerates a run's samples exactly (paper sec. 3: x_T and z_{T:1} fix a
    sample, and both come from its own generator, seeded from the run seed and its index by
    ``hcore.sampler.sample_seed``): the run seed, the steps, eta, the hook point of h and, for a
    text-conditioned model, its setup (sample i's prompt, guidance, the VAE). Every stage and
    command that renders a run's sample again (edits, Table 1, Fig. 8, the Jacobian's x_t,
    inversion, supervision) goes through one of these."""

    seed: int
    steps: int
    eta: float | str | tuple = 1.0
    h_point: str = "output"
    text: TextSetup | None = None

    def with_text(self, text: TextSetup | None) -> Replay:
        """The same replay with a text setup (loaded after the settings were read)."""
        return replace(self, text=text)

    def generators(self, indices: Sequence[int]) -> list[torch.Generator]:
        """Sample i's own generator, for each i of ``indices`` (repeats allowed)."""
        return make_generators(self.seed, indices)

    def x_T(self, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """The samples' initial noise x_T (B, *shape): the first draw of each generator."""
        return draw_noise(self.generators(indices), shape)

    def render(self, unet: torch.nn.Module, scheduler, indices: Sequence[int], eta=None, **kwargs) -> torch.Tensor:
        """``generate`` for samples ``indices``: their generators, prompts, the steps and h
        point; ``eta`` other than the run's (e.g. 0: DDIM from the same x_T); ``kwargs`` as for
        ``hcore.sampler.sample`` (edit, on_step, x_T, noise, stop_before, start_at)."""
        indices = [int(i) for i in indices]
        eta = self.eta if eta is None else eta
        how = {"text": self.text, "indices": indices, "h_point": self.h_point, **kwargs}
        return generate(unet, scheduler, self.generators(indices), self.steps, eta, **how)
