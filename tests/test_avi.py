"""Attribute Vector Integration (hcore/avi.py, hcore/edits/avi.py, `hspace avi`): the attribute
vectors and the losses against numpy by hand, the method against the explicit intervention (the
sampler stopped before org_step, y_pred computed by hand, resumed) on toy-sd and the SD test
shapes, inside diffusers' StableDiffusionPipeline; the stage on a toy-sd run: the predictor
reloads and is checked on load, and on held-out seeds the edit moves its own attribute (oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hspace
from hspace.data import models
from hspace.data.catalog import RunError, RunFolder
from hspace.hcore import avi
from hspace.hcore.edits import get
from hspace.hcore.generator import Replay
from hspace.hcore.sampler import make_generators

runner = CliRunner()


def hspace_cli(*args):
    from hspace.flows.cli import app

    return runner.invoke(app, [str(a) for a in args])


def spec(channels=4, side=8, k=3, steps=6, org=2, tar=3):
    return avi.AviSpec(channels, side, k, steps, org, tar, "a serious person", "a smiling person", side * side)


def by_hand(f, x_org, x_tar, alpha):
    """y_pred with numpy's SVD: per channel [U_o, alpha flip(U_t)] diag(sigma) [Vh_o; flip(Vh_t)]."""
    k = f.spec.k
    sigma, _ = f(x_org.float())
    out = np.zeros(x_org.shape)
    for b in range(x_org.shape[0]):
        for c in range(x_org.shape[1]):
            uo, _, vho = np.linalg.svd(x_org[b, c].double().numpy())
            ut, _, vht = np.linalg.svd(x_tar[b if len(x_tar) > 1 else 0, c].double().numpy())
            s = sigma[b, c].detach().double().numpy()
            out[b, c] = (
                uo[:, :k] @ np.diag(s[:k]) @ vho[:k] + alpha * ut[:, :k][:, ::-1] @ np.diag(s[k:]) @ vht[:k][::-1]
            )
    return out


def test_attribute_vectors_losses_and_integration_by_hand():
    torch.manual_seed(0)
    f = avi.Predictor(spec())
    x_org, x_tar = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    u, vh = avi.attribute_vectors(x_org, x_tar, 3)
    nuo, _, nvho = np.linalg.svd(x_org.double().numpy())
    nut, _, nvht = np.linalg.svd(x_tar.double().numpy())
    want_u = np.concatenate([nuo[..., :3], nut[..., :3][..., ::-1]], -1)
    want_vh = np.concatenate([nvho[..., :3, :], nvht[..., :3, :][..., ::-1, :]], -2)
    # singular vectors up to a sign per pair: the products u_i vh_i agree
    np.testing.assert_allclose(
        np.einsum("...ni,...im->...inm", u.numpy(), vh.numpy()),
        np.einsum("...ni,...im->...inm", want_u, want_vh),
        atol=1e-5,
    )
    for alpha in (1.0, 0.0, 2.5):
        got = avi.integrate(f, x_org, x_tar, alpha)
        np.testing.assert_allclose(got.numpy(), by_hand(f, x_org, x_tar, alpha), atol=1e-4)
    # the four terms by hand on the channels
    org, tar = x_org.flatten(0, 1), x_tar.flatten(0, 1)
    terms = avi.losses(f, org, tar)
    sigma, delta = (t.detach().double().numpy() for t in f(org))
    uu, vv = u.flatten(0, 1).double().numpy(), vh.flatten(0, 1).double().numpy()
    y = np.einsum("nhi,ni,niw->nhw", uu, sigma, vv)
    y_tar = y + np.einsum("nhi,ni,niw->nhw", uu[..., ::-1], delta, vv[:, ::-1])
    s_o, s_t = (
        np.linalg.svd(org.double().numpy(), compute_uv=False),
        np.linalg.svd(tar.double().numpy(), compute_uv=False),
    )
    sq = lambda a: float((a**2).reshape(len(a), -1).sum(1).mean())  # noqa: E731
    want = {"target": sq(y_tar - tar.numpy()), "source": sq(y - org.numpy())}
    want |= {"target_values": sq(sigma[:, ::-1] + delta - s_t[:, :6]), "source_values": sq(sigma - s_o[:, :6])}
    for name, value in want.items():
        assert abs(float(terms[name].detach()) - value) < 1e-3 * max(1.0, value), name
    history = avi.train(f, x_org, x_tar, epochs=3, batch_size=4)
    assert len(history) == 3 and history[-1]["source"] < history[0]["source"] * 1.5
    for bad, message in ((spec(k=5), "2k = 10 singular vectors"), (spec(org=3, tar=3), "org_step < tar_step")):
        with pytest.raises(ValueError, match=message):
            avi.Predictor(bad)


