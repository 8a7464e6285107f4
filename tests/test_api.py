"""The Python API, as a notebook uses it: open a run lazily without Prefect, apply
a direction inside diffusers' own DDIMPipeline (the same image as `hspace edit`; bit-identical
at gamma 0; hooks gone after an exception; mismatched schedules refused), run a stage from
Python, and direction packs (`hspace export`) usable by `hspace edit` and the API."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, PNDMScheduler
from PIL import Image
from typer.testing import CliRunner

import hspace
from hspace.data import models
from hspace.data.catalog import RunError, RunFolder
from hspace.data.stores import SampleStore
from hspace.flows.cli import app
from hspace.hcore.sampler import make_generators
from tests.test_toy_pipeline import hspace as ok  # runs a command, asserts exit 0

runner = CliRunner()
STEPS = 10


@pytest.fixture(scope="module")
def toy(prefect_server, tmp_path_factory):
    """A 16-sample toy run (10 steps, eta 1): annotated, Smiling and Male by eq. (10) from the
    first 10, evaluated at gamma 1 on the last 6."""
    run = tmp_path_factory.mktemp("api") / "run"
    ok("sample", "--model", "toy", "--n", 16, "--steps", STEPS, "--batch-size", 16, "--device", "cpu", "--out", run)
    ok("annotate", run, "--device", "cpu")
    ok("directions", run, "--attribute", "Smiling,Male", "--top", 4, "--held-out", 6)
    ok("evaluate", run, "--directions", "Smiling,Male", "--n", 6, "--gamma", 1, "--no-disentangled", "--device", "cpu")
    return run


def _pipeline(run):
    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta)
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config)), meta


def _generate(pipe, meta, index):
    gen = make_generators(meta["config"]["seed"], [index])[0]
    out = pipe(batch_size=1, generator=gen, num_inference_steps=STEPS, eta=1.0, output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def test_open_run_reads_lazily_without_prefect(toy):
    code = (
        "import sys, json, hspace\n"
        f"r = hspace.open_run({str(toy)!r})\n"
        "print(json.dumps({'h': list(r.h.shape), 'h0': float(r.h[3, 2].astype('float32').sum()),"
        " 'scores': sorted(r.scores()), 'table': sorted(r.table1()), 'dirs': sorted(r.directions()),"
        " 'stages': sorted(r.stages), 'prefect': 'prefect' in sys.modules, 'torch': 'torch' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    store = SampleStore(toy / "samples.zarr")
    assert got["h"] == list(store.h.shape)
    assert got["h0"] == pytest.approx(float(np.asarray(store.h[3, 2]).astype(np.float32).sum()))
    assert {"Smiling", "Male", "yaw"} <= set(got["scores"]) and got["table"] == ["Male", "Smiling"]
    assert got["dirs"] == ["Male", "Smiling"] and {"sample", "annotate", "directions", "evaluate"} <= set(got["stages"])
    assert not got["prefect"]  # reading a run never starts (or imports) Prefect
    run = hspace.open_run(toy)
    import csv

    with open(toy / "eval" / "leakage_original.csv", newline="") as f:
        rows = {r["direction"]: r for r in csv.DictReader(f)}
    assert run.table1()["Smiling"]["Male"] == pytest.approx(float(rows["Smiling"]["Male"]))
    with pytest.raises(RunError, match="has no PCA yet"):
        run.pca()
    with pytest.raises(RunError, match="not a run folder|no run.json|does not exist"):
        hspace.open_run(toy.parent)


def test_apply_in_diffusers_pipeline_equals_hspace_edit(toy, tmp_path):
    """Inside DDIMPipeline (toy model, the run's steps and eta, the sample's generator) the
    direction at gamma 2 gives the image `hspace edit RUN --sample 5` writes (<= 1/255)."""
    direction = hspace.open_run(toy).direction("Smiling")
    grid = tmp_path / "grid.png"
    ok("edit", toy, "--sample", 5, "--direction", direction.path, "--scales", "0,2", "--out", grid)
    cli = {g: np.asarray(Image.open(tmp_path / "grid" / f"sample5__Smiling__gamma{g}.png")) for g in ("+0", "+2")}
    pipe, meta = _pipeline(toy)
    plain = _generate(pipe, meta, 5)
    with hspace.apply(pipe, direction, gamma=2.0):
        edited = _generate(pipe, meta, 5)
    assert np.abs(plain.astype(int) - cli["+0"]).max() <= 1
    assert np.abs(edited.astype(int) - cli["+2"]).max() <= 1
    assert np.abs(edited.astype(int) - plain).mean() > 2  # the edit did something


def test_asyrp_inside_a_plain_pipeline_is_the_cli_edit(toy, tmp_path):
    """hspace.apply(..., method="asyrp") in diffusers' DDIMPipeline (eta 1): the pipeline's
    one pass per step plus the unedited second pass the hook adds give the image `hspace edit
    --edit-method asyrp` renders (the edited eps in P_t only), not the h edit's."""
    direction = hspace.open_run(toy).direction("Smiling")
    grid = tmp_path / "grid.png"
    args = ("--direction", direction.path, "--edit-method", "asyrp", "--scales", 3, "--out", grid)
    ok("edit", toy, "--sample", 5, *args)
    cli = np.asarray(Image.open(tmp_path / "grid" / "sample5__Smiling__gamma+3.png")).astype(int)
    pipe, meta = _pipeline(toy)
    with hspace.apply(pipe, direction, gamma=3.0, method="asyrp"):
        asyrp = _generate(pipe, meta, 5).astype(int)
    with hspace.apply(pipe, direction, gamma=3.0):
        h_edit = _generate(pipe, meta, 5).astype(int)
    assert np.abs(asyrp - cli).max() <= 1
    assert np.abs(asyrp - h_edit).mean() > 1  # D_t without the edit: another image than eq. (6)'s
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks and "step" not in vars(pipe.scheduler)
    pndm = DDPMPipeline(unet=pipe.unet, scheduler=PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True))
    with pytest.raises(hspace.DirectionMismatch, match="asyrp splits the DDIM step.*PNDMScheduler"):
        with hspace.apply(pndm, direction, gamma=3.0, method="asyrp"):
            pass


