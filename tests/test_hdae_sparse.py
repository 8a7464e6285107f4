"""HDAE's sparse directions (hcore/edits/sparse.py): per step exactly k entries, the largest
in magnitude (a numpy argsort as the reference), their values kept; the edit is the h method
with that sparse vector; k at least the size of h is the h method itself, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from hspace.hcore.edits import get
from hspace.hcore.edits.sparse import sparsify
from hspace.hcore.hooks import h_shape
from hspace.hcore.sampler import make_generators, sample
from tests.test_jacobian import attention_unet

STEPS = 6


@pytest.fixture(scope="module")
def model():
    unet = attention_unet()  # attention at a level and in the mid block, as real U-Nets
    v = torch.randn(STEPS, *h_shape(unet), generator=torch.Generator().manual_seed(1))
    return unet, DDIMScheduler(num_train_timesteps=1000), v


def test_sparsify_keeps_the_k_largest_entries_of_every_step(model):
    _, _, v = model
    k = 7
    got = sparsify(v, k).reshape(STEPS, -1).numpy()
    flat = v.reshape(STEPS, -1).numpy()
    for t in range(STEPS):
        top = np.argsort(-np.abs(flat[t]), kind="stable")[:k]
        want = np.zeros_like(flat[t])
        want[top] = flat[t, top]
        np.testing.assert_array_equal(got[t], want)
    assert sparsify(v, 10**6) is v
    with pytest.raises(ValueError, match="k >= 1"):
        sparsify(v, 0)


def test_the_sparse_method_is_the_h_method_with_the_sparse_vector(model):
    unet, sched, v = model
    sparse, h = get("hdae-sparse"), get("h")
    assert sparse.needs == ("direction",) and sparse.acts_on == "h" and "HDAE" in sparse.reference
    run = lambda method: sample(unet, sched, make_generators(2, [0, 1]), STEPS, 1.0, edit=method.action(3.0))  # noqa: E731
    by_method = run(sparse(v, k=5))
    by_hand = run(h(sparsify(v, 5)))
    torch.testing.assert_close(by_method, by_hand, rtol=0, atol=0)
    assert (by_method - run(h(v))).abs().max() > 1e-3  # sparser: another edit
    torch.testing.assert_close(run(sparse(v, k=v[0].numel())), run(h(v)), rtol=0, atol=0)
    assert sparse.from_direction(v, (1, 4)).k == sparse.k and sparse.from_direction(v, (1, 4)).window == (1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype", [("sd1", "float32"), ("sd2", "bfloat16"), ("sdxl", "float32")])
def test_the_sparse_method_on_sd_models(tmp_path, kind, dtype):
    """On the SD test shapes (SD 2.x: v-prediction in bfloat16; SDXL): under guidance the method
    is the h method with the sparse vector, bit for bit; on SD 1.x diffusers' own
    StableDiffusionPipeline through hspace.apply gives the sampler's image (<= 2/255)."""
    import hspace
    from hspace.data import models
    from hspace.hcore.generator import generate
    from tests.sd_fixtures import LATENT_SIZE, load_tiny_sd, save_tiny_sd

    folder = save_tiny_sd(tmp_path / kind, kind)
    ref = models.resolve(str(folder))
    unet, scheduler = models.load_checked(ref, "cpu", getattr(torch, dtype), clip_sample=False)
    text = models.text_setup(ref, ["a blue dog"], guidance_scale=3.0, image_size=models.image_size(ref, unet.config))
    steps = 4
    v = torch.randn(steps, *h_shape(unet), generator=torch.Generator().manual_seed(2))
    sparse = get("hdae-sparse")(v, k=8)
    run = lambda m: generate(unet, scheduler, make_generators(4, [0]), steps, 0.0, text=text, indices=[0],  # noqa: E731
                             edit=m.action(4.0))  # fmt: skip
    got = run(sparse)
    torch.testing.assert_close(got, run(get("h")(sparsify(v, 8))), rtol=0, atol=0)
    assert (got - run(get("h")(v))).abs().max() > 1e-3
    if kind != "sd1":
        return
    pipe = load_tiny_sd(folder, kind)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    latents = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=make_generators(4, [0])[0])
    with hspace.apply(pipe, method=sparse, gamma=4.0):
        out = pipe("a blue dog", latents=latents, num_inference_steps=steps, guidance_scale=3.0, eta=0.0,
                   output_type="np").images[0]  # fmt: skip
    mine = ((got[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().numpy()
    assert np.abs(np.round(out * 255) - mine).max() <= 2
