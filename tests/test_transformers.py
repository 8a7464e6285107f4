"""Transformer denoisers (PixArt-alpha, SD3, FLUX) on tiny random-weight pipelines saved with
save_pretrained and loaded through hspace's loader (tests/transformer_fixtures.py):

- the unedited sample equals diffusers' own pipeline with the same latents and prompt, in float32
  (whole images, the pipeline's own decode) and bfloat16 (the latents; hspace keeps a DDIM model's
  x_t in float32 as for SD, so PixArt's pipeline is given the same casts around its transformer);
- h at the default point is the middle block's image tokens on their patch grid (D, rows, cols),
  checked against an independent hook;
- through the commands: sample, PCA, prompt-pair directions, edit, and hspace.apply inside the
  family's diffusers pipeline giving the CLI's edited image;
- bad input: an eta for a flow model, a block that does not exist: one line, nothing written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import transformer_fixtures as tf

PROMPTS = "a red cat,a blue dog"
STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    return {family: tf.save(family, root / family) for family in tf.FAMILIES}


def loaded(folder, dtype=torch.float32, guidance=1.0, prompts=("a red cat",)):
    from hspace.data import models

    ref = models.resolve(str(folder))
    unet, scheduler = models.load_checked(ref, "cpu", dtype, clip_sample=False)
    text = models.text_setup(ref, list(prompts), guidance_scale=guidance)
    return ref, unet, scheduler, text


def _cast_calls(module, dtype):
    """Float inputs cast to ``dtype`` and the output back to float32 around ``module`` (what
    hspace's DDIM sampler does around a bfloat16 denoiser)."""

    def cast(v):
        return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v

    module.register_forward_pre_hook(
        lambda m, a, k: (tuple(cast(v) for v in a), {n: cast(v) for n, v in k.items()}), with_kwargs=True
    )
    module.register_forward_hook(lambda m, a, out: (out[0].float(), *out[1:]))


# the quick tier keeps float32 and the three families; bfloat16 and FLUX.1-dev run in the full suite
@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=["float32", "bfloat16"]
)
@pytest.mark.parametrize(
    "family", [f if f != "flux-dev" else pytest.param(f, marks=pytest.mark.slow) for f in tf.FAMILIES]
)
def test_the_unedited_sample_equals_the_diffusers_pipeline(folders, family, dtype):
    from hspace.hcore.generator import generate
    from hspace.hcore.sampler import draw_noise, make_generators

    scale = tf.CALL[family]["guidance_scale"]
    _, unet, scheduler, text = loaded(folders[family], dtype, scale)
    gens = make_generators(7, [0])
    x_T = draw_noise(make_generators(7, [0]), (4, 16, 16))
    ours = generate(unet, scheduler, gens, STEPS, 0.0, text=text, prompts=["a red cat"])
    pipe = tf.pipeline(folders[family], family, dtype)
    call = {**tf.CALL[family], "num_inference_steps": STEPS, "height": tf.IMAGE, "width": tf.IMAGE}
    call |= {"eta": 0.0} if family == "pixart" else {}
    if dtype == torch.float32:
        theirs = pipe("a red cat", latents=tf.latents(family, x_T), output_type="pt", **call).images
        assert (ours - (theirs * 2 - 1)).abs().max() <= 1 / 255 * 2  # [-1, 1]: 1/255 of [0, 1]
        return
    cond = text.conditioning(["a red cat"])
    emb = {"pixart": ("prompt_embeds", "prompt_attention_mask"), "sd3": ("prompt_embeds", "pooled_prompt_embeds")}
    emb = emb.get(family, ("prompt_embeds", "pooled_prompt_embeds"))
    given = {emb[0]: cond.cond.hidden_states, emb[1]: getattr(cond.cond, "attention_mask", None)}
    if family != "pixart":
        given[emb[1]] = cond.cond.text_embeds
    if cond.guided:
        neg = cond.uncond
        given["negative_" + emb[0]] = neg.hidden_states
        given["negative_" + emb[1]] = neg.attention_mask if family == "pixart" else neg.text_embeds
    if family == "pixart":
        _cast_calls(pipe.transformer, dtype)  # x_t, guidance and DDIM in float32, the transformer in bfloat16
        given["negative_prompt"] = None
    else:
        pipe.to(dtype)  # SD3 / FLUX: x_t in the model's dtype, as the pipelines keep it
        given = {k: v.to(dtype) if v.is_floating_point() else v for k, v in given.items()}
    start = x_T if family == "pixart" else x_T.to(dtype)
    z = pipe(latents=tf.latents(family, start), output_type="latent", **call, **given).images
    if family.startswith("flux"):
        z = pipe._unpack_latents(z, tf.IMAGE, tf.IMAGE, pipe.vae_scale_factor)
    assert (text.decode(z.float()) - ours).abs().max() <= 2 / 255  # both through the float32 decoder


