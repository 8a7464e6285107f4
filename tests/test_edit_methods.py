"""The editing-method contract (hcore/edits): a method defined here, in a few lines, runs
through `hspace edit`, `hspace.apply` in diffusers' own DDIMPipeline, and the evaluate
stage's Table 1, with no other file changed; and the built-in methods (h, asyrp, xT) are
registered with what they need, their strength's unit and where they act."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from PIL import Image

import hspace
from hspace.data import models
from hspace.data.catalog import RunFolder
from hspace.hcore import edits
from hspace.hcore.edits import Action, EditMethod, register
from hspace.hcore.generator import generate
from hspace.hcore.sampler import make_generators, to_uint8
from tests.test_toy_pipeline import hspace as ok  # runs a command, asserts exit 0

STEPS, STEP = 10, 3


class AddAtStep(Action):
    """x_t + c at one step (c per sample)."""

    def __init__(self, step: int, c):
        self.step, self.c = step, c

    def x_t(self, step, x):
        if step != self.step:
            return x
        return x + torch.as_tensor(self.c, dtype=x.dtype).reshape(-1, 1, 1, 1).to(x.device)


@register
class ShiftXt(EditMethod):
    name = "test-shift-xt"
    strength, unit, acts_on = "c", "added to every entry of x_t", "x_t"
    reference = "a test: add a constant to x_t at one step"

    def action(self, strength):
        return AddAtStep(STEP, strength)


@pytest.fixture(scope="module")
def toy(prefect_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("methods") / "run"
    ok("sample", "--model", "toy", "--n", 12, "--steps", STEPS, "--batch-size", 12, "--device", "cpu", "--out", run)
    ok("annotate", run, "--device", "cpu")
    ok("directions", run, "--attribute", "Smiling", "--top", 2, "--held-out", 4)
    return run


def replay(run, index: int, action=None) -> np.ndarray:
    meta = RunFolder(run).read()
    cfg = meta["config"]
    unet, scheduler = models.load_for_run(meta)
    gens = make_generators(cfg["seed"], [index])
    x0 = generate(unet, scheduler, gens, cfg["steps"], cfg["eta"], indices=[index], edit=action)
    return to_uint8(x0)[0].numpy()


def test_the_builtin_methods_say_what_they_need_and_do():
    known = edits.methods()
    assert {"h", "asyrp", "xT", "test-shift-xt"} <= set(known)
    assert known["h"].needs == ("direction",) and known["h"].acts_on == "h" and "eq. (6)" in known["h"].reference
    assert known["asyrp"].acts_on == "h" and known["xT"].acts_on == "x_T"
    with pytest.raises(ValueError, match="no editing method 'nope'; registered: .*asyrp"):
        edits.get("nope")


def test_method_settings_ride_on_the_name_and_values_may_hold_colons():
    assert edits.split_spec("sv-scale:index=1:step=2.5") == ("sv-scale", {"index": 1, "step": 2.5})
    assert edits.split_spec("avi:predictor=C:/runs/a:b/Eyeglasses:hidden=64") == (
        "avi",
        {"predictor": "C:/runs/a:b/Eyeglasses", "hidden": 64},
    )
    with pytest.raises(ValueError, match="settings are key=value, colon-separated; got 'index'"):
        edits.split_spec("sv-scale:index")


@pytest.mark.slow
def test_the_sampler_applies_an_x_t_action_as_an_explicit_restart_would(toy):
    """Independent reference: stop before step 3, add c, and restart there (the SDEdit path:
    the same generator, the steps before skipped): the action gives the same image."""
    meta = RunFolder(toy).read()
    cfg = meta["config"]
    unet, scheduler = models.load_for_run(meta)
    gens = lambda: make_generators(cfg["seed"], [4])  # noqa: E731
    x3 = generate(unet, scheduler, gens(), STEPS, cfg["eta"], indices=[4], stop_before=STEP)
    restarted = generate(unet, scheduler, gens(), STEPS, cfg["eta"], indices=[4], x_T=x3 + 0.7, start_at=STEP)
    acted = generate(unet, scheduler, gens(), STEPS, cfg["eta"], indices=[4], edit=ShiftXt().action(0.7))
    torch.testing.assert_close(acted, restarted, rtol=0, atol=1e-6)
    assert (acted - generate(unet, scheduler, gens(), STEPS, cfg["eta"], indices=[4])).abs().mean() > 1e-3


@pytest.mark.slow
def test_a_new_method_runs_through_edit_apply_and_table_1(toy, tmp_path):
    # `hspace edit`: a row of the grid, swept over --scales, no direction file
    grid = tmp_path / "grid.png"
    ok("edit", toy, "--sample", 5, "--edit-method", "test-shift-xt", "--scales", "0,0.5", "--out", grid)
    cell = lambda g: np.asarray(Image.open(tmp_path / "grid" / f"sample5__test-shift-xt__gamma{g}.png"))  # noqa: E731
    cells = {g: cell(g) for g in ("+0", "+0.5")}
    stored = RunFolder(toy)
    from hspace.data.stores import SampleStore

    x0 = SampleStore(stored.samples).x0[5].transpose(1, 2, 0)
    # strength 0 replays the sample (sampled in a batch of 12, the grid is one of 2: <= 1/255)
    assert np.abs(cells["+0"].astype(int) - x0).max() <= 1
    by_sampler = replay(toy, 5, ShiftXt().action(0.5)).transpose(1, 2, 0)  # a batch of 1, the grid one of 2
    assert np.abs(cells["+0.5"].astype(int) - by_sampler).max() <= 1
    assert np.abs(cells["+0.5"].astype(int) - x0).mean() > 1

    # hspace.apply: inside diffusers' own DDIMPipeline, the same image (<= 1/255, as directions)
    meta = stored.read()
    unet, scheduler = models.load_for_run(meta)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    gen = lambda: make_generators(meta["config"]["seed"], [5])[0]  # noqa: E731
    run_pipe = lambda: pipe(  # noqa: E731
        batch_size=1, generator=gen(), num_inference_steps=STEPS, eta=1.0, output_type="np"
    )
    hooks = (len(pipe.unet._forward_pre_hooks), pipe.scheduler.step)
    with hspace.apply(pipe, method="test-shift-xt", gamma=0.5):
        applied = (run_pipe().images[0] * 255).round().astype(np.uint8)
    assert np.abs(applied.astype(int) - cells["+0.5"]).max() <= 1
    assert (len(pipe.unet._forward_pre_hooks), pipe.scheduler.step) == hooks  # all gone after the block

    # Table 1: the evaluate stage scores the method beside the directions, on the held-out samples
    evaluate = {"directions": ["Smiling"], "methods": ["test-shift-xt"], "n": 4, "gamma": 0.5, "disentangled": False}
    result = hspace.run_stage("evaluate", toy, {"evaluate": evaluate}, device="cpu")
    summary = json.loads((toy / "eval" / "summary.json").read_text())
    assert summary["directions"] == ["Smiling", "test-shift-xt"]
    assert summary["original"]["gamma"] == {"Smiling": 0.5, "test-shift-xt": 0.5}
    table = (toy / "eval" / "leakage_original.csv").read_text().splitlines()
    assert table[1].startswith("Smiling,") and table[2].startswith("test-shift-xt,")
    # the row by hand: mean over the held-out samples of score(edited) - score(original), oracle
    from hspace.data.annotators import load_annotator

    net = load_annotator("oracle", "cpu")
    idx, cfg = list(range(8, 12)), meta["config"]  # the samples Smiling's direction did not rank
    render = lambda action: generate(  # noqa: E731
        unet, scheduler, make_generators(cfg["seed"], idx), STEPS, cfg["eta"], indices=idx, edit=action
    )
    by_hand = (net.score(render(ShiftXt().action(0.5))) - net.score(render(None))).mean(0)
    row = [float(x) for x in table[2].split(",")[1:]]
    np.testing.assert_allclose(row, by_hand.numpy(), rtol=0, atol=2e-6)
    assert np.abs(row).max() > 1e-3
    assert result["outputs"]


@pytest.mark.slow
def test_unknown_or_unfit_methods_are_refused_before_work(toy, tmp_path):
    from typer.testing import CliRunner

    from hspace.data.catalog import RunError
    from hspace.flows.cli import app
    from hspace.tasks.check import config_problems
    from hspace.tasks.config import RunConfig

    result = CliRunner().invoke(
        app, ["edit", str(toy), "--sample", "0", "--edit-method", "nope", "--out", str(tmp_path / "g.png")]
    )
    assert result.exit_code == 2 and "--edit-method: no editing method 'nope'; registered:" in result.output
    assert not (tmp_path / "g.png").exists()
    result = CliRunner().invoke(
        app, ["edit", str(toy), "--sample", "0", "--edit-method", "h", "--out", str(tmp_path / "g.png")]
    )
    assert result.exit_code == 2 and "give at least one --direction" in result.output
    problems, _ = config_problems(RunConfig.model_validate({"evaluate": {"methods": ["nope", "h"]}}), load=False)
    assert any("evaluate.methods: no editing method 'nope'" in p for p in problems), problems
    assert any("evaluate.methods: h is how evaluate.directions are scored" in p for p in problems), problems
    from hspace.tasks.evaluate import scored_methods

    none = dict.fromkeys(["replay", "unet", "scheduler", "source", "fingerprint"])
    with pytest.raises(RunError, match="evaluate.methods: sdedit needs a text-conditioned model"):
        scored_methods(["sdedit"], ["Smiling"], [(None, {"attribute": "Smiling"})], none)
    with pytest.raises(RunError, match="evaluate.methods: xT acts on x_T directions"):
        scored_methods(["xT"], [], [], none)
    with (
        pytest.raises(hspace.DirectionMismatch, match="no editing method 'nope'"),
        hspace.apply(
            DDIMPipeline(unet=models.load_for_run(RunFolder(toy).read())[0], scheduler=DDIMScheduler()), method="nope"
        ),
    ):
        pass
