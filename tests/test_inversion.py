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


# ------------------------------------------------------------------ edit-friendly DDPM inversion


def _ddpm_roundtrip(scheduler, eta, steps=6, seed=5):
    from hspace.hcore.inversion import ddpm_invert

    unet = tiny_unet(seed=seed)
    x0 = torch.rand(3, 3, 16, 16) * 1.8 - 0.9
    recorded = {}
    x_T, z = ddpm_invert(
        unet, scheduler, x0, steps, make_generators(1, range(3)), eta, on_step=lambda s, t, h: recorded.setdefault(s, h)
    )
    return unet, x0, x_T, z, recorded


def test_ddpm_inversion_noise_maps_make_the_sampler_land_on_the_image():
    """Huberman-Spiegelglas et al. eqs. (6)-(7): with x_T and the extracted z_{T:1}, the
    eta = 1 sampler regenerates x_0 (float32 rounding only) on a random U-Net, whatever its
    eps; the same holds with clipping, an eta window (steps with sigma_t = 0 carry residuals)
    and a v-prediction schedule; the h recorded is the h the replay evaluates."""
    cases = [
        (tiny_scheduler(), 1.0),
        (DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", clip_sample=True, clip_sample_range=0.7), 1.0),
        (tiny_scheduler(), "1@0:3"),
        (DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", prediction_type="v_prediction"), 1.0),
    ]
    for scheduler, eta in cases:
        unet, x0, x_T, z, recorded = _ddpm_roundtrip(scheduler, eta)
        assert z.shape == (3, 6, 3, 16, 16)
        replayed = {}
        x = sample(
            unet, scheduler, make_generators(9, range(3)), 6, eta, x_T=x_T, noise=z,
            on_step=lambda s, t, h, out=replayed: out.setdefault(s, h),
        )  # fmt: skip
        clip = scheduler.config.clip_sample
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=0, msg=f"clip={clip} eta={eta}")
        for s in range(6):
            torch.testing.assert_close(replayed[s], recorded[s], atol=1e-5, rtol=0)
        # the noisy points are independent noisings of x_0: x_T = sqrt(a_T) x_0 + sqrt(1 - a_T) n
        sched = ddim_scheduler(scheduler)
        sched.set_timesteps(6)
        a_T = sched.alphas_cumprod[int(sched.timesteps[0])]
        n = (x_T - a_T.sqrt() * x0) / (1 - a_T).sqrt()
        assert abs(float(n.std()) - 1) < 0.1 and abs(float(n.mean())) < 0.1


def test_explicit_noise_maps_equal_the_generators_draws():
    """sample(noise=z) with z = sigma-free draws of the sample's own generators is the
    plain eta = 1 sample: the maps replace the draws and nothing else."""
    from hspace.hcore.sampler import draw_noise

    unet, scheduler = tiny_unet(seed=2), tiny_scheduler()
    plain = sample(unet, scheduler, make_generators(4, range(2)), 5, 1.0)
    gens = make_generators(4, range(2))
    x_T = draw_noise(gens, (3, 16, 16))
    z = torch.stack([draw_noise(gens, (3, 16, 16)) for _ in range(5)], dim=1)
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(5)
    last = float(sched.alphas_cumprod[int(sched.timesteps[-1])])
    assert sched.final_alpha_cumprod == 1.0 and last < 1  # the last step has sigma = 0: its map is a residual
    z[:, -1] = 0  # the plain sampler adds nothing there
    replay = sample(unet, scheduler, make_generators(7, range(2)), 5, 1.0, x_T=x_T, noise=z)
    torch.testing.assert_close(replay, plain, atol=1e-6, rtol=0)


def test_start_at_continues_a_stopped_sample():
    """start_at=k from the point the sampler reaches before step k gives the same x_0 as the
    uninterrupted run (same generators): SDEdit's entry point is the sampler's own step k."""
    unet, scheduler = tiny_unet(seed=6), tiny_scheduler()
    full = sample(unet, scheduler, make_generators(3, range(2)), 6, 1.0)
    x_k = sample(unet, scheduler, make_generators(3, range(2)), 6, 1.0, stop_before=3)
    rest = sample(unet, scheduler, make_generators(3, range(2)), 6, 1.0, x_T=x_k, start_at=3)
    torch.testing.assert_close(rest, full, atol=1e-6, rtol=0)


def test_ddim_inversion_of_a_v_prediction_model_converges():
    """A v-prediction model's output is inverted as the eps it stands for: on a U-Net whose
    output depends weakly on x, refined DDIM inversion regenerates the image."""
    unet = tiny_unet(seed=8)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.fill_(0.2)
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", prediction_type="v_prediction")
    x0 = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    plain = reconstruct(unet, scheduler, ddim_invert(unet, scheduler, x0, 5, refine=0), 5)
    refined = reconstruct(unet, scheduler, ddim_invert(unet, scheduler, x0, 5, refine=8), 5)
    err = lambda x: float((x - x0).abs().max())  # noqa: E731
    assert err(refined) < 1e-3 < err(plain), (err(plain), err(refined))
