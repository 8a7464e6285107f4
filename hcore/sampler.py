"""Batched DDIM sampling with h-space capture and injection (paper sec. 3, eqs. (2)-(5)).

Reproducibility: sample i of a run owns one ``torch.Generator`` seeded from
(run seed, i). It alone draws x_T and then one z_t per step (drawn at every step, even
when sigma_t = 0, so changing eta never shifts the stream). Batch size, batch
composition and worker never change what sample i sees; an edit of sample i replays its
x_T and z_{T:1} exactly.

Editing: h_t^edit = h_t + sum_k gamma_k v_t^(k) (sec. 3). By default the edited eps feeds
both P_t and D_t of eq. (2) (one U-Net pass per step, as in the paper); with
``asyrp=True`` the edited eps feeds only P_t and a second, unedited pass gives D_t
(Kwon et al.'s asymmetric reverse process). Any editing method (hcore.edits) hands the sampler
an ``Action``: it may change x_T before the first step, x_t before each step's U-Net pass, add
to h_t at the hook point, and hold a context (attention processors, weights) around the whole
generation; ``Edit`` is the h-direction's.

Text-conditioned latent models (Stable Diffusion 1.x / 2.x, SDXL): ``conditioning`` (see
hcore.conditioning) gives the U-Net its text; with classifier-free guidance each step is
one pass over [uncond; cond] and the guided prediction feeds eqs. (2)-(4). ``Edit.branch``
says which half the edit goes to; ``capture`` which half ``on_step`` receives (the
conditional one by default). Models predicting v (SD 2.x) use eq. (3) rewritten for v
(see ``ddim_step``). The sampler returns the final latents for latent models (decode them
with the VAE).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from diffusers import DDIMScheduler

from hspace.hcore.conditioning import Conditioning, unet_output
from hspace.hcore.edits import Action
from hspace.hcore.flow import flow_sample, is_flow
from hspace.hcore.hooks import EDIT_BRANCHES, HSpaceHook
from hspace.hcore.noise import check_arguments, draw_noise, eta_schedule

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, timestep, h (B,C,H,W))
PREDICTION_TYPES = ("epsilon", "v_prediction")


def sample_seed(run_seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` of a run, from numpy's SeedSequence (no cycles,
    no collisions between neighbouring run seeds)."""
    state = np.random.SeedSequence([int(run_seed), int(index)]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def make_generators(run_seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(sample_seed(run_seed, i)) for i in indices]


def ddim_scheduler(
    scheduler, clip_sample: bool | None = None, prediction_types: Sequence[str] = PREDICTION_TYPES
) -> DDIMScheduler:
    """A DDIMScheduler with the model's own noise schedule (e.g. from a DDPMScheduler, or
    the PNDM / DDIM / Euler scheduler a Stable Diffusion folder ships).

    clip_sample: clamp P_t to [-1, 1] (None: as the model's scheduler config says). Eq. (3)
    has no clipping and the paper authors' code turns it off; runs record their choice.
    prediction_types: the model outputs the caller can handle; ``ddim_step`` and ``sample``
    handle "epsilon" and "v_prediction". Code that reads the U-Net's output as eps directly
    should pass ("epsilon",)."""
    if is_flow(scheduler):
        raise ValueError(
            f"{type(scheduler).__name__}: a flow-matching model (SD3, FLUX) has no DDPM noise schedule, so no DDIM "
            "step, inversion or eps here"
        )
    overrides = {} if clip_sample is None else {"clip_sample": bool(clip_sample)}
    sched = DDIMScheduler.from_config(scheduler.config, **overrides)
    if sched.config.prediction_type not in prediction_types:
        raise ValueError(
            f"scheduler prediction_type={sched.config.prediction_type!r}: hspace samples "
            f"{' and '.join(repr(p) for p in prediction_types)} models only (eq. (3) needs eps, or v to derive it from)"
        )
    if sched.config.thresholding:
        raise ValueError("scheduler uses dynamic thresholding, which hspace does not support")
    return sched


def step_timestep(unet: torch.nn.Module, scheduler, steps: int, step: int):
    """The timestep the sampler gives the denoiser at ``step`` of ``steps``: DDIM's (an int), or a
    flow model's sigma * 1000 (a float, exact)."""
    if is_flow(scheduler):
        return float(unet.flow_sigmas(scheduler, steps).timesteps[step])
    return sampling_timesteps(unet, scheduler, steps)[step]


def sampling_timesteps(unet: torch.nn.Module, scheduler, steps: int) -> list[int]:
    """The timesteps ``sample`` runs at ``steps`` steps: DDIM's, or a flow model's sigma * 1000
    rounded (a label of the step; the sampler uses the exact value)."""
    if is_flow(scheduler):
        return [round(float(t)) for t in unet.flow_sigmas(scheduler, steps).timesteps]
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


def step_alphas(scheduler: DDIMScheduler, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, alpha_(t-1)) of the step at timestep t (the paper's alpha = diffusers'
    alphas_cumprod; the last step's alpha_(t-1) is the scheduler's final_alpha_cumprod)."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[t], alpha_prev


def step_sigma(scheduler: DDIMScheduler, t: int, eta: float) -> torch.Tensor:
    """sigma_t of eq. (5) for the step at timestep t."""
    alpha_t, alpha_prev = step_alphas(scheduler, t)
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


def noise_scale(scheduler: DDIMScheduler, t: int, eta: float) -> float:
    """What an explicit noise map z_t is multiplied by in the step at t: sigma_t, or 1
    where sigma_t = 0 (there z_t is the residual x_(t-1) - mean itself; see ``sample``)."""
    sigma = float(step_sigma(scheduler, t, eta))
    return sigma if sigma > 0 else 1.0


def as_eps(scheduler: DDIMScheduler, out: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The eps a U-Net output stands for: itself, or eps = sqrt(a_t) v + sqrt(1 - a_t) x_t
    for a v-prediction model."""
    if scheduler.config.prediction_type == "epsilon":
        return out
    alpha_t = scheduler.alphas_cumprod[t]
    return alpha_t.sqrt() * out + (1 - alpha_t).sqrt() * x_t


def ddim_step(
    scheduler: DDIMScheduler,
    x_t: torch.Tensor,
    t: int,
    eps_p: torch.Tensor,
    eps_d: torch.Tensor,
    eta: float,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} = sqrt(a_{t-1}) P_t(eps_p) + D_t(eps_d) + sigma_t z_t: eqs. (2)-(5).

    With eps_p = eps_d this is exactly ``DDIMScheduler.step`` given ``variance_noise=z``;
    the split is what Asyrp needs. Returns (x_{t-1}, P_t). ``scheduler`` must have had
    ``set_timesteps`` called; alphas here are the paper's alpha (diffusers' alphas_cumprod).

    eps_p, eps_d are the model's outputs in its ``prediction_type``: eps, or v for a
    v-prediction model (v = sqrt(a_t) eps - sqrt(1 - a_t) x_0). For v, eq. (3) rewritten
    reads P_t = sqrt(a_t) x_t - sqrt(1 - a_t) v, and D_t (eq. (4)) takes the eps derived
    from v, eps = sqrt(a_t) v + sqrt(1 - a_t) x_t.
    """
    cfg = scheduler.config
    alpha_t, alpha_prev = step_alphas(scheduler, t)
    if cfg.prediction_type == "v_prediction":
        p_t = alpha_t.sqrt() * x_t - (1 - alpha_t).sqrt() * eps_p  # eq. (3), rewritten for v
        eps_d = alpha_t.sqrt() * eps_d + (1 - alpha_t).sqrt() * x_t  # eps from v, for eq. (4)
    elif cfg.prediction_type == "epsilon":
        p_t = (x_t - (1 - alpha_t).sqrt() * eps_p) / alpha_t.sqrt()  # eq. (3)
    else:
        raise ValueError(f"prediction_type {cfg.prediction_type!r}: ddim_step handles {PREDICTION_TYPES}")
    if cfg.clip_sample:
        p_t = p_t.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    sigma_t = step_sigma(scheduler, t, eta)  # eq. (5)
    if 1 - alpha_prev - sigma_t**2 < 0:
        raise ValueError(f"eta={eta} makes sigma_t exceed sqrt(1 - alpha_(t-1)) at t={t}; use eta in [0, 1]")
    d_t = (1 - alpha_prev - sigma_t**2).sqrt() * eps_d  # eq. (4)
    x_prev = alpha_prev.sqrt() * p_t + d_t  # eq. (2)
    if eta > 0:
        x_prev = x_prev + sigma_t * z
    return x_prev, p_t


@dataclass
class Edit(Action):
    """An h-space edit (the action of hcore.edits.directions): h_t + sum_k gamma_k v_t^(k) at
    steps in ``window``.

    directions: tensors (T, C, H, W), one per direction, T = number of sampling steps.
    gammas: one per direction, each a float or a (B,) tensor (a strength per sample, so
    one batch can render a whole grid of strengths).
    window: (first, stop) step indices, half-open, step 0 = first denoising step;
    None = all steps. asyrp: edited eps in P_t only.
    branch: under classifier-free guidance, which U-Net pass gets the edit: "both" (the
    paper authors' SD code), "cond" (only the text-conditioned pass: the guidance scale
    then multiplies the edit's effect, as in InterpretDiffusion) or "uncond". Without
    guidance the one pass is edited ("uncond" is refused).
    """

    directions: list[torch.Tensor] = field(default_factory=list)
    gammas: list[float | torch.Tensor] = field(default_factory=list)
    window: tuple[int, int] | None = None
    asyrp: bool = False
    branch: str = "both"

    def check(self, steps: int, guided: bool) -> None:
        for v in self.directions:
            if v.shape[0] != steps:
                raise ValueError(f"direction has {v.shape[0]} timesteps, sampling uses {steps}")
        if self.branch not in EDIT_BRANCHES:
            raise ValueError(f"edit branch must be one of {EDIT_BRANCHES}, got {self.branch!r}")
        if self.branch == "uncond" and not guided:
            raise ValueError(
                "edit branch 'uncond' needs classifier-free guidance (a conditioning with an uncond branch)"
            )

    def delta(self, step: int) -> torch.Tensor | None:
        if not self.directions:
            return None
        if self.window is not None and not (self.window[0] <= step < self.window[1]):
            return None
        return sum(
            torch.as_tensor(g, dtype=v.dtype).reshape(-1, 1, 1, 1) * v[step]
            for v, g in zip(self.directions, self.gammas, strict=True)
        )

    def with_branch(self, branch: str) -> Edit:
        return replace(self, branch=branch)


def sample(
    unet: torch.nn.Module,
    scheduler,
    generators: Sequence[torch.Generator],
    num_inference_steps: int,
    eta: float | str | Sequence[float] = 1.0,
    edit: Action | None = None,
    on_step: StepCallback | None = None,
    h_point: str = "output",
    x_T: torch.Tensor | None = None,
    stop_before: int | None = None,
    conditioning: Conditioning | None = None,
    capture: str = "cond",
    noise: torch.Tensor | None = None,
    start_at: int = 0,
) -> torch.Tensor:
    """Generate one image per generator; returns x_0 as (B, C, R, R) float32 in [-1, 1]
    (latents, for a latent model).

    on_step(step, t, h) receives, after each U-Net pass, the h_t that pass used (edited
    if an edit is active), so the caller can stream h_{T:1} out without holding it all.
    conditioning: the text (hcore.conditioning), None for unconditional pixel models
    (then nothing changes). Under classifier-free guidance on_step gets the conditional
    half of the [uncond; cond] batch (``capture="cond"``), the unconditional half
    ("uncond") or the whole 2B batch in that layout ("both"); the edit goes to
    ``edit.branch``.
    eta: one value, one per step, or a window rule (the paper's eta_t; see ``eta_schedule``).
    P_t is clipped only where ``scheduler.config.clip_sample`` says so (runs set it from
    their ``clip_sample`` setting when they load the model; see data.models.load_for_run).
    stop_before: return x_t just before step ``stop_before`` (its U-Net pass), i.e. the
    replayed point at t = timesteps[stop_before], instead of x_0.
    noise: explicit noise maps z_{T:1}, (B, S, *shape), instead of the generators' draws
    (an edit-friendly DDPM inversion's, hcore.inversion.ddpm_invert): x_(t-1) = mean +
    sigma_t z_t, and where sigma_t = 0 (eta_t = 0, or the last step of a scheduler whose
    final alpha is 1) x_(t-1) = mean + z_t, so the maps can carry that residual too.
    start_at: begin at step ``start_at`` with ``x_T`` as the point there (SDEdit: a photo
    noised to that step); the steps before it are skipped (their z_t still drawn).
    A flow-matching transformer (SD3, FLUX) is sampled by ``hcore.flow.flow_sample`` instead.
    """
    if is_flow(scheduler):
        return flow_sample(
            unet, scheduler, generators, num_inference_steps, eta, edit, on_step, h_point, x_T, stop_before,
            conditioning, capture, noise, start_at,
        )  # fmt: skip
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(num_inference_steps)
    etas = eta_schedule(eta, num_inference_steps)
    guided, start_at = check_arguments(unet, conditioning, capture, edit, num_inference_steps, start_at)
    param = next(unet.parameters())
    device = param.device
    cfg = unet.config
    shape = (cfg.in_channels, *((cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else cfg.sample_size))
    x = draw_noise(generators, shape)  # drawn even when x_T is given, so z_t stay in place
    x = (x if x_T is None else x_T.cpu().float()).to(device)
    if edit is not None:
        x = edit.start(x)  # a method acting on x_T (hcore.edits)
    batch = len(generators)
    if noise is not None and tuple(noise.shape) != (batch, num_inference_steps, *shape):
        raise ValueError(f"noise maps have shape {tuple(noise.shape)}, need {(batch, num_inference_steps, *shape)}")
    session = edit.session(unet) if edit is not None else contextlib.nullcontext()
    with torch.no_grad(), HSpaceHook(unet, point=h_point) as hs, session:
        hs.guided = guided
        hs.edit_branch = "both" if edit is None else edit.branch
        for step, t in enumerate(sched.timesteps):
            if step == stop_before:
                return x
            t_int = int(t)
            z = draw_noise(generators, shape).to(device)
            if step < start_at:
                continue
            if noise is not None:
                z = noise[:, step].to(device, torch.float32)
            if edit is not None:
                x = edit.x_t(step, x)  # a method acting on the latent x_t (hcore.edits)
            delta = hs.step_delta(edit, step, device)  # a tensor, or h -> delta
            eps = unet_output(unet, x, t_int, conditioning)  # eps, or v (see ddim_step)
            if on_step is not None:
                on_step(step, t_int, hs.captured(capture))
            eps_d = eps
            if delta is not None and edit.asyrp:
                hs.delta = None
                eps_d = unet_output(unet, x, t_int, conditioning)
            x, _ = ddim_step(sched, x, t_int, eps, eps_d, etas[step], z)
            if noise is not None and float(step_sigma(sched, t_int, etas[step])) == 0:
                x = x + z  # a step with sigma_t = 0: the map is the residual itself
    return x


def to_uint8(x0: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, R, R) to uint8 (B, C, R, R)."""
    return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images) -> torch.Tensor:
    """uint8 images (B, C, R, R), numpy or torch, to float32 in [-1, 1] (inverse of to_uint8)."""
    return torch.as_tensor(np.asarray(images)).float() / 127.5 - 1.0
