"""The CLIP-trained editors (hcore/clip_guidance.py, hcore/clip_editors.py,
hcore/edits/clip_trained.py, `hspace clip-edits`): the directional loss is eq. (3) computed by
hand; DiffusionCLIP's mixed pass at gamma 1 is the fine-tuned model from t0 on and at gamma 0
the original; trained on the shipped toy model with toy-clip, each editor moves its attribute
on held-out seeds (the oracle), loads in `hspace edit`, and is refused on another model's run;
on the SD test shapes DiffusionCLIP and Asyrp train through the VAE decoder."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

import hspace
from hspace.data.catalog import RunError, RunFolder
from hspace.hcore.clip_editors import add_edit_lora, enable_lora, lora_layers, lora_weights, remove_lora
from hspace.hcore.clip_guidance import direction_loss
from hspace.hcore.edits.clip_trained import DiffusionCLIP, FineTuned
from hspace.hcore.generator import Replay
from hspace.hcore.sampler import ddim_scheduler
from tests.conftest import tiny_scheduler, tiny_unet
from tests.test_toy_pipeline import hspace as cli


def test_the_directional_loss_is_eq_3():
    gen = torch.Generator().manual_seed(0)
    a, b, t = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(8, generator=gen)
    di, dt = (a - b).numpy(), t.numpy()
    expected = 1 - di @ dt / (np.linalg.norm(di, axis=1) * np.linalg.norm(dt))
    np.testing.assert_allclose(direction_loss(a, b, t).numpy(), expected, rtol=1e-5)


def test_diffusionclip_mixes_the_fine_tuned_eps_from_t0_on():
    """gamma 0: the original model's render, exactly; gamma 1: the original up to t0, then the
    fine-tuned model (an independent copy with the LoRA enabled) from the same point and noise.
    The U-Net has no LoRA layer left afterwards."""
    unet, scheduler = tiny_unet(), tiny_scheduler()
    steps, k0 = 6, 2
    tuned = copy.deepcopy(unet)
    add_edit_lora(tuned, rank=2)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    edit = FineTuned(lora_weights(tuned), 2, int(sched.timesteps[k0]))
    replay = Replay(seed=3, steps=steps, eta=1.0)
    idx = [0, 1, 2]
    plain = replay.render(unet, scheduler, idx)
    method = DiffusionCLIP(edit)
    torch.testing.assert_close(replay.render(unet, scheduler, idx, edit=method.action(0.0)), plain, rtol=0, atol=1e-6)
    enable_lora(tuned, True)
    x_k0 = replay.render(unet, scheduler, idx, stop_before=k0)
    explicit = replay.render(tuned, scheduler, idx, x_T=x_k0, start_at=k0)
    mixed = replay.render(unet, scheduler, idx, edit=method.action(1.0))
    assert (mixed - plain).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(mixed, explicit, rtol=0, atol=1e-5)
    half = replay.render(unet, scheduler, idx, edit=method.action(torch.tensor([0.0, 1.0, 0.0])))
    torch.testing.assert_close(half[1], explicit[1], rtol=0, atol=1e-5)  # per-sample strengths
    torch.testing.assert_close(half[0], plain[0], rtol=0, atol=1e-6)
    assert not lora_layers(unet) and not hasattr(unet, "peft_config")
    remove_lora(tuned)
    assert not lora_layers(tuned)
    # inside diffusers' own DDIMPipeline through hspace.apply: the same image (<= 1/255)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    with hspace.apply(pipe, method=method, gamma=1.0):
        images = pipe(batch_size=1, generator=replay.generators([1])[0], num_inference_steps=steps, eta=1.0,
                      output_type="np").images  # fmt: skip
    ours = ((mixed[1].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    assert np.abs(images[0] - ours).max() <= 1 / 255 and not lora_layers(unet)


MARGIN = {"diffusionclip": 0.15, "asyrp-net": 0.15, "deltaspace": 0.15}  # oracle, at the sweep's best gamma


@pytest.fixture(scope="module")
def trained(prefect_server, tmp_path_factory):
    """The shipped toy model, 48 samples of 10 steps; clip-edits for Smiling on the first 32,
    scored on the last 16."""
    out = tmp_path_factory.mktemp("clip-edits") / "run"
    cli("sample", "--model", "toy", "--n", "48", "--steps", "10", "--batch-size", "48", "--device", "cpu",
           "--out", out)  # fmt: skip
    result = cli("clip-edits", out, "--samples", "32", "--held-out", "16", "--epochs", "2", "--device", "cpu")
    return out, result.output


@pytest.mark.slow
def test_each_clip_trained_editor_moves_its_attribute_on_held_out_seeds(trained, tmp_path):
    from hspace.data import directions as dirfile

    run, output = trained
    assert "clip-edits: done" in output and "trained: diffusionclip:Smiling (own change" in output
    fingerprint = RunFolder(run).read()["model"]["fingerprint"]
    for method, margin in MARGIN.items():
        path = run / "directions" / method / "Smiling.safetensors"
        cls, _, meta = dirfile.load_trained(path, fingerprint, 10)
        assert cls.name == method and meta["attribute"] == "Smiling" and meta["prompt_b"] == "A smiling person"
        sweep = json.loads(meta["gamma_sweep"])
        assert sweep["0"]["Smiling"] == 0
        best = max(v["Smiling"] for v in sweep.values())
        assert best >= margin, (method, sweep)
        assert path.with_suffix(".png").stat().st_size > 1000
    lora = run / "directions" / "diffusionclip" / "Smiling.safetensors"
    assert lora.stat().st_size < 1_000_000  # a LoRA, not a model copy
    # the edit command takes each by name with its file; cells at gamma 0 equal the plain sample
    out = tmp_path / "g.png"
    r = cli("edit", run, "--sample", "40", "--edit-method", f"asyrp-net:weights={run}/asyrp-net/Smiling",
               "--scales", "0,2", "--out", out)  # fmt: skip
    cells = sorted((tmp_path / "g").glob("*.png"))
    assert [c.name for c in cells] == ["sample40__asyrp-net__gamma+0.png", "sample40__asyrp-net__gamma+2.png"], r.output


@pytest.mark.slow
def test_compare_finds_the_trained_editors_of_an_attribute(trained):
    """`hspace compare` makes each trained editor of an attribute from its file; a made method
    renders the held-out samples as the stage's own sweep did (gamma 1: the same own change)."""
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.tasks.compare import findings

    run, _ = trained
    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta)
    replay = models.replay_for_run(meta)
    found = findings(RunFolder(run), meta, "Smiling", replay, unet, scheduler)
    assert {"diffusionclip", "asyrp-net", "deltaspace"} <= set(found)
    assert "avi" not in found and not findings(RunFolder(run), meta, "Male", replay, unet, scheduler)
    held = list(range(32, 48))
    oracle = load_annotator("oracle")
    col = oracle.names.index("Smiling")
    base = oracle.score(replay.render(unet, scheduler, held)).numpy()[:, col]
    edited = replay.render(unet, scheduler, held, edit=found["diffusionclip"](held).action(1.0))
    sweep = json.loads(dirfile_meta(run / "directions" / "diffusionclip" / "Smiling.safetensors")["gamma_sweep"])
    assert abs((oracle.score(edited).numpy()[:, col] - base).mean() - sweep["1"]["Smiling"]) < 1e-4


