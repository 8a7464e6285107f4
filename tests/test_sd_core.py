"""Stable Diffusion-family groundwork in hcore against diffusers' own pipelines: text
conditioning with classifier-free guidance, v-prediction (eq. (3) rewritten for v), the
edit branch under guidance, and a bfloat16 U-Net. Tiny random pipelines (tests/sd_fixtures.py)
saved and loaded back, as a user's folder is."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from hspace.hcore.conditioning import Conditioning, TextEmbedding, encode_for_pipeline, encode_prompt, unet_output
from hspace.hcore.hooks import HSpaceHook
from hspace.hcore.sampler import Edit, ddim_scheduler, ddim_step, make_generators, sample
from tests.sd_fixtures import IMAGE_SIZE, KINDS, load_tiny_sd, save_tiny_sd

PROMPTS = ["a red cat", "a blue dog, at night"]
STEPS = 4
# hspace's sampler vs the pipeline, 4 steps, float32 on CPU: measured max |diff| <= 1e-6
# (ddim_step and DDIMScheduler.step order their float operations differently)
ATOL = 1e-5


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: save_tiny_sd(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def pipes(sd_dirs):
    return {kind: load_tiny_sd(folder, kind) for kind, folder in sd_dirs.items()}


def test_saved_folders_have_the_real_layout(sd_dirs, pipes):
    for kind in KINDS:
        names = {p.name for p in sd_dirs[kind].iterdir()}
        assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
        pipe = pipes[kind]
        assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == IMAGE_SIZE
        assert type(pipe.unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert pipes["sd2"].scheduler.config.prediction_type == "v_prediction"
    assert pipes["sd2"].unet.config.use_linear_projection
    xl = pipes["sdxl"]
    assert {"text_encoder_2", "tokenizer_2"} <= {p.name for p in sd_dirs["sdxl"].iterdir()}
    width = xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    assert xl.unet.config.cross_attention_dim == width
    assert xl.unet.config.addition_embed_type == "text_time"


@pytest.mark.parametrize(
    "kind, negative, force_zeros",
    [("sd1", None, True), ("sd1", "blurry", True), ("sdxl", None, True), ("sdxl", None, False), ("sdxl", "ugly", True)],
)
def test_encode_prompt_equals_pipeline_encode_prompt(pipes, kind, negative, force_zeros):
    pipe = pipes[kind]
    negatives = None if negative is None else [negative] * len(PROMPTS)
    ours = encode_for_pipeline(
        pipe, PROMPTS, negative_prompt=negatives, guidance_scale=7.5, force_zeros_for_empty_prompt=force_zeros
    )
    if kind == "sd1":
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negatives)
        torch.testing.assert_close(ours.cond.hidden_states, cond, atol=0, rtol=0)
        torch.testing.assert_close(ours.uncond.hidden_states, uncond, atol=0, rtol=0)
        return
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    try:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=negatives
        )
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    for a, b in [
        (ours.cond.hidden_states, cond),
        (ours.uncond.hidden_states, uncond),
        (ours.cond.text_embeds, pooled),
        (ours.uncond.text_embeds, uncond_pooled),
    ]:
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (uncond == 0).all() == (negative is None and force_zeros)
    expected = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]] * len(PROMPTS)).float()
    torch.testing.assert_close(ours.cond.time_ids, expected, atol=0, rtol=0)
    torch.testing.assert_close(ours.uncond.time_ids, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kind, eta, guidance, negative",
    [
        ("sd1", 0.0, 7.5, None),
        ("sd1", 1.0, 7.5, "blurry"),
        ("sd1", 0.0, 1.0, None),  # no guidance: one pass, conditional only
        ("sd2", 0.0, 7.5, None),
        ("sd2", 1.0, 7.5, None),
        ("sdxl", 0.0, 7.5, None),
        ("sdxl", 1.0, 5.0, "ugly"),
    ],
)
def test_sampler_reproduces_diffusers_pipeline(pipes, kind, eta, guidance, negative):
    """Same generators (one per sample: x_T, then one z_t per step, which is exactly what
    the pipeline draws from a list of generators when eta > 0), same prompts: hspace's
    sampler without an edit gives the pipeline's latents."""
    pipe = pipes[kind]
    negatives = None if negative is None else [negative] * len(PROMPTS)
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        ref = pipe(
            PROMPTS,
            negative_prompt=negatives,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            eta=eta,
            generator=make_generators(5, range(len(PROMPTS))),
            output_type="latent",
        ).images
    finally:
        pipe.scheduler = scheduler
    cond = encode_for_pipeline(pipe, PROMPTS, negative_prompt=negatives, guidance_scale=guidance)
    assert cond.guided == (guidance > 1)
    ours = sample(pipe.unet, scheduler, make_generators(5, range(len(PROMPTS))), STEPS, eta, conditioning=cond)
    assert ours.shape == ref.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the prompts / samples differ


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.4])
def test_v_prediction_step_equals_scheduler_step(pipes, eta):
    sched = ddim_scheduler(pipes["sd2"].scheduler)
    assert sched.config.prediction_type == "v_prediction"
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for t in sched.timesteps:  # the last step too (alpha_prev = final_alpha_cumprod)
        ours, p_t = ddim_step(sched, x, int(t), v, v, eta, z)
        ref = sched.step(v, int(t), x, eta=eta, variance_noise=z)
        torch.testing.assert_close(ours, ref.prev_sample, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p_t, ref.pred_original_sample, atol=1e-6, rtol=1e-5)
    # the same step through eps derived from v, in an epsilon-prediction scheduler
    a = sched.alphas_cumprod[int(sched.timesteps[3])]
    t3 = int(sched.timesteps[3])
    eps = a.sqrt() * v + (1 - a).sqrt() * x
    eps_sched = DDIMScheduler.from_config(sched.config, prediction_type="epsilon")
    eps_sched.set_timesteps(10)
    via_eps, _ = ddim_step(eps_sched, x, t3, eps, eps, eta, z)
    torch.testing.assert_close(ddim_step(sched, x, t3, v, v, eta, z)[0], via_eps, atol=1e-5, rtol=1e-5)


