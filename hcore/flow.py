"""Flow-matching sampling (SD3, FLUX: Esser et al. 2024, rectified flow) with h-space capture and
injection, beside the DDIM sampler of hcore.sampler.

The model predicts the velocity v(x_t, t) of the straight path x_t = (1 - sigma) x_0 + sigma eps;
the sampler is diffusers' FlowMatchEulerDiscreteScheduler step, deterministic Euler,

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i),

on the sigmas the family's pipeline sets (TransformerDenoiser.flow_sigmas). There is no eta: the
paper's eq. (5) stochastic term has no counterpart here, so any eta other than 0 is refused (as
are explicit noise maps, Asyrp's second pass and a stochastic scheduler config). h is edited and
captured by the same hook as in DDIM sampling (h_t + gamma v_t, sec. 3). Numerics follow the
pipelines: x_t is kept in the model's dtype, guidance combined in it, each step in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from hspace.hcore.conditioning import Conditioning
from hspace.hcore.hooks import HSpaceHook
from hspace.hcore.noise import check_arguments, draw_noise, eta_schedule


def is_flow(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (its model predicts a velocity)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def check_flow(scheduler, eta, steps: int) -> None:
    """ValueError for settings a flow-matching sampler has no meaning for."""
    if any(e != 0 for e in eta_schedule(eta, steps)):
        raise ValueError(
            "flow-matching models (SD3, FLUX) have no eta: their sampler is deterministic Euler; set eta to 0"
        )
    if scheduler.config.get("stochastic_sampling"):
        raise ValueError("the scheduler's stochastic_sampling is on: hspace samples flow models deterministically")


def velocity(unet, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
    """v at (x, t), guided as the pipelines guide it (in the model's dtype)."""
    dtype = unet.dtype
    batch = x.shape[0]
    x_in = torch.cat([x, x]) if conditioning.guided else x
    out = unet(x_in.to(dtype), t, **conditioning.unet_kwargs(batch, x.device, dtype)).sample
    if not conditioning.guided:
        return out
    out_u, out_c = out.chunk(2)
    return out_u + conditioning.guidance_scale * (out_c - out_u)


def flow_sample(
    unet,
    scheduler,
    generators: Sequence[torch.Generator],
    num_inference_steps: int,
    eta=0.0,
    edit=None,
    on_step=None,
    h_point: str = "output",
    x_T: torch.Tensor | None = None,
    stop_before: int | None = None,
    conditioning: Conditioning | None = None,
    capture: str = "cond",
    noise: torch.Tensor | None = None,
    start_at: int = 0,
) -> torch.Tensor:
    """``hcore.sampler.sample`` for a flow-matching transformer (arguments as there; the step
    index is the timestep index and on_step gets the timestep sigma * 1000 as an int)."""
    check_flow(scheduler, eta, num_inference_steps)
    if conditioning is None:
        raise ValueError("a flow-matching transformer is text-conditioned: give its conditioning")
    if noise is not None:
        raise ValueError("explicit noise maps belong to DDPM inversion (eq. (5)); a flow model has no noise term")
    guided, start_at = check_arguments(unet, conditioning, capture, edit, num_inference_steps, start_at)
    if edit is not None and edit.asyrp:
        raise ValueError("Asyrp's asymmetric step splits eq. (2)'s P_t and D_t: a flow model's Euler step has none")
    sched = unet.flow_sigmas(scheduler, num_inference_steps)
    device = next(unet.parameters()).device
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = draw_noise(generators, shape)
    x = (x if x_T is None else x_T.cpu().float()).to(device)
    if edit is not None:
        x = edit.start(x)
    x = x.to(unet.dtype)
    sigmas = sched.sigmas.to(device)
    session = edit.session(unet) if edit is not None else contextlib.nullcontext()
    with torch.no_grad(), HSpaceHook(unet, point=h_point) as hs, session:
        hs.guided = guided
        hs.edit_branch = "both" if edit is None else edit.branch
        for step, t in enumerate(sched.timesteps):
            if step == stop_before:
                return x.float()
            if step < start_at:
                continue
            if edit is not None:
                x = edit.x_t(step, x.float()).to(unet.dtype)
            hs.step_delta(edit, step, device)
            v = velocity(unet, x, t.to(device), conditioning)
            if on_step is not None:
                on_step(step, int(t), hs.captured(capture))
            x = (x.float() + (sigmas[step + 1] - sigmas[step]) * v).to(v.dtype)  # the scheduler's Euler step
    return x.float()