@pytest.fixture(scope="module")
def toy_sd():
    ref = models.resolve("toy-sd")
    unet, sched = models.load_checked(ref, "cpu", torch.float32, clip_sample=False)
    return unet, sched, lambda prompt: models.text_setup(ref, [prompt], guidance_scale=4.0, image_size=32)


def test_avi_method_is_the_explicit_intervention(toy_sd):
    """From its replay the method renders x_tar under B up to tar_step; in the sampler it replaces
    x at org_step by y_pred: the same as stopping there, integrating by hand and resuming."""
    unet, sched, text = toy_sd
    torch.manual_seed(1)
    f = avi.Predictor(spec(steps=6, org=2, tar=4))
    replay = Replay(3, 6, 1.0).with_text(text("a person"))
    method = get("avi").from_replay(replay, unet, sched, [0, 1], f)
    x_tar = replay.render(unet, sched, [0, 1], prompts=["a smiling person"] * 2, stop_before=4)
    torch.testing.assert_close(method.x_tar, x_tar)
    got = replay.render(unet, sched, [0, 1], edit=method.action(torch.tensor([1.0, 2.0])))
    x_org = replay.render(unet, sched, [0, 1], stop_before=2)
    y = torch.stack(
        [torch.from_numpy(by_hand(f, x_org[b : b + 1], x_tar[b : b + 1], a)[0]) for b, a in ((0, 1.0), (1, 2.0))]
    )
    resumed = replay.render(unet, sched, [0, 1], x_T=y.float(), start_at=2)
    torch.testing.assert_close(got, resumed, rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="trained for 6 steps, the sampler runs 5"):
        Replay(3, 5, 1.0).with_text(text("a person")).render(unet, sched, [0], edit=method.action(1.0))
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        get("avi").from_replay(Replay(3, 6, 1.0), unet, sched, [0], f)


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype", [("sd1", "float32"), ("sd2", "bfloat16"), ("sdxl", "float32")])
def test_avi_on_sd_shapes(tmp_path, kind, dtype):
    """The SD test shapes (SD 2.x: v-prediction in bfloat16): AVI and singular-value scaling
    against the explicit intervention; AVI in diffusers' own StableDiffusionPipeline (SD 1.x)
    through hspace.apply (<= 2/255)."""
    from diffusers import DDIMScheduler

    from tests.sd_fixtures import LATENT_SIZE, load_tiny_sd, save_tiny_sd

    folder = save_tiny_sd(tmp_path / kind, kind)
    ref = models.resolve(str(folder))
    unet, scheduler = models.load_checked(ref, "cpu", getattr(torch, dtype), clip_sample=False)
    size = models.image_size(ref, unet.config)
    text = models.text_setup(ref, ["a blue dog"], guidance_scale=3.0, image_size=size)
    torch.manual_seed(2)
    f = avi.Predictor(avi.AviSpec(4, LATENT_SIZE, 2, 5, 1, 3, "a blue dog", "a red cat", 32))
    replay = Replay(4, 5, 0.0).with_text(text)
    method = get("avi").from_replay(replay, unet, scheduler, [0], f)
    got = replay.render(unet, scheduler, [0], edit=method.action(1.5))
    y = torch.from_numpy(by_hand(f, replay.render(unet, scheduler, [0], stop_before=1), method.x_tar, 1.5)).float()
    resumed = replay.render(unet, scheduler, [0], x_T=y, start_at=1)
    torch.testing.assert_close(got, resumed, rtol=0, atol=2e-3 if dtype == "bfloat16" else 2e-4)
    assert (got - replay.render(unet, scheduler, [0])).abs().mean() > 1e-3
    from hspace.hcore.edits import make  # singular-value scaling on the same shapes, the explicit restart too
    from hspace.hcore.latent_svd import scale_singular_values

    scaled = replay.render(unet, scheduler, [0], edit=make("sv-scale:index=0:step=2").action(0.5))
    start = scale_singular_values(replay.render(unet, scheduler, [0], stop_before=2), 0, 1.5)
    restart = replay.render(unet, scheduler, [0], x_T=start, start_at=2)
    torch.testing.assert_close(scaled, restart, rtol=0, atol=2e-3 if dtype == "bfloat16" else 2e-4)
    if kind != "sd1":
        return
    pipe = load_tiny_sd(folder, kind)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    latents = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=make_generators(4, [0])[0])
    with hspace.apply(pipe, method=method, gamma=1.5):
        out = pipe("a blue dog", latents=latents, num_inference_steps=5, guidance_scale=3.0, eta=0.0,
                   generator=make_generators(4, [0]), output_type="np").images[0]  # fmt: skip
    mine = ((got[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().numpy()
    assert np.abs(np.round(out * 255) - mine).max() <= 2


@pytest.fixture(scope="module")
def trained(prefect_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("avi") / "run"
    how = ("--steps", "10", "--guidance-scale", "4", "--prompt", "a person", "--batch-size", "128", "--device", "cpu")
    r = hspace_cli("sample", "--model", "toy-sd", "--n", "256", *how[:-2], "--out", run, "--device", "cpu")
    assert r.exit_code == 0, r.output
    pair = ("--prompt-pair", "a person without glasses", "a person wearing glasses")
    r = hspace_cli("avi", run, *pair, "--name", "Eyeglasses", "--held-out", "32", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "avi Eyeglasses: alpha 1 on 32 held-out samples moves it by" in r.output
    return run


@pytest.mark.slow
def test_hspace_avi_trains_a_predictor_that_moves_its_attribute(trained):
    """The predictor file reloads with its spec and provenance and is refused for another model
    or number of steps; on the 32 held-out seeds it never saw, alpha 3 raises Eyeglasses (the
    oracle) by at least 0.1 and by more than three times the mean change of the other attributes."""
    from hspace.data.annotators import load_annotator
    from hspace.data.directions import load_predictor, predictor_file

    run = RunFolder(trained)
    path = predictor_file(run, "Eyeglasses")
    meta = run.read()
    f, info = load_predictor(path, meta["model"]["fingerprint"], 10)
    assert (f.spec.k, f.spec.org_step, f.spec.tar_step, f.spec.prompt_b) == (4, 3, 4, "a person wearing glasses")
    assert json.loads(info["held_out"]) == [224, 256] and info["attribute"] == "Eyeglasses"
    sweep = json.loads(info["alpha_sweep"])  # the paper's Fig. 7: the held-out change across alpha, and its picture
    assert list(sweep) == ["0", "1", "2", "4", "8"] and sweep["8"]["Eyeglasses"] > sweep["1"]["Eyeglasses"]
    from PIL import Image

    assert Image.open(path.with_suffix(".png")).size[0] > 6 * 64
    from hspace.tasks.report import write_report

    assert "id='avi'" in write_report(run).read_text()  # the report shows the sweep
    with pytest.raises(RunError, match="was trained on model toy-sd"):
        load_predictor(path, "0" * 64, 10)
    with pytest.raises(RunError, match="trained for 10 sampling steps, not 20"):
        load_predictor(str(trained / "Eyeglasses"), None, 20)  # RUN/NAME finds directions/avi/NAME
    unet, scheduler = models.load_for_run(meta)
    replay = models.replay_for_run(meta, device="cpu")
    net = load_annotator("oracle")
    held = list(range(224, 256))
    edit = get("avi").from_replay(replay, unet, scheduler, held, f).action(3.0)
    change = net.score(replay.render(unet, scheduler, held, edit=edit)) - net.score(
        replay.render(unet, scheduler, held)
    )
    change = dict(zip(net.names, change.mean(0).tolist(), strict=True))
    others = [abs(v) for k, v in change.items() if k not in ("Eyeglasses", "yaw", "pitch", "roll")]
    assert change["Eyeglasses"] >= 0.1 and change["Eyeglasses"] > 3 * np.mean(others), change


@pytest.mark.slow
def test_avi_by_name_in_edit_and_table_1(trained, tmp_path):
    run = RunFolder(trained)
    spec_ = f"avi:predictor={trained}/Eyeglasses"
    r = hspace_cli(
        "edit", trained, "--sample", "230", "--edit-method", spec_, "--scales", "0,4", "--out", tmp_path / "g.png"
    )
    assert r.exit_code == 0, r.output
    cells = sorted((tmp_path / "g").glob("*.png"))
    assert [c.name for c in cells] == ["sample230__avi__gamma+0.png", "sample230__avi__gamma+4.png"]
    r = hspace_cli("edit", trained, "--sample", "100", "--edit-method", "avi", "--out", tmp_path / "x.png")
    assert r.exit_code != 0 and "name its file, avi:predictor=PATH" in r.output
    r = hspace_cli(
        "edit", trained, "--sample", "1", "--edit-method", "avi:predictor=/nope", "--out", tmp_path / "x.png"
    )
    assert r.exit_code != 0 and "is not an AVI predictor file" in r.output
    from hspace.tasks.evaluate import run_evaluation  # Table 1 with the method as its only row

    run_evaluation(str(trained), [], methods=[spec_], n=8, gamma=4.0, evaluator="oracle", log=lambda line: None)
    summary = json.loads((run.eval / "summary.json").read_text())
    assert summary["directions"] == ["avi:Eyeglasses"]
    table = (run.eval / "leakage_original.csv").read_text().splitlines()
    assert table[1].startswith("Eyeglasses,")


@pytest.mark.slow
def test_bad_avi_input_is_refused_before_any_work(prefect_server, tmp_path):
    """A pixel model, steps that do not leave x_tar after x_org, a photo: one line each, nothing written."""
    run = tmp_path / "toy"
    r = hspace_cli("sample", "--model", "toy", "--n", "4", "--steps", "3", "--out", run, "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = hspace_cli("avi", run, "--prompt-pair", "a", "b", "--held-out", "1", "--device", "cpu")
    assert r.exit_code != 0 and "takes no text (a pixel model)" in r.output, r.output
    assert not (RunFolder(run).directions / "avi").exists()
    from hspace.tasks.check import config_problems
    from hspace.tasks.config import RunConfig

    cfg = RunConfig.model_validate({"sample": {"model": "toy-sd", "steps": 2, "prompt": "a"},
                                    "avi": {"prompt_pairs": {"Smiling": ["a", "b"]}}})  # fmt: skip
    problems, _ = config_problems(cfg)
    assert any("give steps 1 and 1 of 2: x_tar must come later" in p for p in problems), problems
    cfg = RunConfig.model_validate({"sample": {"model": "toy"}, "avi": {"prompt_pair": ["a", "b"]}})
    assert any("avi: a prompt pair needs a text-conditioned model" in p for p in config_problems(cfg)[0])
    r = hspace_cli(
        "edit", "--model", "toy-sd", "--image", run, "--edit-method", "avi:predictor=x", "--out", tmp_path / "p.png"
    )
    assert r.exit_code != 0 and "on a photo is not offered yet" in r.output, r.output