def dirfile_meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


@pytest.mark.slow
def test_clip_edits_bad_input_is_one_line_before_any_work(trained, tmp_path):
    from typer.testing import CliRunner

    from hspace.data import directions as dirfile
    from hspace.flows.cli import app

    run, _ = trained
    lora = run / "directions" / "diffusionclip" / "Smiling.safetensors"
    with pytest.raises(RunError, match="were trained on model toy .*not this one"):
        dirfile.load_trained(lora, "0" * 64, 10)
    with pytest.raises(RunError, match="trained for 10 sampling steps, not 20"):
        dirfile.load_trained(lora, None, 20)
    before = sorted(p.name for p in (run / "directions").rglob("*"))
    cfg = tmp_path / "bad.yaml"  # prompt pairs are YAML: a whole run refused by its config check
    cfg.write_text("sample: {model: toy, n: 48, steps: 10}\nclip_edits:\n  prompt_pairs:\n"
                   "    Beard: [A person, A bearded person]\n")  # fmt: skip
    r = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "new")])
    assert r.exit_code != 0 and "unknown in the prompts: bearded" in r.output, r.output
    assert not (tmp_path / "new").exists()
    r = CliRunner().invoke(app, ["clip-edits", str(run), "--methods", "nope", "--device", "cpu"])
    assert r.exit_code != 0 and "clip_edits.methods: nope" in r.output, r.output
    r = CliRunner().invoke(app, ["clip-edits", str(run), "--samples", "40", "--device", "cpu"])
    assert r.exit_code != 0 and "exceed the run's 48 samples" in r.output, r.output
    assert sorted(p.name for p in (run / "directions").rglob("*")) == before


