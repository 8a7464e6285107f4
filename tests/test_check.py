"""The whole-config check and `hspace run --plan` (a config that cannot die late).

Each rule gets a config that breaks only it: `hspace run` must refuse it in seconds, with
one line naming the key, exit 2, and nothing written. A config with several problems lists
them all. The plan's disk figure is the issue's formula, and a finished run plans as cached."""

from __future__ import annotations

import time

import pytest
import yaml
from typer.testing import CliRunner

from hspace.flows.cli import app
from hspace.tasks.check import Facts, config_problems, make_plan
from hspace.tasks.config import RunConfig
from tests.test_cli import assert_refused

runner = CliRunner()


def hspace(*args):
    return runner.invoke(app, [str(a) for a in args])


def base(model_dir, oracle_dir) -> dict:
    """A config that fits: 40 samples, 10 held out (8 evaluated + 2 for gamma auto)."""
    return {
        "device": "cpu",
        "sample": {"model": str(model_dir), "n": 40, "steps": 5, "batch_size": 8},
        "annotate": {"annotators": [f"oracle:{oracle_dir}"]},
        "pca": {"components": 3},
        "directions": {"attributes": ["Smiling", "Male", "Young"], "top": 5, "held_out": 10},
        "disentangle": {"conditions": {"Smiling": ["Male"]}},
        "evaluate": {"evaluator": f"oracle:{oracle_dir}", "n": 8, "gamma": "auto", "calibration_n": 2},
        "figures": {"pcs": 2, "name_samples": 4, "scales": [-1, 0, 1]},
    }


def test_a_config_that_fits_has_no_problems(model_dir, oracle_dir):
    problems, facts = config_problems(RunConfig.model_validate(base(model_dir, oracle_dir)))
    assert problems == [] and facts.h_shape == (16, 8, 8)


RULES = [  # (section, changes, the key the line must name, a word of the fix)
    ("evaluate", {"n": 9}, "evaluate.n:", "lower evaluate.n to 8"),
    ("directions", {"held_out": 39}, "directions.held_out:", "lower it"),
    ("directions", {"top": 16}, "directions.top:", "lower it to 15"),
    ("directions", {"attributes": ["Smiling", "Male", "Young", "Bald"]}, "directions.attributes: Bald not", "drop it"),
    ("disentangle", {"conditions": {"Smiling": ["Bald"]}}, "disentangle.conditions: 'Bald'", "directions.attributes"),
    ("disentangle", {"conditions": {"Smiling": ["Smiling"]}}, "disentangle.conditions: Smiling", "projected against"),
    ("evaluate", {"directions": ["Smiling", "Male", "pc07"]}, "evaluate.directions: pc07", "pca.components 3"),
    ("pca", {"components": 40}, "pca.components:", "lower it to 39"),
    ("figures", {"jacobian_step": 5}, "figures.jacobian_step:", "0..4"),
    ("figures", {"pcs": 4}, "figures.pcs:", "pca.components 3"),
    ("sample", {"eta": [1.0, 0.5]}, "sample.eta:", "one per step"),
    ("sample", {"eta": "1@2:9"}, "sample.eta:", "window"),
    ("sample", {"steps": 101}, "sample.steps:", "training timesteps"),
    ("annotate", {"annotators": ["celeba40:WEIGHTS"]}, "annotate.annotators: celeba40:", "not a PyTorch checkpoint"),
    ("evaluate", {"evaluator": "hopenet:/no/such.pkl"}, "evaluate.evaluator:", "does not exist"),
    ("directions", {"prompt_pairs": {"Smiling": ["a", "b"]}}, "directions.prompt_pairs:", "text-conditioned"),
]


