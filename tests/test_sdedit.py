"""SDEdit as an editing method (hcore/edits/sdedit.py): against the explicit restart (the
source noised to step k with the sample's own first draw, the steps before k skipped), with a
strength per sample in one batch, and inside diffusers' own DDIMPipeline through hspace.apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

import hspace
from hspace.hcore.edits import get
from hspace.hcore.inversion import noise_to_step
from hspace.hcore.sampler import make_generators, sample
from tests.test_jacobian import attention_unet

STEPS = 8


@pytest.fixture(scope="module")
def model():
    unet = attention_unet()  # attention at a level and in the mid block, as real U-Nets
    source = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return unet, DDIMScheduler(num_train_timesteps=1000), source


def test_sdedit_is_the_explicit_restart(model):
    unet, sched, source = model
    sdedit = get("sdedit")(source, sched)
    assert sdedit.needs == ("source",) and sdedit.acts_on == "x_t" and "Meng" in sdedit.reference
    for k in (0, 4, 7):  # from pure noise, halfway, the last step only
        start = noise_to_step(sched, source, STEPS, k, make_generators(3, [0, 1]))
        ref = sample(unet, sched, make_generators(3, [0, 1]), STEPS, 1.0, x_T=start, start_at=k)
        got = sample(unet, sched, make_generators(3, [0, 1]), STEPS, 1.0, edit=sdedit.action((STEPS - k) / STEPS))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # one batch, a strength per sample: each as its own restart
    both = sample(unet, sched, make_generators(3, [0, 1]), STEPS, 1.0, edit=sdedit.action(torch.tensor([0.5, 0.25])))
    for b, k in ((0, 4), (1, 6)):
        start = noise_to_step(sched, source[b : b + 1], STEPS, k, make_generators(3, [b]))
        alone = sample(unet, sched, make_generators(3, [b]), STEPS, 1.0, x_T=start, start_at=k)
        torch.testing.assert_close(both[b : b + 1], alone, rtol=0, atol=1e-5)
    assert (both[0] - both[1]).abs().max() > 0.1
    for bad in (0.0, 1.5, 0.05):  # 0.05 * 8 steps rounds to none
        with pytest.raises(ValueError, match="sdedit's strength t0"):
            sample(unet, sched, make_generators(3, [0, 1]), STEPS, 1.0, edit=sdedit.action(bad))


def test_sdedit_in_a_plain_diffusers_pipeline(model):
    """hspace.apply with the method made: diffusers' DDIMPipeline runs every step (it cannot
    skip), the restart puts each sample back at its start: the same images as the sampler."""
    unet, sched, source = model
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
    sdedit = get("sdedit")(source, pipe.scheduler)
    with hspace.apply(pipe, method=sdedit, gamma=0.5):
        out = pipe(
            batch_size=2, generator=make_generators(3, [0, 1]), num_inference_steps=STEPS, eta=1.0, output_type="np"
        )
    ref = sample(unet, sched, make_generators(3, [0, 1]), STEPS, 1.0, edit=sdedit.action(0.5))
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out.images, ref, rtol=0, atol=2e-5)
    with pytest.raises(hspace.DirectionMismatch, match="make it with what it needs"):
        with hspace.apply(pipe, method="sdedit", gamma=0.5):
            pass
