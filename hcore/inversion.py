"""Inversion of real images: DDIM inversion and edit-friendly DDPM inversion.

DDIM inversion (eta = 0) of real images, recording h along the way (paper sec. 5:
supervision from real images: their h_{T:1}, found by inverting them, are averaged by
eq. (10) exactly like those of generated samples).

Generation (eqs. (2)-(4), eta = 0) maps x_{t_k} to x_{t_{k+1}} (timesteps t_1 > ... > t_S,
alpha = diffusers' alphas_cumprod):

    x_{t_{k+1}} = sqrt(alpha_{k+1}) (x_{t_k} - sqrt(1 - alpha_k) eps_k) / sqrt(alpha_k) + sqrt(1 - alpha_{k+1}) eps_k,

with eps_k = eps_theta(x_{t_k}, t_k). Solving for x_{t_k} gives the inversion step

    x_{t_k} = sqrt(alpha_k) (x_{t_{k+1}} - sqrt(1 - alpha_{k+1}) eps_k) / sqrt(alpha_{k+1}) + sqrt(1 - alpha_k) eps_k,

which needs eps_k at the unknown x_{t_k}. Where the scheduler clips P_t (``clip_sample``),
generation clips (x_{t_k} - sqrt(1 - alpha_k) eps_k) / sqrt(alpha_k) to the clip range
before use, so the inversion clips the same P_t: the inverted x_{t_k} is then a point whose
P_t generation uses unchanged (``ddim_inversion_step``). Plain DDIM inversion (``refine=0``, what the
paper uses) takes eps at the current point, eps_theta(x_{t_{k+1}}, t_{k+1}); ``refine=R``
then applies R fixed-point updates eps_k <- eps_theta(x_{t_k}, t_k), which make the inverted
x_T regenerate the image much more closely for few-step schedules (measured on the toy
model, 20 steps: reconstruction MSE 0.045 plain, 0.0003 with R = 3) at R extra passes.

The h recorded for step k is that of eps_theta(x_{t_k}, t_k) at the final inverted x_{t_k}
(the first U-Net pass of the next move, plus one last pass at x_T), i.e. exactly the h that
generating from the inverted x_T evaluates first; stored in generation order (step 0 = T).

Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024, eqs.
(6)-(7); the paper authors' own code inverts this way): draw every x_{t_k} by independent
noising of the image, x_{t_k} = sqrt(alpha_k) x_0 + sqrt(1 - alpha_k) n_k (n_k standard
normal, from the sample's generator), then extract the noise map of each step from the
sampler's own update, z_k = (x_{t_(k+1)} - mu_k(x_{t_k})) / sigma_k (eqs. (2)-(5) with the
run's eta_t; mu_k is the step without its noise term). The eta > 0 sampler fed x_T and
z_{T:1} then lands on x_0 exactly (up to float rounding), whatever the step count, and an
h-space edit replayed with the same z_{T:1} keeps what the direction does not touch.
Where sigma_k = 0 (eta_k = 0, or the last step of a scheduler whose final alpha is 1)
z_k holds the residual x_{t_(k+1)} - mu_k itself (``hcore.sampler.sample`` adds it as is).
Text-conditioned latent models invert their VAE latents with the conditioning given (the
guided eps when guidance > 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hspace.hcore.conditioning import Conditioning, unet_output
from hspace.hcore.hooks import HSpaceHook
from hspace.hcore.sampler import (
    as_eps,
    ddim_scheduler,
    ddim_step,
    draw_noise,
    eta_schedule,
    make_generators,
    noise_scale,
    sample,
)

INVERSION_METHODS = ("ddpm", "ddim")


def ddim_inversion_step(
    scheduler, x_next: torch.Tensor, alpha_next: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x_{t_k} from x_{t_{k+1}} (less noisy, alpha_next) and eps_k: the inverse of one
    deterministic generation step (eqs. (2)-(4), eta = 0) for that eps. P_t is clipped
    exactly as ``hcore.sampler.ddim_step`` clips it, so generating from the result with
    the same eps uses this P_t as is."""
    cfg = scheduler.config
    p_t = (x_next - (1 - alpha_next).sqrt() * eps) / alpha_next.sqrt()  # eq. (3), solved at the other end
    if cfg.clip_sample:
        p_t = p_t.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return alpha.sqrt() * p_t + (1 - alpha).sqrt() * eps


