"""DiffMorpher (hcore/morph.py, tasks/morph.py, `hspace morph`): slerp and AdaIN against numpy,
the rescheduling against a hand-made path, LoRA interpolation of the parameters, the
self-attention mix (at a = 0 it is the recorded end frame, bit for bit), and the command on
toy-sd: files, end frames against the inputs, LoRAs reused and refused, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hspace.data import models
from hspace.flows.cli import app
from hspace.hcore.morph import KVMix, add_lora, reschedule, set_lora, slerp, spacing_spread

runner = CliRunner()


def test_slerp_and_adain_against_numpy():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) * 2 + 1
    a0, b0 = z0.numpy().ravel().astype(np.float64), z1.numpy().ravel().astype(np.float64)
    phi = np.arccos(a0 @ b0 / np.linalg.norm(a0) / np.linalg.norm(b0))
    for a in (0.0, 0.3, 1.0):
        ref = (np.sin((1 - a) * phi) * a0 + np.sin(a * phi) * b0) / np.sin(phi)
        np.testing.assert_allclose(slerp(z0, z1, a, adain=False).numpy().ravel(), ref, rtol=0, atol=1e-5)
    mid = slerp(z0, z1, 0.3, adain=True).double()
    for stat, fn in (("mean", lambda x: x.mean((-2, -1))), ("std", lambda x: x.std((-2, -1), unbiased=False))):
        want = 0.7 * fn(z0.double()) + 0.3 * fn(z1.double())
        torch.testing.assert_close(fn(mid), want, rtol=0, atol=2e-3, msg=stat)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0, rtol=0, atol=1e-4)  # AdaIN to its own statistics


def test_reschedule_evens_out_a_hand_made_path():
    # frames on a line at 0, 1, 4, 5: neighbour distances 1, 3, 1 (cumulative 0, .2, .8, 1)
    frames = torch.tensor([0.0, 1.0, 4.0, 5.0]).reshape(4, 1, 1, 1)
    alphas = reschedule(frames)
    want = np.interp(np.linspace(0, 1, 4), [0, 0.2, 0.8, 1.0], np.linspace(0, 1, 4))
    np.testing.assert_allclose(alphas, want, atol=1e-12)
    even = torch.tensor(np.interp(alphas, np.linspace(0, 1, 4), [0.0, 1.0, 4.0, 5.0])).reshape(4, 1, 1, 1)
    assert spacing_spread(frames) > 0.4 and spacing_spread(even) < 1e-9


@pytest.fixture(scope="module")
def toy_sd():
    ref = models.resolve("toy-sd")
    return models.load_checked(ref, "cpu", torch.float32, clip_sample=False)


def test_lora_interpolation_mixes_the_parameters(toy_sd):
    unet, sched = models.load_checked(models.resolve("toy-sd"), "cpu", torch.float32, clip_sample=False)
    x, t, h = torch.randn(1, 4, 8, 8), 500, torch.randn(1, 24, 64)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=h).sample
    start = add_lora(unet, rank=4)
    assert start and all(".lora_" in k for k in start)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=h).sample, plain)  # B = 0 at the start
    one = {k: torch.randn_like(v) for k, v in start.items()}
    two = {k: torch.randn_like(v) for k, v in start.items()}
    set_lora(unet, [one, two], [0.75, 0.25])
    params = dict(unet.named_parameters())
    for k in start:
        torch.testing.assert_close(params[k].detach(), 0.75 * one[k] + 0.25 * two[k])


def test_attention_mix_at_zero_is_the_recorded_end_frame(toy_sd):
    from hspace.hcore.conditioning import Conditioning, TextEmbedding
    from hspace.hcore.sampler import make_generators, sample

    unet, sched = toy_sd
    z = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    c = [torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    c = [Conditioning(TextEmbedding(e)) for e in c]
    mixer = KVMix(unet)
    ends = []
    for i in range(2):
        with mixer.record():
            ends.append(sample(unet, sched, make_generators(0, [0]), 6, 0.0, x_T=z[i], conditioning=c[i]))
    assert len(mixer.stores[0]) == 6 * sum(".attn1." in k and k.startswith("up_blocks.") for k in unet.attn_processors)
    with mixer.mix(0.0, 1.0, 6):
        again = sample(unet, sched, make_generators(0, [0]), 6, 0.0, x_T=z[0], conditioning=c[0])
    torch.testing.assert_close(again, ends[0], rtol=0, atol=1e-6)
    with mixer.mix(1.0, 1.0, 6):  # the other frame's keys and values: a different image
        other = sample(unet, sched, make_generators(0, [0]), 6, 0.0, x_T=z[0], conditioning=c[0])
    assert (other - ends[0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def photos(tmp_path_factory, toy_sd):
    from hspace.hcore.generator import Replay
    from hspace.hcore.sampler import to_uint8

    unet, sched = toy_sd
    folder = tmp_path_factory.mktemp("photos")
    prompts = ["a smiling young woman wearing glasses", "a serious old man wearing a hat"]
    text = models.text_setup(models.resolve("toy-sd"), prompts, guidance_scale=4.0, image_size=32)
    x = Replay(5, 10, 1.0).with_text(text).render(unet, sched, [0, 1])
    paths = []
    for i, im in enumerate(to_uint8(x).numpy()):
        paths.append(folder / f"{'ab'[i]}.png")
        Image.fromarray(im.transpose(1, 2, 0)).save(paths[-1])
    return paths, prompts


@pytest.mark.slow
def test_hspace_morph_on_toy_sd(tmp_path, photos):
    paths, prompts = photos
    args = ["morph", "--model", "toy-sd", "--image", paths[0], "--image", paths[1], "--prompt", prompts[0]]
    args += ["--prompt", prompts[1], "--frames", "5", "--steps", "10", "--lora-steps", "40", "--device", "cpu"]
    out = tmp_path / "m.png"
    r = runner.invoke(app, [str(a) for a in [*args, "--out", out]])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "m" / "morph.json").read_text())
    assert Image.open(out).size[0] > 5 * 32 and len(list((tmp_path / "m").glob("frame_*.png"))) == 5
    gif = Image.open(tmp_path / "m.gif")
    assert gif.n_frames == 8  # there and back
    assert min(summary["end_psnr_db"]) > END_PSNR, summary
    assert summary["alphas"][0] == 0 and summary["alphas"][-1] == 1
    assert summary["alphas"] == sorted(summary["alphas"])
    r = runner.invoke(app, [str(a) for a in [*args, "--out", out]])
    assert r.exit_code == 0 and r.output.count("reused") == 2, r.output
    lora = tmp_path / "m" / "lora_0.safetensors"  # a LoRA of another model is refused
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(lora)), str(lora), metadata={"model": "0" * 64})
    r = runner.invoke(app, [str(a) for a in [*args, "--out", out]])
    assert r.exit_code != 0 and "is a LoRA for another model" in r.output, r.output


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype", [("sd1", "float32"), ("sd2", "bfloat16"), ("sdxl", "float32")])
def test_hspace_morph_on_the_sd_test_shapes(tmp_path, kind, dtype):
    """The same command on the SD test shapes (random weights in the real folder format; SD 2.x:
    v-prediction, in bfloat16; SDXL: its added text embeddings in the LoRA fit and the frames)."""
    from tests.sd_fixtures import IMAGE_SIZE, save_tiny_sd

    folder = save_tiny_sd(tmp_path / kind, kind)
    paths = []
    for i in range(2):
        rgb = np.random.default_rng(i).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb).save(paths[-1])
    args = ["morph", "--model", folder, "--image", paths[0], "--image", paths[1], "--prompt", "a blue dog"]
    args += ["--frames", "3", "--steps", "4", "--lora-steps", "3", "--dtype", dtype, "--device", "cpu"]
    r = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "m.png"]])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "m" / "morph.json").read_text())
    assert len(summary["alphas"]) == 3 and len(summary["end_psnr_db"]) == 2
    assert sorted(p.name for p in (tmp_path / "m").glob("lora_*")) == ["lora_0.safetensors", "lora_1.safetensors"]


END_PSNR = 18.0  # dB: the end frames of a toy-sd morph against its inputs (LoRA, inversion refined 3 times)


def test_hspace_morph_refuses_bad_input(tmp_path, photos):
    paths, _ = photos
    small = tmp_path / "small.png"
    Image.open(paths[1]).resize((24, 24)).save(small)
    cases = [
        (["--model", "toy-sd", "--image", paths[0], "--image", small], "crop or resize them to one size first"),
        (["--model", "toy-sd", "--image", paths[0]], "a morph takes exactly two --image, got 1"),
        (["--model", "toy", "--image", paths[0], "--image", paths[1]], "toy is a pixel model"),
        (["--model", "toy-sd", "--image", paths[0], "--image", paths[1], "--frames", "2"], "at least 3"),
    ]
    for args, message in cases:
        r = runner.invoke(app, [str(a) for a in ["morph", *args, "--out", tmp_path / "x.png"]])
        assert r.exit_code != 0 and message in r.output, (args, r.output)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_hspace_morph_of_two_samples_of_a_run(prefect_server, tmp_path):
    """`hspace morph RUN --sample 0 --sample 1`: the two samples replayed (with their own prompts)
    are the inputs; the end frames come back near them."""
    run = tmp_path / "run"
    r = runner.invoke(app, [str(a) for a in ["sample", "--model", "toy-sd", "--n", "2", "--steps", "6", "--prompt",
                                             "a person", "--out", run, "--device", "cpu"]])  # fmt: skip
    assert r.exit_code == 0, r.output
    args = ["morph", run, "--sample", "0", "--sample", "1", "--frames", "3", "--steps", "6", "--lora-steps", "5"]
    r = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "m.png", "--device", "cpu"]])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "m" / "morph.json").read_text())
    assert len(summary["alphas"]) == 3 and min(summary["end_psnr_db"]) > 15, summary
    bad = ["morph", run, "--sample", "0", "--sample", "5", "--out", tmp_path / "x.png"]
    r = runner.invoke(app, [str(a) for a in bad])
    assert r.exit_code != 0 and "--sample must be indices in [0, 2)" in r.output, r.output
