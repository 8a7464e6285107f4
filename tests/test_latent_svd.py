"""The SVD of latent codes (hcore/latent_svd.py) and singular-value editing (hcore/edits/svd.py)
against independent references: numpy's SVD, hand-made subspaces with known principal angles,
and the explicit restart (the sampler stopped before step k, x_k edited with numpy, resumed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

import hspace
from hspace.hcore import latent_svd as ls
from hspace.hcore.edits import get, make
from hspace.hcore.sampler import make_generators, sample
from tests.test_jacobian import attention_unet

STEPS = 6


def latents(b=2, c=3, h=8, w=6, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["channel", "flat"])
def test_top_svd_is_numpys(variant):
    x = latents()
    u, s, vh = ls.top_svd(x, 4, variant)
    mats = x.numpy().astype(np.float64)
    mats = mats if variant == "channel" else mats.reshape(2, 1, 24, 6)
    nu, ns, nvh = np.linalg.svd(mats, full_matrices=False)
    np.testing.assert_allclose(s.numpy(), ns[..., :4], rtol=1e-5)
    # singular vectors up to sign: |u_i . u'_i| = 1
    np.testing.assert_allclose(np.abs(np.einsum("...ni,...ni->...i", u.numpy(), nu[..., :4])), 1, atol=1e-5)
    np.testing.assert_allclose(np.abs(np.einsum("...in,...in->...i", vh.numpy(), nvh[..., :4, :])), 1, atol=1e-5)
    with pytest.raises(ValueError, match="k must be in"):
        ls.top_svd(x, 7, variant)


@pytest.mark.parametrize("variant", ["channel", "flat"])
def test_scaling_and_transplant_are_numpys(variant):
    x, donor = latents(seed=1), latents(seed=2)
    shape = (2, 3, 8, 6) if variant == "channel" else (2, 1, 24, 6)
    m, d = x.numpy().astype(np.float64).reshape(shape), donor.numpy().astype(np.float64).reshape(shape)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    s2 = s.copy()
    s2[..., 1] *= np.array([0.5, 3.0]).reshape(2, 1)
    by_hand = np.einsum("...ni,...i,...im->...nm", u, s2, vh).reshape(x.shape)
    got = ls.scale_singular_values(x, 1, torch.tensor([0.5, 3.0]), variant)
    np.testing.assert_allclose(got.numpy(), by_hand, atol=1e-5)
    du, _, dvh = np.linalg.svd(d, full_matrices=False)
    sign = np.sign(np.einsum("...n,...n->...", u[..., :, 2], du[..., :, 2]))[..., None]
    u2, vh2 = u.copy(), vh.copy()
    u2[..., :, 2], vh2[..., 2, :] = du[..., :, 2] * sign, dvh[..., 2, :] * sign
    by_hand = np.einsum("...ni,...i,...im->...nm", u2, s, vh2).reshape(x.shape)
    np.testing.assert_allclose(ls.transplant(x, donor, 2, variant).numpy(), by_hand, atol=1e-5)


def test_geodesic_distance_of_hand_made_subspaces():
    """span(e1) and span(cos a e1 + sin a e2): one angle a; span(e1, e2) and span(e1, cos b e2 +
    sin b e3): angles (0, b); the distance sqrt(sum theta^2) is a, then b; random frames in a large
    space sit near the largest distance sqrt(k) pi/2."""
    a, b = 0.3, 1.1
    e = torch.eye(3, dtype=torch.float64)
    one = ls.geodesic_distance(e[:, :1], (math.cos(a) * e[:, 0] + math.sin(a) * e[:, 1])[:, None])
    assert abs(float(one) - a) < 1e-9
    second = torch.stack([e[:, 0], math.cos(b) * e[:, 1] + math.sin(b) * e[:, 2]], 1)
    two = ls.geodesic_distance(e[:, :2], second)
    assert abs(float(two) - b) < 1e-9
    np.testing.assert_allclose(ls.principal_angles(e[:, :2], second).sort().values.numpy(), [0, b], atol=1e-7)
    frames = ls.random_frames(2, 400, 3, seed=1)
    np.testing.assert_allclose((frames[0].T @ frames[0]).numpy(), np.eye(3), atol=1e-12)
    assert float(ls.geodesic_distance(frames[0], frames[1])) > 0.9 * ls.max_distance(3)


@pytest.fixture(scope="module")
def model():
    return attention_unet().to(torch.bfloat16), DDIMScheduler(num_train_timesteps=1000)


def test_sv_scale_is_the_explicit_restart(model):
    """sv-scale at step k in the sampler equals: x_k (the sampler stopped before step k), its
    sigma_i scaled by numpy's SVD, then the sampler resumed from there (bfloat16 U-Net with
    attention); s = 0 is the plain sample; a strength per sample in one batch."""
    unet, sched = model
    method = make("sv-scale:index=1:step=2")
    assert (method.index, method.step, method.acts_on) == (1, 2, "x_t") and "Wang" in method.reference
    gens = lambda: make_generators(7, [0, 1])  # noqa: E731
    x_k = sample(unet, sched, gens(), STEPS, 1.0, stop_before=2)
    m = x_k.double().numpy()
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    s[..., 1] *= np.array([1.5, 0.0]).reshape(2, 1)  # strengths 0.5 and -1
    edited = torch.from_numpy(np.einsum("...ni,...i,...im->...nm", u, s, vh)).float()
    ref = sample(unet, sched, gens(), STEPS, 1.0, x_T=edited, start_at=2)
    got = sample(unet, sched, gens(), STEPS, 1.0, edit=method.action(torch.tensor([0.5, -1.0])))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    plain = sample(unet, sched, gens(), STEPS, 1.0)
    torch.testing.assert_close(sample(unet, sched, gens(), STEPS, 1.0, edit=method.action(0.0)), plain, rtol=0, atol=0)
    assert (got - plain).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="strength s must be >= -1"):
        sample(unet, sched, gens(), STEPS, 1.0, edit=method.action(-2.0))
    with pytest.raises(ValueError, match="step 9 is not a step of 6"):
        sample(unet, sched, gens(), STEPS, 1.0, edit=make("sv-scale:step=9").action(0.5))
    with pytest.raises(ValueError, match="unexpected keyword argument 'nope'"):
        make("sv-scale:nope=1")


def test_sv_scale_in_diffusers_ddim_pipeline(model):
    """Inside diffusers' own DDIMPipeline through hspace.apply, by its spec with settings: the
    sampler's image (<= 1/255; float32: the pipeline keeps a bfloat16 model's latents in
    bfloat16 between steps, the sampler in float32)."""
    unet, sched = attention_unet(), model[1]
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
    with hspace.apply(pipe, method="sv-scale:index=0:step=3", gamma=-0.5):
        out = pipe(batch_size=2, generator=make_generators(7, [0, 1]), num_inference_steps=STEPS, output_type="pt")
    images = out.images.float().permute(0, 2, 3, 1).numpy()  # bfloat16 has no numpy type: "pt"
    assert get("sv-scale").name == "sv-scale"
    ref = sample(unet, sched, make_generators(7, [0, 1]), STEPS, 0.0, edit=make("sv-scale:index=0:step=3").action(-0.5))
    ref = (ref.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.round(images * 255) - np.round(ref * 255)).max() <= 1


def test_hspace_edit_with_sv_scale(tmp_path):
    """`hspace edit --model toy --seed 2 --edit-method "sv-scale:index=0:step=3" --scales -1,0,1`:
    the 0 cell is the plain sample, the others the explicit restart."""
    from PIL import Image
    from typer.testing import CliRunner

    from hspace.data import models
    from hspace.flows.cli import app
    from hspace.hcore.generator import Replay
    from hspace.hcore.sampler import to_uint8

    args = ["edit", "--model", "toy", "--seed", "2", "--steps", str(STEPS), "--device", "cpu"]
    res = CliRunner().invoke(
        app, [*args, "--edit-method", "sv-scale:index=0:step=3", "--scales", "-1,0,1", "--out", str(tmp_path / "g.png")]
    )
    assert res.exit_code == 0, res.output
    unet, sched = models.load_checked(models.resolve("toy"), "cpu", torch.float32, clip_sample=False)
    replay = Replay(2, STEPS, 1.0)
    x_k = replay.render(unet, sched, [0], stop_before=3)
    for g in (-1, 0, 1):
        cell = np.asarray(Image.open(tmp_path / "g" / f"sample0__sv-scale__gamma{g:+d}.png")).astype(int)
        start = ls.scale_singular_values(x_k, 0, 1 + g)
        ref = to_uint8(replay.render(unet, sched, [0], x_T=start, start_at=3))[0].permute(1, 2, 0).numpy()
        assert np.abs(cell - ref).max() <= 1, g
    res = CliRunner().invoke(app, [*args, "--edit-method", "sv-scale:index=0", "--scales", "-2", "--out", "x.png"])
    assert res.exit_code != 0 and "--scales: sv-scale's strength s must be >= -1" in res.output