@torch.no_grad()
def ddim_invert(
    unet: torch.nn.Module,
    scheduler,
    x0: torch.Tensor,
    num_inference_steps: int,
    h_point: str = "output",
    refine: int = 3,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    conditioning: Conditioning | None = None,
) -> torch.Tensor:
    """x_T (float32) of images ``x0`` (B, C, R, R) in [-1, 1] (latents, for a latent model).
    on_step(step, t, h) gets the h of every generation step once, last step (S-1) first
    (the conditional half under guidance). A v-prediction model's output is turned into the
    eps it stands for (``as_eps``)."""
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(num_inference_steps)
    param = next(unet.parameters())
    x = x0.to(param.device, torch.float32)
    timesteps = [int(t) for t in sched.timesteps]
    alpha_cur, t_cur = sched.final_alpha_cumprod.to(x.device), timesteps[-1]
    if conditioning is not None:
        conditioning.check(unet)

    def eps_at(x_t: torch.Tensor, t: int) -> torch.Tensor:
        return as_eps(sched, unet_output(unet, x_t, t, conditioning), x_t, t)

    with HSpaceHook(unet, point=h_point) as hs:
        hs.guided = conditioning is not None and conditioning.guided
        cond_h = hs.captured
        for step in reversed(range(len(timesteps))):
            t = timesteps[step]
            alpha = sched.alphas_cumprod[t].to(x.device)
            eps = eps_at(x, t_cur)  # at the current level: the h of step+1 (none for x_0)
            if on_step is not None and step + 1 < len(timesteps):
                on_step(step + 1, t_cur, cond_h())

            x_next = ddim_inversion_step(sched, x, alpha_cur, alpha, eps)
            for _ in range(refine):
                x_next = ddim_inversion_step(sched, x, alpha_cur, alpha, eps_at(x_next, t))
            x, alpha_cur, t_cur = x_next, alpha, t
        eps_at(x, t_cur)
        if on_step is not None:
            on_step(0, t_cur, cond_h())
    return x


@torch.no_grad()
def ddpm_invert(
    unet: torch.nn.Module,
    scheduler,
    x0: torch.Tensor,
    num_inference_steps: int,
    generators,
    eta=1.0,
    h_point: str = "output",
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    conditioning: Conditioning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit-friendly DDPM inversion (module docstring): (x_T, z) with z (B, S, C, R, R) the
    noise maps of steps 0..S-1, both float32, such that ``sample(..., eta, x_T=x_T,
    noise=z)`` regenerates ``x0``. ``generators``: one per image (its independent noising
    draws); eta: the run's eta_t (one value, one per step or a window rule). on_step(step,
    t, h) gets the h each step's U-Net pass evaluates (at the very x_{t_k} the replay
    reaches), in generation order."""
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(num_inference_steps)
    etas = eta_schedule(eta, num_inference_steps)
    param = next(unet.parameters())
    x0 = x0.to(param.device, torch.float32)
    if len(generators) != len(x0):
        raise ValueError(f"{len(generators)} generators for {len(x0)} images")
    if conditioning is not None:
        conditioning.check(unet)
    shape = tuple(x0.shape[1:])
    timesteps = [int(t) for t in sched.timesteps]
    noised = []  # x_{t_k} = sqrt(alpha_k) x_0 + sqrt(1 - alpha_k) n_k, n_k independent
    for t in timesteps:
        alpha = sched.alphas_cumprod[t].to(x0.device)
        noised.append(alpha.sqrt() * x0 + (1 - alpha).sqrt() * draw_noise(generators, shape).to(x0.device))
    z = torch.empty((len(x0), len(timesteps), *shape), dtype=torch.float32, device=x0.device)
    x = noised[0]
    with HSpaceHook(unet, point=h_point) as hs:
        hs.guided = conditioning is not None and conditioning.guided
        for step, t in enumerate(timesteps):
            out = unet_output(unet, x, t, conditioning)
            if on_step is not None:
                on_step(step, t, hs.captured())
            mean, _ = ddim_step(sched, x, t, out, out, etas[step], torch.zeros_like(x))  # eqs. (2)-(4)
            target = noised[step + 1] if step + 1 < len(timesteps) else x0
            scale = noise_scale(sched, t, etas[step])
            z[:, step] = (target - mean) / scale
            x = mean + scale * z[:, step]  # the point the replay computes, rounding included
    return noised[0], z


@torch.no_grad()
def reconstruct(
    unet: torch.nn.Module,
    scheduler,
    x_T: torch.Tensor,
    num_inference_steps: int,
    h_point: str = "output",
    eta=0.0,
    noise: torch.Tensor | None = None,
    conditioning: Conditioning | None = None,
):
    """x_0 regenerated from ``x_T``: deterministic DDIM (eta = 0), or with the noise maps
    of a DDPM inversion and its eta."""
    gens = make_generators(0, range(len(x_T)))  # never drawn from where x_T and the maps are given
    return sample(
        unet,
        scheduler,
        gens,
        num_inference_steps,
        eta,
        x_T=x_T,
        h_point=h_point,
        noise=noise,
        conditioning=conditioning,
    )


def noise_to_step(scheduler, x0: torch.Tensor, num_inference_steps: int, step: int, generators) -> torch.Tensor:
    """SDEdit's start (Meng et al. 2022): the image noised to the timestep of step ``step``
    of the schedule, x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) n, one draw per generator."""
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(num_inference_steps)
    alpha = sched.alphas_cumprod[int(sched.timesteps[step])]
    n = draw_noise(generators, tuple(x0.shape[1:]))
    return alpha.sqrt() * x0.cpu().float() + (1 - alpha).sqrt() * n
