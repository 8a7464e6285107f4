"""DDIM inversion (hcore.inversion) against references: the algebra is exact when eps does
not depend on x; the recorded h at step 0 is exactly the h that generating from the
inverted x_T evaluates first; every step's h is recorded once."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from hspace.hcore.hooks import HSpaceHook
from hspace.hcore.inversion import ddim_invert, reconstruct
from hspace.hcore.sampler import ddim_scheduler, make_generators, sample
from tests.conftest import tiny_scheduler, tiny_unet


def test_inversion_is_exact_when_eps_is_constant():
    unet = tiny_unet()
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
        unet.conv_out.bias.fill_(0.3)  # eps = 0.3 everywhere, whatever x and t
    scheduler = tiny_scheduler()
    x0 = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    for refine in (0, 2):
        x_T = ddim_invert(unet, scheduler, x0, 7, refine=refine)
        assert (x_T - x0).abs().max() > 0.1  # it did move
        torch.testing.assert_close(reconstruct(unet, scheduler, x_T, 7), x0, atol=1e-5, rtol=0)


def test_inversion_clips_p_t_as_generation_does():
    """With clip_sample, generation clips P_t (eq. (3)) to the clip range; the inversion
    clips the same P_t, so the inverted x_T is a point whose P_t generation uses unclipped
    (the old inversion left it outside, so its refinement inverted another map)."""
    unet = tiny_unet()
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
        unet.conv_out.bias.fill_(0.3)  # eps = 0.3 everywhere
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", clip_sample=True, clip_sample_range=0.5)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1  # half of it beyond the range generation can produce
    for refine in (0, 2):
        x_T = ddim_invert(unet, scheduler, x0, 7, refine=refine)
        sched = ddim_scheduler(scheduler)
        sched.set_timesteps(7)
        alpha_T = sched.alphas_cumprod[int(sched.timesteps[0])]
        p_T = (x_T - (1 - alpha_T).sqrt() * 0.3) / alpha_T.sqrt()  # the P_t generation computes at x_T
        torch.testing.assert_close(p_T, x0.clamp(-0.5, 0.5), atol=1e-4, rtol=0)
        torch.testing.assert_close(reconstruct(unet, scheduler, x_T, 7), x0.clamp(-0.5, 0.5), atol=1e-5, rtol=0)


def test_recorded_h_matches_generation_from_the_inverted_x_T():
    unet, scheduler = tiny_unet(seed=3), tiny_scheduler()
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    recorded = {}
    x_T = ddim_invert(unet, scheduler, x0, 6, refine=2, on_step=lambda s, t, h: recorded.setdefault(s, (t, h.clone())))
    assert sorted(recorded) == list(range(6))
    generated = {}
    sample(
        unet,
        scheduler,
        make_generators(0, range(3)),
        6,
        0.0,
        x_T=x_T,
        on_step=lambda s, t, h: generated.setdefault(s, (t, h.clone())),
    )
    assert [recorded[s][0] for s in range(6)] == [generated[s][0] for s in range(6)]  # same timestep grid
    torch.testing.assert_close(recorded[0][1], generated[0][1], atol=1e-5, rtol=0)  # exactly h(x_T, T)
    # a different image gives a different h
    with HSpaceHook(unet) as hs, torch.no_grad():
        unet(torch.zeros_like(x_T), recorded[0][0])
        assert (hs.last_h - recorded[0][1]).abs().max() > 1e-3