@pytest.mark.parametrize("kind,dtype", [("sd1", "float32"), ("sd2", "bfloat16")])
def test_diffusionclip_and_asyrp_train_through_a_latent_models_vae(tmp_path, clip_dir, kind, dtype):
    """The SD test shapes under guidance (SD 2.x: v-prediction in bfloat16): DiffusionCLIP's
    LoRA and Asyrp's f train with the losses on the VAE-decoded P_t (a decoder outside the
    graph would leave nothing to differentiate: backward raises); the fine-tuned edit at gamma
    1 is the fine-tuned copy's render from the same x_{t0} with the same prompt and guidance."""
    from hspace.data import models
    from hspace.data.annotators import load_clip_guide
    from hspace.hcore import clip_editors as ce
    from tests.sd_fixtures import LATENT_SIZE, save_tiny_sd

    ref = models.resolve(str(save_tiny_sd(tmp_path / kind, kind)))
    unet, scheduler = models.load_checked(ref, "cpu", getattr(torch, dtype), clip_sample=False)
    size = models.image_size(ref, unet.config)
    text = models.text_setup(ref, ["a blue dog", "a red cat"], guidance_scale=3.0, image_size=size)
    guide = load_clip_guide(str(clip_dir), "cpu")
    replay, steps, k0, idx = Replay(5, 4, 0.0).with_text(text), 4, 2, [0, 1, 2]
    space = ce.Space(text, text.prompts_for(idx))
    x_start = replay.render(unet, scheduler, idx, stop_before=k0)
    assert x_start.shape == (3, 4, LATENT_SIZE, LATENT_SIZE)
    x_ref = replay.render(unet, scheduler, idx)
    delta = guide.text_delta("a dog", "a cat")
    add_edit_lora(unet, rank=2)
    history = ce.train_diffusionclip(unet, scheduler, guide, x_start, x_ref, steps, k0, delta, epochs=1, lr=1e-2,
                                     batch_size=2, space=space)  # fmt: skip
    assert np.isfinite(history[0]["direction"]) and history[0]["l1"] > 0
    weights = lora_weights(unet)
    assert max(w.abs().max().item() for n, w in weights.items() if "lora_B" in n) > 0  # it trained
    tuned = copy.deepcopy(unet)
    enable_lora(tuned, True)
    remove_lora(unet)
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    method = DiffusionCLIP(FineTuned(weights, 2, int(sched.timesteps[k0])))
    mixed = replay.render(unet, scheduler, idx, edit=method.action(1.0))
    explicit = replay.render(tuned, scheduler, idx, x_T=x_start, start_at=k0)
    torch.testing.assert_close(mixed, explicit, rtol=0, atol=2e-2 if dtype == "bfloat16" else 1e-4)
    assert (mixed - x_ref).abs().max() > 1e-3 and not lora_layers(unet)
    with pytest.raises(ValueError, match="needs the training samples' prompts"):
        ce.Space(text)
    f = ce.DeltaNet(unet.config.block_out_channels[-1], steps)
    x_T = replay.x_T(idx, (4, LATENT_SIZE, LATENT_SIZE))
    history = ce.train_asyrp(f, unet, scheduler, guide, x_T, steps, 2, delta, epochs=1, lr=1e-2, batch_size=3,
                             space=space)  # fmt: skip
    assert np.isfinite(history[0]["direction"]) and f.out.weight.abs().max() > 0


def test_a_bad_section_is_refused_by_the_config_check():
    from hspace.tasks.clip_edits import config_problems
    from hspace.tasks.config import RunConfig

    cfg = RunConfig.model_validate({"sample": {"model": "toy-sd", "n": 64}, "clip_edits": {"clip": "toy-clip"}})
    assert config_problems(cfg, "latent") == []  # a latent model trains through its VAE
    cfg = RunConfig.model_validate({"sample": {"n": 40}, "clip_edits": {"methods": ["nope"], "prompt_pairs": {}}})
    found = config_problems(cfg, "pixel")
    assert any("clip_edits.methods: nope" in p for p in found) and any("prompt_pairs: give" in p for p in found)
    assert any("samples 32 + held_out 16 exceed the run's 40 samples" in p for p in found)
    assert config_problems(RunConfig.model_validate({"sample": {"n": 64}}), "pixel") == []  # no section