def test_unknown_prediction_type_is_refused(pipes):
    config = dict(pipes["sd2"].scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type='sample'.*'epsilon' and 'v_prediction'"):
        ddim_scheduler(DDIMScheduler.from_config(config))
    with pytest.raises(ValueError, match="'epsilon' models only"):
        ddim_scheduler(pipes["sd2"].scheduler, prediction_types=("epsilon",))


def _guided_h(unet, x, t, cond, delta=None, branch="both"):
    """(h the hook hands downstream, as seen by the first up block; the U-Net's raw output)."""
    seen = []
    handle = unet.up_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad(), HSpaceHook(unet, edit_branch=branch) as hs:
            hs.guided, hs.delta = True, delta
            out = unet(torch.cat([x, x]), t, **cond.unet_kwargs(len(x))).sample
            torch.testing.assert_close(hs.last_h, seen[0], atol=0, rtol=0)
    finally:
        handle.remove()
    return seen[0], out


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_edit_branch_changes_only_its_half(pipes, kind):
    pipe = pipes[kind]
    cond = encode_for_pipeline(pipe, PROMPTS, guidance_scale=7.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    h, out = _guided_h(pipe.unet, x, 501, cond)
    delta = torch.randn(2, *h.shape[1:], generator=torch.Generator().manual_seed(4))
    for branch, (du, dc) in {"both": (1, 1), "cond": (0, 1), "uncond": (1, 0)}.items():
        h_e, out_e = _guided_h(pipe.unet, x, 501, cond, delta, branch)
        torch.testing.assert_close(h_e[:2], h[:2] + du * delta, atol=0, rtol=0)  # [uncond; cond]
        torch.testing.assert_close(h_e[2:], h[2:] + dc * delta, atol=0, rtol=0)
        for half, edited in ((slice(0, 2), du), (slice(2, 4), dc)):
            change = (out_e[half] - out[half]).abs().max()
            assert change > 1e-4 if edited else change < 1e-6, (branch, half, change)


def test_sampler_captures_cond_half_and_edits_its_branch(pipes):
    pipe = pipes["sdxl"]
    unet, sched = pipe.unet, pipe.scheduler
    cond = encode_for_pipeline(pipe, PROMPTS, guidance_scale=7.5)
    full = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: full.append(out.clone()))
    try:
        got = {}
        for capture in ("cond", "uncond", "both"):
            hs = []
            sample(
                unet,
                sched,
                make_generators(1, [0, 1]),
                3,
                1.0,
                conditioning=cond,
                capture=capture,
                on_step=lambda s, t, h, hs=hs: hs.append(h.clone()),
            )
            got[capture] = torch.stack(hs)
    finally:
        handle.remove()
    whole = torch.stack(full[:3])  # the first run's h, all 2B rows [uncond; cond]
    torch.testing.assert_close(got["cond"], whole[:, 2:], atol=0, rtol=0)
    torch.testing.assert_close(got["uncond"], whole[:, :2], atol=0, rtol=0)
    torch.testing.assert_close(got["both"], whole, atol=0, rtol=0)
    # an edit with a strength per sample, on one branch: the first step's h shows it on
    # that branch only (x_T is the same); capture still hands over the cond half
    v = torch.randn(3, *whole.shape[2:], generator=torch.Generator().manual_seed(2))
    gammas = torch.tensor([1.0, -2.0])
    for branch, (du, dc) in {"cond": (0, 1), "uncond": (1, 0), "both": (1, 1)}.items():
        hs = []
        x = sample(
            unet,
            sched,
            make_generators(1, [0, 1]),
            3,
            1.0,
            conditioning=cond,
            capture="both",
            edit=Edit([v], [gammas], branch=branch),
            on_step=lambda s, t, h, hs=hs: hs.append(h.clone()),
        )
        step0 = hs[0]
        delta = gammas.reshape(-1, 1, 1, 1) * v[0]
        torch.testing.assert_close(step0[:2], whole[0, :2] + du * delta, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(step0[2:], whole[0, 2:] + dc * delta, atol=1e-6, rtol=1e-6)
        assert torch.isfinite(x).all()


def test_branch_and_capture_need_guidance(pipes):
    pipe = pipes["sd1"]
    unguided = encode_for_pipeline(pipe, PROMPTS, guidance_scale=1.0)
    assert not unguided.guided
    gens = make_generators(0, [0, 1])
    with pytest.raises(ValueError, match="capture='uncond' needs classifier-free guidance"):
        sample(pipe.unet, pipe.scheduler, gens, 2, 0.0, conditioning=unguided, capture="uncond")
    v = torch.zeros(2, 64, 4, 4)
    with pytest.raises(ValueError, match="'uncond' needs classifier-free guidance"):
        sample(pipe.unet, pipe.scheduler, gens, 2, 0.0, conditioning=unguided, edit=Edit([v], [1.0], branch="uncond"))
    with pytest.raises(ValueError, match="edit branch must be one of"):
        sample(pipe.unet, pipe.scheduler, gens, 2, 0.0, conditioning=unguided, edit=Edit([v], [1.0], branch="text"))
    with pytest.raises(ValueError, match="edit branch must be one of"):
        HSpaceHook(pipe.unet, edit_branch="neither")
    # a conditioning the U-Net cannot take is refused before sampling
    wide = Conditioning(TextEmbedding(torch.zeros(1, 16, 48)))
    with pytest.raises(ValueError, match="cross_attention_dim 32"):
        sample(pipe.unet, pipe.scheduler, gens, 2, 0.0, conditioning=wide)
    no_time = Conditioning(TextEmbedding(torch.zeros(1, 16, 48)))
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        sample(pipes["sdxl"].unet, pipe.scheduler, gens, 2, 0.0, conditioning=no_time)
    with pytest.raises(ValueError, match="image size"):
        encode_prompt(
            "a cat",
            [pipes["sdxl"].tokenizer, pipes["sdxl"].tokenizer_2],
            [pipes["sdxl"].text_encoder, pipes["sdxl"].text_encoder_2],
        )


def test_one_prompt_broadcasts_over_the_batch(pipes):
    pipe = pipes["sd2"]
    one = encode_for_pipeline(pipe, "a red cat", guidance_scale=7.5)
    two = encode_for_pipeline(pipe, ["a red cat"] * 2, guidance_scale=7.5)
    assert one.cond.batch_size == 1
    a = sample(pipe.unet, pipe.scheduler, make_generators(0, [0, 1]), 3, 1.0, conditioning=one)
    b = sample(pipe.unet, pipe.scheduler, make_generators(0, [0, 1]), 3, 1.0, conditioning=two)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 rows for a batch of 3"):
        sample(pipe.unet, pipe.scheduler, make_generators(0, [0, 1, 2]), 3, 1.0, conditioning=two)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_bfloat16_unet_runs(sd_dirs, kind):
    """A bfloat16 U-Net (loaded afresh: the module's float32 pipelines stay as they are)
    samples with guidance and an edit; the latents come back float32 and finite, near the
    float32 run's."""
    pipe = load_tiny_sd(sd_dirs[kind], kind)
    cond = encode_for_pipeline(pipe, PROMPTS, guidance_scale=7.5)
    h_shape = (64, 4, 4)
    v = torch.randn(STEPS, *h_shape, generator=torch.Generator().manual_seed(0))
    edit = Edit([v], [0.5], branch="cond")
    ref = sample(pipe.unet, pipe.scheduler, make_generators(2, [0, 1]), STEPS, 1.0, conditioning=cond, edit=edit)
    pipe.unet.to(torch.bfloat16)
    hs = []
    x = sample(
        pipe.unet,
        pipe.scheduler,
        make_generators(2, [0, 1]),
        STEPS,
        1.0,
        conditioning=cond,
        edit=edit,
        on_step=lambda s, t, h: hs.append(h),
    )
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert hs[0].dtype == torch.bfloat16 and hs[0].shape == (2, *h_shape)
    assert (x - ref).abs().max() < 0.1 * ref.abs().max()
    # unet_output combines the guidance in float32
    out = unet_output(pipe.unet, x, 1, cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