def test_h_is_the_middle_blocks_image_tokens_on_their_grid(folders):
    from hspace.hcore.hooks import HSpaceHook, h_shape

    for family in ("sd3", "flux", "pixart"):
        _, unet, _, text = loaded(folders[family], guidance=2.0)
        names = [n for n, _ in unet.blocks()]
        middle = dict(unet.transformer.named_modules())[names[len(names) // 2]]
        assert unet.mid_block is middle
        seen = {}

        def grab(module, args, out, seen=seen):
            seen["tokens"] = out[1] if isinstance(out, tuple) else out

        handle = middle.register_forward_hook(grab)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        cond = text.conditioning(["a red cat"])
        with torch.no_grad(), HSpaceHook(unet) as hs:
            unet(torch.cat([x, x]) if cond.guided else x, torch.tensor(500.0), **cond.unet_kwargs(1))
        handle.remove()
        tokens, h = seen["tokens"], hs.last_h
        d, rows, cols = h_shape(unet)
        assert h.shape[1:] == (d, rows, cols) == (tokens.shape[2], 8, 8)
        for r, c in ((0, 0), (2, 5), (7, 7)):  # token r * cols + c is cell (r, c)
            torch.testing.assert_close(h[:, :, r, c], tokens[:, r * cols + c], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["pixart", "sd3", "flux-dev"])
def test_commands_and_apply_in_the_diffusers_pipeline(folders, family, tmp_path):
    """sample / pca / directions (prompt pair) / edit through the CLI; the prompt-pair direction
    applied with hspace.apply inside the family's own pipeline gives the CLI's image (<= 2/255);
    gamma 0 gives the stored sample."""
    from PIL import Image

    import hspace
    from hspace.data.stores import SampleStore
    from hspace.hcore.hooks import h_shape
    from hspace.hcore.sampler import draw_noise, make_generators
    from tests.test_sd import hspace as cli

    scale = str(tf.CALL[family]["guidance_scale"])
    run = tmp_path / "run"
    r = cli("sample", "--model", folders[family], "--prompts", PROMPTS, "--n", "4", "--steps", STEPS, "--eta", "0",
            "--batch-size", "2", "--guidance-scale", scale, "--out", run)  # fmt: skip
    assert r.exit_code == 0, r.output
    store = SampleStore(run / "samples.zarr")
    assert store.h.shape[1:] == (STEPS, *h_shape(loaded(folders[family])[1]))
    assert cli("pca", run, "--components", "2").exit_code == 0
    r = cli("directions", run, "--prompt-pair", "a red cat", "a happy red cat", "--name", "happy", "--held-out", "0")
    assert r.exit_code == 0, r.output
    direction = hspace.open_run(run).direction("happy")
    assert direction.v.shape[1:] == store.h.shape[2:] and direction.v.abs().sum() > 0
    grid = tmp_path / "g.png"
    r = cli("edit", run, "--sample", "0", "--direction", direction.path, "--scales", "0,10", "--out", grid)
    assert r.exit_code == 0, r.output
    png = {g: np.asarray(Image.open(tmp_path / "g" / f"sample0__happy__gamma{g}.png")).astype(np.int16)
           for g in ("+0", "+10")}  # fmt: skip
    stored = store.x0[0].astype(np.int16).transpose(1, 2, 0)
    assert np.abs(png["+0"] - stored).max() <= 1
    pipe = tf.pipeline(folders[family], family)
    x_T = draw_noise(make_generators(0, [0]), (4, 16, 16))
    call = {**tf.CALL[family], "num_inference_steps": STEPS, "height": tf.IMAGE, "width": tf.IMAGE}
    call |= {"eta": 0.0} if family == "pixart" else {}
    with hspace.apply(pipe, direction, gamma=10.0):
        out = pipe("a red cat", latents=tf.latents(family, x_T), output_type="np", **call).images[0]
    edited = np.round(out * 255).astype(np.int16)
    assert np.abs(edited - png["+10"]).max() <= 2, np.abs(edited - png["+10"]).max()
    assert np.abs(edited - stored).mean() > 0.5
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer.modules())


def test_bad_input_is_one_line_before_any_work(folders, tmp_path):
    from tests.test_sd import assert_refused
    from tests.test_sd import hspace as cli

    base = ("--prompts", PROMPTS, "--n", "2", "--steps", "2")
    for family in ("sd3", "flux"):
        out = tmp_path / f"eta-{family}"
        assert_refused(cli("sample", "--model", folders[family], *base, "--eta", "1", "--out", out), "no eta", "0")
        assert not out.exists()
    out = tmp_path / "point"
    r = cli("sample", "--model", folders["pixart"], *base, "--eta", "0", "--h-point", "transformer_blocks.7",
            "--out", out)  # fmt: skip
    assert_refused(r, "transformer_blocks.7", "transformer_blocks.1")
    assert not out.exists()


@pytest.mark.slow
def test_jacobian_plan_and_inversion_on_transformers(folders, tmp_path):
    """The Jacobian of sec. 4.2 at a step of a flow model (f(h) = v(x_t, h)) and of PixArt (eps):
    its vector v is an eigenvector of J^T J with eigenvalue sigma^2, by torch's own jvp and vjp of
    the map (|J v| = sigma; J^T J v = sigma^2 v), and sigma beats a random unit vector's gain;
    `hspace run --plan` counts a transformer's h bytes; a flow model is not
    inverted (no noise schedule), refused in one line with nothing written."""
    from hspace.data.stores import JacobianStore
    from hspace.hcore import jacobian as jac
    from hspace.hcore.sampler import step_timestep
    from tests.test_sd import assert_refused
    from tests.test_sd import hspace as cli

    for family in ("sd3", "pixart"):
        run = tmp_path / family
        r = cli("sample", "--model", folders[family], "--prompt", "a red cat", "--n", "2", "--steps", "2", "--eta", "0",
                "--guidance-scale", "1", "--out", run)  # fmt: skip
        assert r.exit_code == 0, r.output
        r = cli("jacobian", run, "--sample", "0", "--step", "1", "--k", "1", "--max-iters", "40", "--tol", "1e-5")
        assert r.exit_code == 0, r.output
        arrays, attrs = JacobianStore(run / "jacobian.zarr").read(0, 1)
        _, unet, scheduler, text = loaded(folders[family])
        t = step_timestep(unet, scheduler, 2, 1)
        x_t = torch.from_numpy(arrays["x_t"])
        cond = text.conditioning(["a red cat"])
        h0 = jac.h_at(unet, x_t, t, conditioning=cond)
        f = jac.eps_of_h(unet, x_t, t, conditioning=cond, h0=h0)
        v, h0 = torch.from_numpy(arrays["vectors"][:1]).to(h0.dtype), h0[None]  # f maps a batch of h
        _, jv = torch.autograd.functional.jvp(f, h0, v)
        _, jtjv = torch.autograd.functional.vjp(f, h0, jv)
        sigma = float(arrays["singular_values"][0])
        assert abs(float(jv.norm()) - sigma) <= 1e-3 * sigma
        assert float((jtjv - sigma**2 * v).norm()) <= 0.05 * sigma**2, float((jtjv - sigma**2 * v).norm()) / sigma**2
        r = torch.randn(tuple(v.shape), generator=torch.Generator().manual_seed(0))
        assert float(torch.autograd.functional.jvp(f, h0, r / r.norm())[1].norm()) < sigma
    config = tmp_path / "flux.yaml"
    config.write_text(f"sample:\n  model: {folders['flux']}\n  prompt: a cat\n  n: 300\n  steps: 4\n  eta: 0\n")
    r = cli("run", "--config", config, "--out", tmp_path / "plan", "--plan")
    assert r.exit_code == 0, r.output
    assert "300 x 4 x 32x8x8 x 2 B" in r.output.replace("\n", " ") and not (tmp_path / "plan").exists()
    from PIL import Image

    images = tmp_path / "photos"
    for label in ("positive", "negative"):
        (images / label).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 100, 50)).save(images / label / "a.png")
    r = cli("invert", "--images", images, "--model", folders["sd3"], "--prompt", "x", "--out", tmp_path / "inv")
    assert_refused(r, "flow-matching", "DDIM")
    assert not (tmp_path / "inv").exists()
