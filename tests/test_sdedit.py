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


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype", [("sd1", "float32"), ("sd2", "bfloat16"), ("sdxl", "float32")])
def test_sdedit_with_a_target_prompt_on_sd_models(tmp_path, kind, dtype):
    """SDEdit on the SD test shapes (SD 2.x: v-prediction, in bfloat16): a photo's VAE latent
    noised to t0 and denoised under a target prompt with guidance is the explicit restart, bit
    for bit; the prompt steers it; in diffusers' own pipeline (SD 1.x) through hspace.apply the
    same image (<= 2/255)."""
    from hspace.data import models
    from hspace.hcore.generator import generate
    from tests.sd_fixtures import LATENT_SIZE, load_tiny_sd, save_tiny_sd

    folder = save_tiny_sd(tmp_path / kind, kind)
    ref = models.resolve(str(folder))
    unet, scheduler = models.load_checked(ref, "cpu", getattr(torch, dtype), clip_sample=False)
    size = models.image_size(ref, unet.config)
    text = models.text_setup(ref, ["a blue dog at night"], guidance_scale=3.0, image_size=size)
    photo = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1
    latent = text.encode(photo)
    sdedit = get("sdedit")(latent, scheduler)
    steps, k = 6, 3
    gens = lambda: make_generators(4, [0])  # noqa: E731
    got = generate(unet, scheduler, gens(), steps, 0.0, text=text, indices=[0], edit=sdedit.action((steps - k) / steps))
    start = noise_to_step(scheduler, latent, steps, k, gens())
    restart = generate(unet, scheduler, gens(), steps, 0.0, text=text, indices=[0], x_T=start, start_at=k)
    torch.testing.assert_close(got, restart, rtol=0, atol=0)
    other = generate(unet, scheduler, gens(), steps, 0.0, text=text, prompts=["a red cat"], edit=sdedit.action(0.5))
    assert (other - got).abs().mean() > 1e-3  # the target prompt steers the edit
    if kind != "sd1":
        return
    pipe = load_tiny_sd(folder, kind)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    made = get("sdedit")(latent, pipe.scheduler)
    x_T = make_generators(4, [0])
    latents = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=x_T[0])
    with hspace.apply(pipe, method=made, gamma=0.5):
        out = pipe(
            "a blue dog at night", latents=latents, num_inference_steps=steps, guidance_scale=3.0, eta=0.0,
            generator=gens(), output_type="np",
        ).images[0]  # fmt: skip
    mine = ((got[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().numpy()
    assert np.abs(np.round(out * 255) - mine).max() <= 2


@pytest.mark.slow
def test_hspace_edit_with_sdedit_by_name(tmp_path):
    """`hspace edit --model toy-sd --edit-method sdedit --target-prompt T --scales 0.5,1`: the
    source is the sample's own output (its final latent), each cell the explicit restart from it
    (noised to step k with the sample's first draw, denoised under T); a photo starts from the
    photo; a strength outside (0, 1] is refused before any work."""
    from PIL import Image
    from typer.testing import CliRunner

    from hspace.data import models
    from hspace.flows.cli import app
    from hspace.hcore.generator import Replay
    from hspace.hcore.sampler import to_uint8

    ref = models.resolve("toy-sd")
    unet, sched = models.load_checked(ref, "cpu", torch.float32, clip_sample=False)
    text = lambda p: models.text_setup(ref, [p], guidance_scale=4.0, image_size=32)  # noqa: E731
    steps, target = 6, "a smiling person"
    args = ["edit", "--model", "toy-sd", "--seed", "3", "--steps", str(steps), "--prompt", "a person"]
    args += ["--guidance-scale", "4", "--edit-method", "sdedit", "--device", "cpu"]
    res = CliRunner().invoke(
        app, [*args, "--target-prompt", target, "--scales", "0.5,1", "--out", str(tmp_path / "s.png")]
    )
    assert res.exit_code == 0, res.output
    cells = sorted((tmp_path / "s").glob("*.png"))
    assert [c.name for c in cells] == ["sample0__sdedit__gamma+0.5.png", "sample0__sdedit__gamma+1.png"]
    own = Replay(3, steps, 1.0).with_text(text("a person")).render(unet, sched, [0], stop_before=steps)
    for cell, k in zip(cells, (3, 0), strict=True):
        start = noise_to_step(sched, own, steps, k, make_generators(3, [0]))
        by_hand = Replay(3, steps, 1.0).with_text(text(target)).render(unet, sched, [0], x_T=start, start_at=k)
        mine = to_uint8(by_hand)[0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(np.asarray(Image.open(cell)).astype(int) - mine).max() <= 1
    res = CliRunner().invoke(app, [*args, "--scales", "0,1", "--out", str(tmp_path / "bad.png")])
    assert res.exit_code != 0 and "--scales: sdedit's strength t0 must be in (0, 1]" in res.output, res.output
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "bad").exists()

    photo = tmp_path / "face.png"  # a photo: the source is the photo's own latent
    face = to_uint8(Replay(5, steps, 1.0).with_text(text("a person")).render(unet, sched, [0]))[0]
    Image.fromarray(face.permute(1, 2, 0).numpy()).save(photo)
    args = ["edit", "--model", "toy-sd", "--image", str(photo), "--steps", str(steps), "--prompt", "a person"]
    args += ["--edit-method", "sdedit", "--scales", "0.17,1", "--device", "cpu", "--out", str(tmp_path / "p.png")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    light, full = (
        np.asarray(Image.open(tmp_path / "p" / f"face__sdedit__gamma+{g}.png")).astype(int) for g in ("0.17", "1")
    )
    near, far = (
        np.abs(light - face.permute(1, 2, 0).numpy()).mean(),
        np.abs(full - face.permute(1, 2, 0).numpy()).mean(),
    )
    assert near < far  # one step of six run again keeps the photo closer than all six
    res = CliRunner().invoke(app, [*args, "--sdedit", "3"])
    assert res.exit_code != 0 and "--sdedit K restarts every edit" in res.output