def test_gamma_zero_is_bit_identical_and_hooks_go_after_an_exception(toy):
    pipe, meta = _pipeline(toy)
    direction = hspace.load_direction(toy / "directions" / "Smiling.safetensors")
    plain = _generate(pipe, meta, 1)
    with hspace.apply(pipe, direction, gamma=0.0):
        zero = _generate(pipe, meta, 1)
    np.testing.assert_array_equal(zero, plain)
    hooks = lambda: (len(pipe.unet._forward_pre_hooks), len(pipe.unet.mid_block._forward_hooks))  # noqa: E731
    before = hooks()
    with pytest.raises(KeyboardInterrupt), hspace.apply(pipe, direction, gamma=3.0):
        assert hooks() != before
        raise KeyboardInterrupt
    assert hooks() == before
    np.testing.assert_array_equal(_generate(pipe, meta, 1), plain)


def test_mismatched_pipelines_are_refused(toy, other_model_dir):
    pipe, meta = _pipeline(toy)
    direction = hspace.load_direction(f"{toy}/Smiling")  # RUN/NAME
    with pytest.raises(hspace.DirectionMismatch, match="num_inference_steps=10"), hspace.apply(pipe, direction, 1.0):
        pipe(num_inference_steps=STEPS + 2, output_type="np")
    pndm = DDPMPipeline(unet=pipe.unet, scheduler=PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True))
    with pytest.raises(hspace.DirectionMismatch, match="PNDMScheduler"), hspace.apply(pndm, direction, 1.0):
        pndm(num_inference_steps=STEPS, output_type="np")
    assert len(pipe.unet._forward_pre_hooks) == 0 and len(pipe.unet.mid_block._forward_hooks) == 0
    other, _ = models.load(models.resolve(str(other_model_dir)))
    with pytest.raises(hspace.DirectionMismatch, match="another model|shape"):
        with hspace.apply(DDIMPipeline(unet=other, scheduler=pipe.scheduler), direction, 1.0):
            pass


