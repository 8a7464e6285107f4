"""`hspace compare` on a small toy-sd run made through the CLI: every registered method that fits
is a row, each calibrated to the target on its calibration samples (or flagged), the scores
of one row recomputed by hand (the edit replayed, the oracle, the PSNR), the files reload,
bad input refused before any work."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hspace.data.catalog import RunFolder
from hspace.flows.cli import app

runner = CliRunner()


def hspace(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def toy_sd_run(prefect_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("cmp") / "run"
    base = ("--device", "cpu")
    steps = ("--steps", "6", "--guidance-scale", "4", "--prompt", "a person", "--batch-size", "48")
    for args in (
        ("sample", "--model", "toy-sd", "--n", "48", *steps, "--out", run, *base),
        ("annotate", run, *base),
        ("directions", run, "--attribute", "Smiling", "--top", "8", "--held-out", "24", *base),
        ("directions", run, "--prompt-pair", "a serious person", "a smiling person", "--name", "Smiling_prompt",
         "--held-out", "24", *base),
    ):  # fmt: skip
        r = hspace(*args)
        assert r.exit_code == 0, r.output
    return run


@pytest.mark.slow
def test_compare_scores_every_method_that_fits(toy_sd_run):
    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.data.photos import psnr
    from hspace.hcore.sampler import Edit, to_uint8

    run = toy_sd_run
    r = hspace("compare", run, "--attributes", "Smiling", "--n", "8", "--calibration-n", "8", "--device", "cpu")
    assert r.exit_code == 0, r.output
    folder = RunFolder(run).compare
    rows = list(csv.DictReader((folder / "leaderboard.csv").open()))
    summary = json.loads((folder / "leaderboard.json").read_text())
    assert {row["method"] for row in rows} == {"asyrp", "h", "h:prompt", "hdae-sparse", "p2p", "pnp", "sdedit"}
    assert dict(summary["not_applicable"]["Smiling"])["xT"] == "no direction file Smiling_xT"
    for row in rows:  # calibrated within 0.05 of the target on its calibration samples, or flagged
        assert row["calibration"] in ("calibrated", "missed", "unreachable", "does not raise it"), row
        if row["calibration"] == "calibrated":
            assert abs(float(row["calibration_change"]) - 0.25) <= 0.05, row
    for name in ("grid.png", "leakage.png"):
        assert Image.open(folder / name).size[0] > 100
    # the h row by hand: its gamma on the 8 held-out samples after the 24 the directions ranked
    h = next(row for row in rows if row["method"] == "h")
    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta, device="cpu")
    replay = models.replay_for_run(meta, device="cpu")
    oracle = load_annotator("oracle", "cpu")
    v = dirfile.read(RunFolder(run).direction("Smiling")).v
    indices = list(range(24, 32))
    plain = replay.render(unet, scheduler, indices)
    edited = replay.render(unet, scheduler, indices, edit=Edit([v], [float(h["value"])]))
    col = list(oracle.names).index("Smiling")
    own = float((oracle.score(edited)[:, col] - oracle.score(plain)[:, col]).mean())
    assert abs(own - float(h["own_change"])) < 2e-3
    a, b = to_uint8(edited).numpy(), to_uint8(plain).numpy()
    assert abs(np.mean([min(psnr(x, y), 99.0) for x, y in zip(a, b, strict=True)]) - float(h["psnr_db"])) < 1e-2
    assert torch.is_tensor(v)


@pytest.mark.slow
def test_compare_refuses_bad_input_before_work(toy_sd_run):
    folder = RunFolder(toy_sd_run).compare
    before = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    r = hspace("compare", toy_sd_run, "--methods", "h,nope", "--device", "cpu")
    assert r.exit_code != 0 and "no editing method 'nope'; registered:" in r.output, r.output
    r = hspace("compare", toy_sd_run, "--n", "40", "--device", "cpu")
    assert r.exit_code != 0 and "compare needs 56 held-out samples" in r.output, r.output
    r = hspace("compare", toy_sd_run, "--attributes", "Bald", "--device", "cpu")
    assert r.exit_code != 0 and "not scored by oracle" in r.output, r.output
    assert (sorted(p.name for p in folder.iterdir()) if folder.exists() else []) == before


@pytest.mark.slow
def test_table_1_takes_prompt_and_source_methods_by_name(toy_sd_run):
    """evaluate.methods [sdedit, p2p] on a run with a prompt-pair direction: a row each
    (METHOD:ATTR) beside the directions; the sdedit row by hand: the held-out samples' own
    latents noised to step k with their first draw, denoised under the pair's target prompt,
    oracle scores minus the unedited ones."""
    import hspace as api
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.hcore.inversion import noise_to_step

    run = toy_sd_run
    evaluate = {"directions": ["Smiling_prompt"], "methods": ["sdedit", "p2p"], "n": 4, "gamma": 0.5,
                "disentangled": False}  # fmt: skip
    api.run_stage("evaluate", run, {"evaluate": evaluate}, device="cpu")
    summary = json.loads((RunFolder(run).eval / "summary.json").read_text())
    assert summary["directions"] == ["Smiling_prompt", "sdedit:Smiling", "p2p:Smiling"]
    table = list(csv.reader((RunFolder(run).eval / "leakage_original.csv").open()))
    assert [r[0] for r in table[1:]] == ["Smiling_prompt", "Smiling", "Smiling"]
    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta, device="cpu")
    replay = models.replay_for_run(meta, device="cpu")
    idx, steps = list(range(24, 28)), meta["config"]["steps"]
    own = replay.render(unet, scheduler, idx, stop_before=steps)
    start = noise_to_step(scheduler, own, steps, steps // 2, replay.generators(idx))
    edited = replay.render(unet, scheduler, idx, x_T=start, start_at=steps // 2, prompts=["a smiling person"] * 4)
    oracle = load_annotator("oracle", "cpu")
    by_hand = (oracle.score(edited) - oracle.score(replay.render(unet, scheduler, idx))).mean(0).numpy()
    np.testing.assert_allclose([float(x) for x in table[2][1:]], by_hand, rtol=0, atol=2e-5)
    assert float(table[3][1 + list(oracle.names).index("Smiling")]) != 0.0  # p2p edits toward the target too
