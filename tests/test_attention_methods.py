"""Prompt-to-Prompt and Plug-and-Play (hcore/edits/p2p.py, pnp.py) against an independent
reference: the source generated alone with processors written here (softmax(q k^T * scale),
no diffusers helper) that record its attention maps and features per step, then the target
generated alone with them played back; the methods do it in one batch [sources; edits]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hspace
from hspace.data import models
from hspace.hcore.edits import get
from hspace.hcore.edits.attention import token_map
from hspace.hcore.generator import Replay

STEPS = 6


@pytest.fixture(scope="module")
def toy_sd():
    ref = models.resolve("toy-sd")
    unet, sched = models.load_checked(ref, "cpu", torch.float32, clip_sample=False)
    return unet, sched, lambda prompt: models.text_setup(ref, [prompt], guidance_scale=4.0, image_size=32)


class Reference:
    """Processors that record (``play`` None) or play back the attention probabilities of the
    conditional row (``rows``: which rows of the [uncond; cond] batch take the recording)."""

    def __init__(self, store: dict, play: dict | None, rows: tuple[int, ...], name: str, counter: list):
        self.store, self.play, self.rows, self.name, self.counter = store, play, rows, name, counter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
        p = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        key = (self.name, self.counter[0])
        if self.play is None:
            self.store[key] = p.clone()
        elif key in self.play:
            p = p.clone()
            for r in self.rows:
                p[r] = self.play[key][r]
        out = (p @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def reference(unet, sched, text_src, text_tgt, keep, rows, features=(), feature_until=0):
    """Source alone (recording), then target alone (playing back what ``keep(name, step, p)``
    keeps, and the features of ``features`` before step ``feature_until``)."""
    counter = [-1]
    originals = dict(unet.attn_processors)
    hook = unet.register_forward_pre_hook(lambda m, a: counter.__setitem__(0, counter[0] + 1))
    store, feats = {}, {}

    def record(name):
        return lambda m, a, out: feats.__setitem__((name, counter[0]), out.clone())

    def play(name):
        return lambda m, a, out: feats[(name, counter[0])] if counter[0] < feature_until else None

    try:
        unet.set_attn_processor({k: Reference(store, None, rows, k, counter) for k in originals})
        handles = [unet.get_submodule(f).register_forward_hook(record(f)) for f in features]
        src = Replay(0, STEPS, 1.0).with_text(text_src).render(unet, sched, [0])
        for h in handles:
            h.remove()
        kept = {key: p for key, p in store.items() if keep(key[0], key[1], p)}
        counter[0] = -1
        unet.set_attn_processor({k: Reference(store, kept, rows, k, counter) for k in originals})
        handles = [unet.get_submodule(f).register_forward_hook(play(f)) for f in features]
        tgt = Replay(0, STEPS, 1.0).with_text(text_tgt).render(unet, sched, [0])
        for h in handles:
            h.remove()
    finally:
        hook.remove()
        unet.set_attn_processor(originals)
    return src, tgt


def test_prompt_to_prompt_word_swap_is_the_two_pass_reference(toy_sd):
    unet, sched, text = toy_sd
    source, target = "a serious person", "a smiling person"
    p2p = get("p2p")(text(source).tokenizers[0], target)
    assert p2p.needs == ("prompt_pair",) and p2p.acts_on == "attention" and "Hertz" in p2p.reference
    rep = Replay(0, STEPS, 1.0).with_text(text(source))
    plain = Replay(0, STEPS, 1.0).with_text(text(target)).render(unet, sched, [0])
    torch.testing.assert_close(rep.render(unet, sched, [0], edit=p2p.action(0.0)), plain, rtol=0, atol=2e-5)
    tau = 2 / 3  # cross maps in steps 0-3, self maps in steps 0-1

    def keep(name, step, p):
        cross = name.endswith("attn2.processor")
        return step < int(tau * STEPS + 1e-9) if cross else step < int(tau / 2 * STEPS + 1e-9)

    src, ref = reference(unet, sched, text(source), text(target), keep, rows=(1,))
    got = rep.render(unet, sched, [0], edit=p2p.action(tau))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the injection did something
    same = get("p2p")(text(source).tokenizers[0], source)  # full injection, the same prompt: the source
    torch.testing.assert_close(rep.render(unet, sched, [0], edit=same.action(1.0)), src, rtol=0, atol=1e-4)


def test_plug_and_play_is_the_two_pass_reference(toy_sd):
    unet, sched, text = toy_sd
    pnp = get("pnp")("a smiling person", attention_share=0.5)
    rep = Replay(0, STEPS, 1.0).with_text(text("a person"))
    plain = Replay(0, STEPS, 1.0).with_text(text("a smiling person")).render(unet, sched, [0])
    torch.testing.assert_close(rep.render(unet, sched, [0], edit=pnp.action(0.0)), plain, rtol=0, atol=2e-5)

    def keep(name, step, p):  # decoder self-attention, the first tau_a = 0.5 * 2/3 of the steps
        return name.startswith("up_blocks.") and ".attn1." in name and step < 2

    _, ref = reference(
        unet, sched, text("a person"), text("a smiling person"), keep, rows=(0, 1),
        features=("up_blocks.1.resnets.1",), feature_until=4,
    )  # fmt: skip
    got = rep.render(unet, sched, [0], edit=pnp.action(2 / 3))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2


def test_refinement_alignment_and_reweighting(toy_sd):
    _, _, text = toy_sd
    tok = text("a person").tokenizers[0]
    src, tgt = tok("a person").input_ids, tok("a smiling person").input_ids
    assert len(tgt) == len(src) + 1
    index, alpha = token_map(tok, "a person", "a smiling person")
    # start, "a" from the source; "smiling" its own; "person", end from one place on; padding too
    assert index[:5].tolist() == [0, 1, 2, 2, 3] and alpha[:5].tolist() == [1, 1, 0, 1, 1]
    assert index[5:].tolist() == list(range(4, tok.model_max_length - 1)) and bool((alpha[5:] == 1).all())
    p2p = get("p2p")(tok, "a smiling person", reweight={"smiling": 3.0})
    index, alpha, scale = p2p.maps(["a person"])
    assert scale[0, 2] == 3.0 and float(scale.sum()) == tok.model_max_length + 2
    with pytest.raises(ValueError, match="word swap needs prompts of as many tokens"):
        get("p2p")(tok, "a smiling person", source="a person", mode="replace")
    with pytest.raises(ValueError, match="the word 'hat' is not in the prompt"):
        get("p2p")(tok, "a smiling person", reweight={"hat": 2.0})


def test_attention_methods_refuse_pixel_models_and_odd_batches(toy_sd):
    from diffusers import DDIMScheduler

    from tests.test_jacobian import attention_unet

    pixel = attention_unet()
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        Replay(0, 4).render(pixel, DDIMScheduler(), [0], edit=get("pnp")("a smiling person").action(0.5))
    unet, sched, text = toy_sd
    sched.set_timesteps(4)
    cond = text("a person").conditioning(["a person"]).cond.hidden_states
    with pytest.raises(ValueError, match=r"needs a batch of \[sources; edits\]"):
        with hspace.apply(unet, method=get("pnp")("x"), gamma=1.0, scheduler=sched, guided=False):
            unet(torch.zeros(1, 4, 8, 8), int(sched.timesteps[0]), encoder_hidden_states=cond)
    with pytest.raises(ValueError, match="p2p in a plain pipeline needs its source prompt"):
        p2p = get("p2p")(text("a").tokenizers[0], "a man")
        with hspace.apply(unet, method=p2p, gamma=1.0, scheduler=sched, guided=False):
            unet(torch.zeros(2, 4, 8, 8), int(sched.timesteps[0]), encoder_hidden_states=cond.expand(2, -1, -1))


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype", [("sd1", "float32"), ("sd2", "bfloat16"), ("sdxl", "float32")])
def test_attention_methods_on_sd_models(tmp_path, kind, dtype):
    """On the SD test shapes (SD 2.x: v-prediction in bfloat16; SDXL: its added embeddings):
    tau 0 is the plain target prompt, an injection changes it; on SD 1.x diffusers' own
    StableDiffusionPipeline called with prompt=[source, target] under hspace.apply gives the
    image the one-batch sampler gives (<= 2/255)."""
    import numpy as np
    from diffusers import DDIMScheduler

    from hspace.hcore.sampler import make_generators
    from tests.sd_fixtures import LATENT_SIZE, load_tiny_sd, save_tiny_sd

    folder = save_tiny_sd(tmp_path / kind, kind)
    ref = models.resolve(str(folder))
    unet, sched = models.load_checked(ref, "cpu", getattr(torch, dtype), clip_sample=False)
    size = models.image_size(ref, unet.config)
    text = lambda p: models.text_setup(ref, [p], guidance_scale=3.0, image_size=size)  # noqa: E731
    source, target = "a blue dog", "a red dog"
    tol = 2e-5 if dtype == "float32" else 2e-2
    plain = Replay(1, 4, 0.0).with_text(text(target)).render(unet, sched, [0])
    for method in (get("p2p")(text(source).tokenizers[0], target), get("pnp")(target)):
        rep = Replay(1, 4, 0.0).with_text(text(source))
        torch.testing.assert_close(rep.render(unet, sched, [0], edit=method.action(0.0)), plain, rtol=0, atol=tol)
        edited = rep.render(unet, sched, [0], edit=method.action(1.0))
        assert (edited - plain).abs().max() > 1e-3
        if kind != "sd1":
            continue
        pipe = load_tiny_sd(folder, kind)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        if method.name == "p2p":
            method = get("p2p")(pipe.tokenizer, target, source=source)
        x_T = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=make_generators(1, [0])[0])
        with hspace.apply(pipe, method=method, gamma=1.0):
            outs = [
                pipe(
                    [source, target], latents=x_T.repeat(2, 1, 1, 1), num_inference_steps=4, guidance_scale=3.0,
                    eta=0.0, output_type="np",
                ).images[1]
                for _ in range(2)
            ]  # fmt: skip
        np.testing.assert_array_equal(outs[0], outs[1])  # a second call in the block counts its steps anew
        out = outs[0]
        mine = ((edited[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().numpy()
        assert np.abs(np.round(out * 255) - mine).max() <= 2


def test_hspace_edit_with_a_target_prompt(tmp_path, toy_sd):
    """`hspace edit --model toy-sd --edit-method pnp --target-prompt T --scales 0,1`: the tau 0
    cell is the sample under T, the tau 1 cell the sample itself (toy-sd's up_blocks.1.resnets.1
    is its last decoder layer but one: injected at every step, it brings the source back)."""
    from PIL import Image
    from typer.testing import CliRunner

    from hspace.flows.cli import app
    from hspace.hcore.sampler import to_uint8

    unet, sched, text = toy_sd
    args = ["edit", "--model", "toy-sd", "--seed", "3", "--steps", "6", "--prompt", "a person", "--guidance-scale", "4"]
    how = ["--edit-method", "pnp", "--target-prompt", "a smiling person", "--scales", "0,1", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, *how, "--out", str(tmp_path / "pnp.png")])
    assert res.exit_code == 0, res.output
    cells = sorted((tmp_path / "pnp").glob("*.png"))
    assert len(cells) == 2
    got = [np.asarray(Image.open(c)).astype(int) for c in cells]  # gamma+0, gamma+1
    for prompt, image in (("a smiling person", got[0]), ("a person", got[1])):
        ref = to_uint8(Replay(3, 6, 1.0).with_text(text(prompt)).render(unet, sched, [0]))[0].permute(1, 2, 0)
        assert np.abs(ref.numpy().astype(int) - image).max() <= 1
    for given, message in (
        (args, "needs --target-prompt"),
        ([*args[:2], "toy", "--target-prompt", "x"], "edits toward a prompt: toy takes no text"),
    ):
        res = CliRunner().invoke(app, [*given, "--edit-method", "pnp", "--out", str(tmp_path / "x.png")])
        assert res.exit_code != 0 and message in res.output, res.output


@pytest.mark.slow
def test_hspace_edit_a_photo_with_plug_and_play(tmp_path, toy_sd):
    """`hspace edit --model toy-sd --image PHOTO --edit-method pnp --target-prompt T`: the photo
    inverted (edit-friendly DDPM), its replay carried beside the edit (x_T and the noise maps
    doubled for the source rows); a cell per strength, and the strengths differ."""
    from PIL import Image
    from typer.testing import CliRunner

    from hspace.flows.cli import app

    photo = tmp_path / "face.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo)
    args = ["edit", "--model", "toy-sd", "--image", photo, "--steps", "6", "--prompt", "a person"]
    args += ["--edit-method", "pnp", "--target-prompt", "a smiling person", "--scales", "0,1", "--device", "cpu"]
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--out", tmp_path / "photo.png"]])
    assert res.exit_code == 0, res.output
    cells = sorted((tmp_path / "photo").glob("face__pnp__*.png"))
    assert len(cells) == 2, sorted(p.name for p in (tmp_path / "photo").iterdir())
    grid = np.asarray(Image.open(tmp_path / "photo.png"))
    assert grid.shape[1] > 4 * 32
    full, none = (np.asarray(Image.open(c)).astype(int) for c in (cells[1], cells[0]))
    assert np.abs(full - none).mean() > 1.0
