"""The supervised chain on the shipped toy world (real model, real oracle): sample ->
annotate -> eq. (10) direction from the first samples -> evaluate on the held-out ones with
--gamma auto. The calibrated gamma must reach its target on the toy model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hspace.flows.cli import app

runner = CliRunner()


def hspace(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def toy_run(prefect_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    hspace(
        "sample", "--model", "toy", "--n", "48", "--steps", "10", "--batch-size", "48", "--device", "cpu", "--out", out
    )
    hspace("annotate", out, "--device", "cpu")
    return out


@pytest.mark.slow
def test_auto_gamma_reaches_its_target_on_the_toy_model(toy_run):
    hspace("directions", toy_run, "--attribute", "Smiling", "--top", "8", "--held-out", "16")
    result = hspace(
        "evaluate",
        toy_run,
        "--directions",
        "Smiling",
        "--gamma",
        "auto",
        "--target",
        "0.2",
        "--calibration-n",
        "8",
        "--device",
        "cpu",
    )
    summary = json.loads((toy_run / "eval" / "summary.json").read_text())
    cal = summary["calibration"]["original"]["Smiling"]
    assert cal["converged"] and abs(cal["reached"] - 0.2) <= 0.05 * 0.2, result.output
    # calibrated on the last 8 held-out samples, evaluated on the other 8: disjoint
    assert summary["held_out_from"] == 32 and summary["n"] == 8 and cal["samples"] == [40, 48]
    # on the 8 evaluated samples, never seen by the calibration, the calibrated edit still raises Smiling
    # (+0.08 here: less than the +0.20 it was tuned to on other samples, which is why they must differ)
    assert summary["original"]["mean_diagonal"] > 0.03


def _write_renders(folder, smiling: bool, count: int, first_seed: int):
    from PIL import Image

    from hspace.data.toy import faces as toyfaces
    from hspace.data.toy import recipe as toy

    folder.mkdir(parents=True)
    style = toy.model_recipe(toy.TOY_MODEL_DIR).style  # the renders the shipped model was trained on
    images, factors = toyfaces.render_batch(range(first_seed, first_seed + 400), 32, style=style)
    picked = [i for i in range(400) if bool(factors.Smiling[i]) == smiling][:count]
    for i in picked:
        Image.fromarray(images[i]).save(folder / f"face{i:03d}.png")


@pytest.mark.slow
def test_real_image_supervision_by_inversion(toy_run, tmp_path):
    """Toy renders as 'real' images (smiling vs neutral): invert, build the eq. (10)
    direction from them, apply it to generated samples: the oracle's Smiling must rise."""
    import numpy as np
    import torch

    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.data.catalog import RunFolder
    from hspace.data.stores import SampleStore
    from hspace.hcore.sampler import Edit, make_generators, sample

    images = tmp_path / "faces"
    _write_renders(images / "positive", True, 24, 7_000_000)
    _write_renders(images / "negative", False, 24, 7_000_000)
    out = tmp_path / "inv"
    args = ("--images", images, "--model", "toy", "--steps", "10", "--refine", "1", "--attribute", "Smiling")
    result = hspace("invert", *args, "--batch-size", "24", "--device", "cpu", "--out", out)
    assert "regenerated vs input: MSE" in result.output
    store = SampleStore(out / "samples.zarr")
    assert store.h.shape[:2] == (48, 10) and store.complete()
    assert float(np.mean(store.group["recon_mse"][:])) < 0.01  # refined inversion regenerates the renders
    hspace("directions", out, "--attribute", "Smiling", "--top", "24")  # nothing held out of real images
    v, md = dirfile.load(out / "directions" / "Smiling.safetensors")
    assert int(md["steps"]) == 10
    # apply to generated samples of the sampled toy run (same model, same schedule)
    meta = RunFolder(toy_run).read()
    unet, scheduler = models.load_for_run(meta)
    oracle = load_annotator("oracle")
    j = oracle.names.index("Smiling")
    gens = lambda: make_generators(123, range(16))  # noqa: E731
    plain = oracle.score(sample(unet, scheduler, gens(), 10, 0.0))[:, j]
    edited = oracle.score(sample(unet, scheduler, gens(), 10, 0.0, edit=Edit([v], [torch.tensor(4.0)])))[:, j]
    print("Smiling change", float((edited - plain).mean()))
    assert float((edited - plain).mean()) > 0.05, (plain, edited)
    # an edit grid of the first real image starts from its inverted x_T
    grid = tmp_path / "grid.png"
    hspace("edit", out, "--sample", "0", "--direction", out / "directions" / "Smiling.safetensors", "--out", grid)
    assert grid.exists()


def test_invert_bad_inputs(tmp_path):
    images = tmp_path / "faces"
    _write_renders(images / "positive", True, 2, 8_000_000)
    result = runner.invoke(app, ["invert", "--images", str(images), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "needs positive/ and negative/" in result.output
    _write_renders(images / "negative", False, 2, 8_000_000)
    (images / "negative" / "broken.png").write_bytes(b"not a png")
    (images / "positive" / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["invert", "--images", str(images), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "2 of 6 files" in result.output and "broken.png" in result.output and "notes.txt" in result.output
    assert not (tmp_path / "b").exists()
    labels = tmp_path / "labels.csv"
    labels.write_text("file,Smiling\npositive/missing.png,1\n")
    result = runner.invoke(
        app, ["invert", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 2 and "not in" in result.output


@pytest.mark.slow
def test_table_1_by_toy_clip_agrees_with_the_oracle(toy_run):
    """The paper's evaluation (CLIP zero-shot, its prompts) with toy-clip on the same edits as
    the oracle: each direction raises its own attribute by both judges, and the two tables agree
    cell by cell (Pearson over the five attributes' columns)."""
    import csv

    from hspace.data.catalog import RunFolder
    from hspace.tasks.evaluate import run_evaluation

    r = hspace("directions", toy_run, "--attribute", "Eyeglasses,Male", "--top", "8", "--held-out", "16")
    assert r.exit_code == 0, r.output
    tables = {}
    for judge in ("oracle", "clip:toy-clip"):
        run_evaluation(str(toy_run), ["Eyeglasses", "Male"], evaluator=judge, n=16, gamma=2.0, log=lambda line: None)
        rows = list(csv.reader((RunFolder(toy_run).eval / "leakage_original.csv").open()))
        tables[judge] = {r[0]: dict(zip(rows[0][1:], map(float, r[1:]), strict=True)) for r in rows[1:]}
    cols = ["Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Young"]
    for row in ("Eyeglasses", "Male"):
        assert tables["oracle"][row][row] > 0.1 and tables["clip:toy-clip"][row][row] > 0.1, tables
    o = [tables["oracle"][r][c] for r in ("Eyeglasses", "Male") for c in cols]
    c = [tables["clip:toy-clip"][r][c] for r in ("Eyeglasses", "Male") for c in cols]
    assert np.corrcoef(o, c)[0, 1] > 0.8, (o, c)