@pytest.mark.parametrize("section,changes,key,fix", RULES, ids=[f"{r[2].rstrip(':')}-{i}" for i, r in enumerate(RULES)])
def test_each_rule_refuses_before_any_work(tmp_path, model_dir, oracle_dir, section, changes, key, fix):
    cfg = base(model_dir, oracle_dir)
    garbage = tmp_path / "attribute_predictor.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    if changes.get("annotators") == ["celeba40:WEIGHTS"]:  # a weight file of the wrong format
        changes = {"annotators": [f"celeba40:{garbage}"]}
    cfg[section].update(changes)
    if section == "directions" and "attributes" in changes:  # evaluate the others: one problem only
        cfg["evaluate"]["directions"] = ["Smiling", "Male", "Young"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "never"
    t0 = time.perf_counter()
    result = hspace("run", "--config", path, "--out", out)
    assert time.perf_counter() - t0 < 30  # loads the model and annotators, nothing else
    assert result.exit_code == 2
    assert_refused(result, "1 problem(s)", key, fix, "nothing was started or written")
    assert not out.exists()


def test_all_problems_are_listed_at_once(tmp_path, model_dir, oracle_dir):
    cfg = base(model_dir, oracle_dir)
    cfg["evaluate"]["n"] = 20
    cfg["pca"]["components"] = 50
    cfg["directions"]["attributes"] = ["Smiling", "Male", "Bald"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = hspace("run", "--config", path, "--out", tmp_path / "never", "--plan")
    keys = ("evaluate.n:", "pca.components:", "directions.attributes: Bald", "evaluate.evaluator: oracle does not")
    assert_refused(result, "4 problem(s)", *keys)
    lines = [line for line in result.output.splitlines() if line.startswith("  ")]
    assert len(lines) == 4 and not (tmp_path / "never").exists()


def test_clip_prompts_must_cover_every_evaluated_attribute(tmp_path, model_dir, oracle_dir, clip_dir):
    cfg = base(model_dir, oracle_dir)
    cfg["evaluate"].update(evaluator=f"clip:{clip_dir}", prompts={"Smiling": ["a smiling face", "a face"]})
    problems, _ = config_problems(RunConfig.model_validate(cfg))
    assert len(problems) == 1 and problems[0].startswith("evaluate.evaluator: clip does not score Male, Young")
    assert "evaluate.prompts" in problems[0]
    cfg["evaluate"]["prompts"].update(Male=["a man", "a woman"], Young=["a young face", "an old face"])
    assert config_problems(RunConfig.model_validate(cfg))[0] == []


def test_plan_disk_is_the_issue_formula():
    """10,000 x 50 x 512x8x8 x 2 B = 32.8 GB of h for the CelebA-HQ example."""
    cfg = RunConfig.model_validate({"sample": {"n": 10000, "steps": 50}, "pca": {"components": 10}})
    facts = Facts(h_shape=(512, 8, 8), image_shape=(3, 256, 256))
    plan = make_plan(cfg, "/nonexistent/run", facts, probe=False)
    assert plan["disk_bytes"]["h (samples.zarr)"] == 10_000 * 50 * 512 * 8 * 8 * 2 == 32_768_000_000
    assert plan["stages"][0] == {"stage": "sample", "state": "run", "unet_passes": 500_000, "seconds": None}


def test_plan_prints_and_writes_nothing(tmp_path, model_dir, oracle_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(model_dir, oracle_dir)))
    out = tmp_path / "run"
    result = hspace("run", "--config", path, "--out", out, "--plan")
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", " ")
    assert "h = 40 x 5 x 16x8x8 x 2 B" in text and "ms per sample-pass" in text and "nothing was written" in text
    assert "200" in text  # the sample stage: 40 x 5 UNet sample-passes
    assert not out.exists()


def test_schedule_refuses_a_config_that_does_not_fit_before_serving(tmp_path, model_dir, oracle_dir):
    cfg = base(model_dir, oracle_dir)
    cfg["directions"]["top"] = 20
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    result = hspace("schedule", "--config", path, "--interval", "60", "--out-root", tmp_path / "runs")
    assert time.perf_counter() - t0 < 30 and result.exit_code == 2  # no Prefect server was needed to say so
    assert_refused(result, "directions.top: 20 top and 20 bottom samples need 40")
    assert not (tmp_path / "runs").exists()


def test_report_names_a_direction_that_leaks_more_after_the_projection(tmp_path):
    import numpy as np

    from hspace.data.eval_folder import EvalFolder
    from hspace.tasks.report import _findings

    ev = EvalFolder(tmp_path)
    rows, columns = ["Smiling", "Male"], ["Smiling", "Male"]
    ev.write_leakage("original", np.array([[0.5, 0.1], [0.02, 0.3]]), rows, columns, ())
    ev.write_leakage("disentangled", np.array([[0.5, 0.05], [0.2, 0.3]]), rows, columns, ())
    summary = {
        "n": 4,
        "evaluator": "oracle",
        "original": {"mean_diagonal": 0.4, "mean_offdiagonal": 0.06, "per_direction": {"Smiling": 0.1, "Male": 0.02}},
        "disentangled": {
            "mean_diagonal": 0.4,
            "mean_offdiagonal": 0.125,
            "per_direction": {"Smiling": 0.05, "Male": 0.2},
        },
    }
    ev.write_summary(summary)
    page = "".join(_findings(ev))
    assert "Leaks more after the projection: <b>Male</b> 0.02 → 0.2" in page and "<b>Smiling</b>" not in page