def test_run_stage_from_python_records_like_the_cli(toy):
    hspace.run_stage("pca", toy, {"pca": {"components": 3}}, device="cpu")
    run = hspace.open_run(toy)
    assert run.stages["pca"]["state"] == "done" and run.pca()["components"].shape[:2] == (STEPS, 3)
    assert "pc02" in run.directions()
    with pytest.raises(RunError, match="no stage 'pcaa'"):
        hspace.run_stage("pcaa", toy)


def test_export_pack_and_use_it(toy, tmp_path):
    pack = tmp_path / "pack"
    ok("export", toy, "--directions", "Smiling,Male", "--out", pack, "--device", "cpu")
    index = json.loads((pack / "directions.json").read_text())
    assert index["format"] == "hspace-direction-pack/1" and list(index["directions"]) == ["Smiling", "Male"]
    smile = index["directions"]["Smiling"]
    assert smile["gamma"] == 1.0 and smile["method"] and "Smiling" in smile["table1"]
    assert index["model"]["fingerprint"] == RunFolder(toy).read()["model"]["fingerprint"]
    card = (pack / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: hspace") and "| `Smiling` |" in card and "preview.png" in card
    assert Image.open(pack / "preview.png").size[0] > 100
    assert (pack / "Smiling.safetensors").read_bytes() == (toy / "directions" / "Smiling.safetensors").read_bytes()
    loaded = hspace.load_direction(pack / "Smiling")
    torch.testing.assert_close(loaded.v, hspace.open_run(toy).direction("Smiling").v)
    ok("edit", "--model", "toy", "--steps", STEPS, "--direction", f"{pack}/Smiling:1", "--out", tmp_path / "e.png")
    assert (tmp_path / "e.png").exists()
    ok("export", toy, "--directions", "Smiling", "--out", pack, "--device", "cpu")  # a previous pack: rewritten
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(toy), "--out", str(junk)])
    assert result.exit_code == 2 and "holds other files" in result.output
    assert (junk / "notes.txt").read_text() == "mine" and len(list(junk.iterdir())) == 1
    result = runner.invoke(app, ["export", str(toy), "--directions", "Nope", "--out", str(tmp_path / "p2")])
    assert result.exit_code == 2 and "Nope" in result.output and not (tmp_path / "p2").exists()


@pytest.mark.slow
def test_quickstart_notebook_runs_as_shipped(toy, monkeypatch):
    """docs/quickstart.ipynb, outputs stripped in the repo, executed by nbclient in a real
    kernel on a toy run: it plots the explained variance, renders the direction in
    DDIMPipeline, and at gamma 0 gets the run's stored sample back (<= 1/255)."""
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the notebook's outputs"
    if "pca" not in hspace.open_run(toy).stages:
        hspace.run_stage("pca", toy, {"pca": {"components": 3}}, device="cpu")
    monkeypatch.setenv("HSPACE_RUN", str(toy))
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    kinds = [o.get("data", {}).keys() for c in code for o in c.outputs]
    assert sum("image/png" in k for k in kinds) >= 2  # the plot and the edit row
    last = "".join(o.get("text", "") for o in code[-1].outputs)
    assert "max |pipeline at gamma 0 - stored sample|:" in last and int(last.split(":")[-1]) <= 1, last


@pytest.mark.slow
def test_run_pipeline_from_python_with_a_config_object(prefect_server, model_dir, oracle_dir, tmp_path):
    """hspace.run_pipeline(RunConfig, out): the whole-config check first (a bad config is one
    RunError and nothing is written), then every stage to the report, recorded as `hspace run`
    records them."""
    from hspace.tasks.config import load_config
    from hspace.tasks.stages import pipeline_stages
    from tests.test_pipeline import write_config

    cfg = load_config(write_config(tmp_path / "run.yaml", model_dir, oracle_dir))
    bad = cfg.model_copy(update={"directions": cfg.directions.model_copy(update={"top": 50})})
    with pytest.raises(RunError, match="directions.top"):
        hspace.run_pipeline(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    report = hspace.run_pipeline(cfg, tmp_path / "run")
    assert report.exists() and report.name == "report.html"
    run = hspace.open_run(tmp_path / "run")
    assert all(run.stages[s]["state"] == "done" for s in pipeline_stages()), run.stages
    assert run.config["n"] == 16 and set(run.table1()) >= {"Smiling", "Male", "Young"}
