"""hcore.hooks and hcore.sampler against independent references (diffusers' own
DDIMPipeline and scheduler.step, plain forward hooks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from hspace.hcore.hooks import HSpaceHook, NoMidBlockError, h_shape
from hspace.hcore.sampler import Edit, ddim_scheduler, ddim_step, draw_noise, make_generators, sample


def capture(unet, scheduler, indices, steps=8, eta=0.0, edit=None, seed=7):
    hs = []
    x0 = sample(
        unet,
        scheduler,
        make_generators(seed, indices),
        steps,
        eta,
        edit=edit,
        on_step=lambda s, t, h: hs.append(h.clone()),
    )
    return x0, torch.stack(hs, 1)  # (B, T, C, H, W)


def test_eta0_matches_diffusers_ddim_pipeline(loaded_model):
    unet, scheduler = loaded_model
    ours = sample(unet, scheduler, make_generators(3, range(4)), 10, 0.0)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        batch_size=4, generator=make_generators(3, range(4)), eta=0.0, num_inference_steps=10, output_type="np"
    ).images  # (B, H, W, C) in [0, 1]
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours_np, ref, atol=1e-4)


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_step_equals_scheduler_step_with_same_variance_noise(loaded_model, eta):
    _, scheduler = loaded_model
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 3, 16, 16, generator=g) for _ in range(3))
    for t in sched.timesteps:  # the last step too (alpha_prev = final_alpha_cumprod)
        ours, _ = ddim_step(sched, x, int(t), eps, eps, eta, z)
        ref = sched.step(eps, int(t), x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_sample_alone_equals_sample_in_batch(loaded_model):
    unet, scheduler = loaded_model
    x_batch, h_batch = capture(unet, scheduler, range(16), eta=1.0)
    x_one, h_one = capture(unet, scheduler, [11], eta=1.0)
    torch.testing.assert_close(x_one[0], x_batch[11], atol=1e-4, rtol=0)
    torch.testing.assert_close(h_one[0], h_batch[11], atol=1e-4, rtol=0)
    assert not torch.allclose(x_batch[10], x_batch[11])


def test_generators_do_not_collide_across_run_seeds():
    from hspace.hcore.sampler import sample_seed

    seeds = {sample_seed(s, i) for s in range(20) for i in range(500)}
    assert len(seeds) == 20 * 500


def test_eta_list_equals_scalar(loaded_model):
    unet, scheduler = loaded_model
    a = sample(unet, scheduler, make_generators(1, range(2)), 6, 0.5)
    b = sample(unet, scheduler, make_generators(1, range(2)), 6, [0.5] * 6)
    c = sample(unet, scheduler, make_generators(1, range(2)), 6, [0.5] * 3 + [0.0] * 3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.isfinite(c).all() and (c - a).abs().max() > 1e-4  # the per-step list is honoured
    with pytest.raises(ValueError, match="eta has 5 values"):
        sample(unet, scheduler, make_generators(1, [0]), 6, [0.5] * 5)


def test_zero_edit_is_exact_and_nonzero_edit_changes(loaded_model):
    unet, scheduler = loaded_model
    steps = 8
    base, h = capture(unet, scheduler, range(3), steps)
    v = torch.randn(steps, *h.shape[2:], generator=torch.Generator().manual_seed(1))
    zero, _ = capture(unet, scheduler, range(3), steps, edit=Edit([v], [0.0]))
    assert torch.equal(zero, base)
    edited, h_edit = capture(unet, scheduler, range(3), steps, edit=Edit([v], [2.0]))
    assert (edited - base).abs().max() > 1e-3
    # the first step's injected h is exactly h + gamma v (the input x_T is unchanged)
    torch.testing.assert_close(h_edit[:, 0], h[:, 0] + 2.0 * v[0], atol=1e-5, rtol=1e-5)
    asyrp, _ = capture(unet, scheduler, range(3), steps, edit=Edit([v], [2.0], asyrp=True))
    assert (asyrp - edited).abs().max() > 1e-4
    # two directions sum; a window limits the edit
    summed, _ = capture(unet, scheduler, range(3), steps, edit=Edit([v, v], [1.0, 1.0]))
    torch.testing.assert_close(summed, edited, atol=1e-5, rtol=0)
    windowed, hw = capture(unet, scheduler, range(3), steps, edit=Edit([v], [2.0], window=(4, 8)))
    torch.testing.assert_close(hw[:, :4], h[:, :4], atol=0, rtol=0)
    assert (windowed - base).abs().max() > 1e-4


def test_per_sample_gammas_equal_separate_runs(loaded_model):
    unet, scheduler = loaded_model
    steps = 6
    _, h = capture(unet, scheduler, [0], steps)
    v = torch.randn(steps, *h.shape[2:], generator=torch.Generator().manual_seed(2))
    both, _ = capture(unet, scheduler, [5, 5], steps, edit=Edit([v], [torch.tensor([0.0, 1.5])]))
    one, _ = capture(unet, scheduler, [5], steps, edit=Edit([v], [1.5]))
    plain, _ = capture(unet, scheduler, [5], steps)
    torch.testing.assert_close(both[1], one[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(both[0], plain[0], atol=1e-4, rtol=0)


def test_captured_h_equals_plain_forward_hook(loaded_model):
    unet, _ = loaded_model
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([50, 50])
    try:
        with torch.no_grad(), HSpaceHook(unet) as hs:
            unet(x, t)
            ours = hs.last_h.clone()
    finally:
        handle.remove()
    torch.testing.assert_close(ours, seen[0], atol=0, rtol=0)
    assert tuple(ours.shape[1:]) == h_shape(unet) == (16, 8, 8)
    seen_in = []
    handle = unet.mid_block.register_forward_pre_hook(lambda m, a: seen_in.append(a[0].clone()))
    try:
        with torch.no_grad(), HSpaceHook(unet, point="input") as hs:
            unet(x, t)
            torch.testing.assert_close(hs.last_h, seen_in[0], atol=0, rtol=0)
    finally:
        handle.remove()


def test_replace_mode_substitutes_h(loaded_model):
    unet, _ = loaded_model
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([30])
    with torch.no_grad(), HSpaceHook(unet) as hs:
        eps = unet(x, t).sample
        h = hs.last_h.clone()
        hs.replace = h
        torch.testing.assert_close(unet(x, t).sample, eps, atol=0, rtol=0)
        hs.replace = torch.zeros_like(h)
        assert (unet(x, t).sample - eps).abs().max() > 1e-4


def test_hooks_removed_after_exception(loaded_model):
    unet, _ = loaded_model
    with pytest.raises(RuntimeError, match="boom"):
        with HSpaceHook(unet):
            assert len(unet.mid_block._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(unet.mid_block._forward_hooks) == 0
    with pytest.raises(ValueError, match="h point"):
        HSpaceHook(unet, point="middle")


def test_model_without_mid_block_is_refused():
    from tests.conftest import tiny_unet

    unet = tiny_unet(mid_block_type=None)
    with pytest.raises(NoMidBlockError, match="no mid_block"):
        HSpaceHook(unet)


def test_condition_unet_capture_and_inject():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    with torch.no_grad(), HSpaceHook(unet) as hs:
        eps = unet(x, t, ctx).sample
        assert tuple(hs.last_h.shape[1:]) == h_shape(unet) == (16, 4, 4)
        hs.delta = torch.ones_like(hs.last_h)
        assert (unet(x, t, ctx).sample - eps).abs().max() > 1e-5


def test_draw_noise_is_per_generator():
    a = draw_noise(make_generators(0, [0, 1]), (3, 4, 4))
    b = draw_noise(make_generators(0, [1]), (3, 4, 4))
    torch.testing.assert_close(a[1], b[0], atol=0, rtol=0)


def test_sequential_grid_plan_and_eta_above_one():
    from hspace.tasks.edit import DirectionSpec, plan_grid

    specs = [DirectionSpec("a", None, 1.0), DirectionSpec("b", None, -2.0)]
    cells, rows, cols = plan_grid(specs, [])
    assert cells == [[[], [(0, 1.0)], [(0, 1.0), (1, -2.0)]]] and cols[0] == "original"
    cells, rows, cols = plan_grid([DirectionSpec("c", None, None), specs[0]], [-1.0, 1.0])
    assert cells == [[[(1, 1.0), (0, -1.0)], [(1, 1.0), (0, 1.0)]]]


def test_eta_above_one_is_refused(loaded_model):
    unet, scheduler = loaded_model
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample(unet, scheduler, make_generators(0, [0]), 10, 3.0)
