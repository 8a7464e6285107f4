"""`hspace run`: the pipeline DAG on a tiny model. Every stage runs once, a rerun is all
cache hits, changing one section redoes that stage and those downstream only, a bad
config fails before any work, and the report is one self-contained page."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from hspace.data.catalog import RunError
from hspace.flows.cli import app
from hspace.tasks.config import load_config
from hspace.tasks.stages import pipeline_stages
from tests.test_cli import assert_refused, tree_digest

STAGES = pipeline_stages()

runner = CliRunner()


def hspace(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_config(path, model_dir, oracle_dir, **changes):
    cfg = {
        "device": "cpu",
        "sample": {"model": str(model_dir), "n": 16, "steps": 4, "batch_size": 8},
        "annotate": {"annotators": [f"oracle:{oracle_dir}"]},
        "pca": {"components": 2},
        "directions": {"attributes": ["Smiling", "Male", "Young"], "top": 3, "held_out": 6},
        "evaluate": {"evaluator": f"oracle:{oracle_dir}", "gamma": 1.0},
        "figures": {"pcs": 2, "name_samples": 4, "scales": [-1, 0, 1]},
    }
    for section, values in changes.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage_lines(output: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^([\w-]+): (cached|done)", output, re.M)}


@pytest.fixture(scope="module")
def pipeline_run(prefect_server, model_dir, oracle_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    config = write_config(tmp / "run.yaml", model_dir, oracle_dir)
    first = hspace("run", "--config", config, "--out", out)
    assert first.exit_code == 0, first.output
    return out, config, first


def test_pipeline_runs_caches_and_recomputes_downstream(pipeline_run, model_dir, oracle_dir):
    out, config, first = pipeline_run
    assert stage_lines(first.output) == {s: "done" for s in STAGES}
    # each stage ends with one line and its headline; no third-party warning blocks (accelerate is installed)
    headline = (
        r"^evaluate: done in [\d.]+ s; leakage off-diagonal \S+ -> \S+ \([+-]\d+%\), diagonal kept \d+%; "
        r"as written \S+ \([+-]\d+%\), diagonal kept \d+%(; leaks MORE after the projection: .+)?$"
    )
    assert re.search(headline, first.output, re.M), first.output
    assert "low cpu memory usage" not in first.output and "accelerate" not in first.output
    # the long stages show progress bars (final state: all passes done)
    assert re.search(r"evaluate \(edit-and-score passes\).*\b10/10\b", first.output), first.output
    assert re.search(r"annotate \(oracle\).*\b16/16\b", first.output) and re.search(
        r"pca \(timesteps\).*\b4/4\b", first.output
    )
    figures = re.search(r"^figures .*?(\d+)/(\d+)", first.output, re.M)
    assert figures and figures.group(1) == figures.group(2), first.output  # the planned total was exact
    meta = json.loads((out / "run.json").read_text())
    assert all(meta["stages"][s]["state"] == "done" for s in STAGES)
    for name in ("samples.zarr", "annotations.zarr", "pca.zarr", "eval/summary.json", "report.html"):
        assert (out / name).exists(), name
    for name in ("Smiling", "Male_disentangled", "pc01", "random01"):
        assert (out / "directions" / f"{name}.safetensors").exists(), name
    report = (out / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report)
    assert len(images) >= 7 and "http" not in report.replace("http-equiv", "")
    assert "Leakage (Table 1)" in report and "pc00" in report
    # the findings lead; the config and stage records are folded away at the end
    assert report.index("id='summary'") < report.index("<img") < report.index("<details><summary>Config")
    assert re.search(r"<tr><th>Smiling</th><td>[-+0-9.e]+</td><td>\w+</td>", report)
    assert "0.1737631410" not in report and not re.search(r"\d\.\d{7,}", report.split("<details>")[0])
    assert "(Fig. 8)" in report and "(Fig. 7)" in report and "(Fig. 11)" in report
    efficiency = json.loads((out / "figures" / "sample_efficiency.json").read_text())
    assert efficiency["ns"] == [1, 3] and set(efficiency["change"]) == {"h:1", "h:3", "xT:1", "xT:3"}
    assert set(efficiency["moved"]) == set(efficiency["change"])
    from PIL import Image

    with Image.open(out / "figures" / "sample_efficiency.png") as fig8:  # change and RMS panels side by side
        rgb = np.asarray(fig8.convert("RGB")).astype(int)
    for half in (rgb[:, : rgb.shape[1] // 2], rgb[:, rgb.shape[1] // 2 :]):
        blue = (half[..., 2] > 200) & (half[..., 0] < 60)
        red = (half[..., 0] > 200) & (half[..., 2] < 60)
        assert blue.sum() > 20 and red.sum() > 20  # both curves (h and x_T) in each panel
    from prefect.artifacts import Artifact

    link = Artifact.get("hspace-run-report")  # Prefect artifacts for the UI
    assert link is not None and "report.html" in str(link.data)
    for label in ("original", "disentangled", "as-written"):  # the three Table-1 variants
        table = Artifact.get(f"hspace-run-leakage-{label}")
        assert table is not None and "Smiling" in str(table.data), label
    assert "eq. (11) as written" in report and (out / "eval" / "leakage_as_written.png").exists()
    shown = hspace("inspect", out)
    assert shown.exit_code == 0 and "stages" in shown.output and "evaluate" in shown.output
    as_json = json.loads(hspace("inspect", out, "--json").output)
    assert as_json["stages"]["evaluate"]["key"] == meta["stages"]["evaluate"]["key"]
    assert as_json["stages"]["evaluate"]["inputs"] == ["directions", "disentangle", "annotate"]

    samples_before = tree_digest(out / "samples.zarr")
    summary_before = (out / "eval" / "summary.json").read_text()
    again = hspace("run", "--config", config, "--out", out)
    assert again.exit_code == 0, again.output
    assert stage_lines(again.output) == {s: "cached" for s in STAGES}

    write_config(config, model_dir, oracle_dir, evaluate={"gamma": 2.0})
    changed = hspace("run", "--config", config, "--out", out)
    assert changed.exit_code == 0, changed.output
    lines = stage_lines(changed.output)
    assert lines == {**{s: "cached" for s in STAGES}, "evaluate": "done", "report": "done"}
    assert tree_digest(out / "samples.zarr") == samples_before
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["original"]["gamma"]["Smiling"] == 2.0 and summary != json.loads(summary_before)

    # a changed sample section on the same folder is refused, nothing touched
    before = tree_digest(out)
    write_config(config, model_dir, oracle_dir, sample={"n": 20})
    assert_refused(hspace("run", "--config", config, "--out", out), "different config", "n: stored 16 != requested 20")
    assert tree_digest(out) == before


def test_plan_of_a_finished_run_skips_every_stage_and_writes_nothing(pipeline_run, tmp_path):
    from tests.test_cli import tree_digest

    out, _, _ = pipeline_run
    config = out / "run.yaml"  # the config the run was last made with (other tests of this module change it)
    before = tree_digest(out)
    result = hspace("run", "--config", config, "--out", out, "--plan")
    assert result.exit_code == 0, result.output
    assert result.output.count("skip (cached)") == len(STAGES) and tree_digest(out) == before
    changed = tmp_path / "changed.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["directions"]["top"] = 2
    changed.write_text(yaml.safe_dump(cfg))
    plan = hspace("run", "--config", changed, "--out", out, "--plan").output
    # directions and everything downstream of it, or reading its section (Fig. 8's held-out
    # samples), would run; sample, annotate, pca, the PC names and Fig. 7 stay cached
    states = dict(re.findall(r"│ ([\w-]+)\s+│ (run|skip \(cached\))", plan))
    assert states == {
        **dict.fromkeys(["sample", "annotate", "avi", "pca", "pc_names", "jacobian_figure"], "skip (cached)"),
        "latent-svd": "skip (cached)",
        "clip-edits": "skip (cached)",
        "diffae": "skip (cached)",
        "layers": "skip (cached)",
        **dict.fromkeys(["directions", "disentangle", "compare", "evaluate", "efficiency", "figures", "report"], "run"),
    }, plan
    assert tree_digest(out) == before


def test_bad_configs_fail_before_any_work(tmp_path, model_dir, oracle_dir):
    out = tmp_path / "never"
    bad = tmp_path / "bad.yaml"
    for text, needle in (
        ("pca: {componets: 3}\n", "pca.componets: unknown key"),
        ("sample: {n: -1}\n", "sample.n must be greater than 0, got -1"),
        ("evaluate: {gamma: lots}\n", "evaluate.gamma"),
        ("samples: {}\n", "samples: unknown key"),
        ("- just a list\n", "must be a mapping"),
        ("pca: [\n", "not valid YAML"),
        ("disentangle: {conditions: {Bald: [Male]}}\n", "'Bald' is not among directions.attributes"),
        ("compare: {n: 60, calibration_n: 16}\n", "compare.n: compare.n 60 + compare.calibration_n 16 = 76"),
        ("compare: {methods: [h, nope]}\n", "compare.methods: no editing method 'nope'; registered:"),
        ("compare: {attributes: [Bald]}\n", "compare.attributes: 'Bald' is not among directions.attributes"),
    ):
        bad.write_text(text)
        assert_refused(hspace("run", "--config", bad, "--out", out), needle)
    assert not out.exists()


@pytest.mark.parametrize("flag", [[], ["--celeba"], ["--toy-sd"]])
def test_example_configs_are_valid(tmp_path, flag):
    result = hspace("config", "--example", *flag)
    assert result.exit_code == 0
    path = tmp_path / "example.yaml"
    path.write_text(result.output)
    cfg = load_config(path)
    assert cfg.directions.attributes[0] == "Smiling"
    with pytest.raises(RunError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_schedule_deployment_and_a_triggered_run(prefect_server, model_dir, oracle_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.flow_engine import run_flow

    from hspace.flows.schedule import make_deployment, scheduled_run, serve_into

    cfg = load_config(write_config(tmp_path / "run.yaml", model_dir, oracle_dir))
    deployment_id = make_deployment(cfg, "0 3 * * *", "nightly-test", tmp_path / "scheduled").apply()
    monkeypatch.delenv("HSPACE_SCHEDULE_OUT_ROOT", raising=False)
    serve_into(tmp_path / "scheduled")  # as `hspace schedule` does before it serves
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        # trigger a run and execute it here, as a runner would
        flow_run = run_deployment("hspace-scheduled-run/nightly-test", timeout=0)
        state = run_flow(scheduled_run, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
        assert state.is_completed(), state
        assert client.read_flow_run(flow_run.id).state.is_completed()
    out = Path(state.result())
    assert out.parent == (tmp_path / "scheduled").resolve() and (out / "report.html").exists()
    # runs created through the API with values `hspace schedule` would not serve: refused at
    # once with one line, nothing written, and the deployment still runs good ones
    before = sorted(p.name for p in (tmp_path / "scheduled").iterdir())
    good = dict(flow_run.parameters)
    bad_config = {**good["config"], "sample": {**good["config"]["sample"], "n": -5}}
    for parameters, expected in [
        ({**good, "out_root": str(tmp_path / "elsewhere")}, "is not the folder this schedule serves"),
        ({**good, "keep": -1}, "keep must be a positive integer"),
        ({**good, "config": bad_config}, "config: sample.n"),
        ({**good, "config": {**good["config"], "nope": 1}}, "config: nope"),
    ]:
        refused = run_deployment("hspace-scheduled-run/nightly-test", parameters=parameters, timeout=0)
        state = run_flow(scheduled_run, flow_run=refused, parameters=refused.parameters, return_type="state")
        assert state.is_failed() and expected in state.message and "\n" not in state.message, state.message
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in (tmp_path / "scheduled").iterdir()) == before
    again = run_deployment("hspace-scheduled-run/nightly-test", timeout=0)  # the schedule goes on
    assert run_flow(scheduled_run, flow_run=again, parameters=again.parameters, return_type="state").is_completed()
    monkeypatch.delenv("HSPACE_SCHEDULE_OUT_ROOT")
    unserved = run_deployment("hspace-scheduled-run/nightly-test", timeout=0)
    state = run_flow(scheduled_run, flow_run=unserved, parameters=unserved.parameters, return_type="state")
    assert state.is_failed() and "runs only under `hspace schedule`" in state.message
    assert_refused(hspace("schedule", "--cron", "every day at 3"), "is not a cron expression")
    assert_refused(hspace("schedule", "--cron", "0 3 * * *", "--interval", "60"), "either --cron or --interval")
    assert_refused(hspace("schedule", "--interval", "0"), "--interval must be a positive number")
    assert_refused(hspace("schedule", "--concurrency", "0"), "--concurrency must be at least 1")
    assert_refused(hspace("schedule", "--keep", "0"), "--keep must be at least 1")


CHECK_IMAGES = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.setAttribute('data-images', images.length);
  document.body.setAttribute('data-rendered', images.filter(i => i.complete && i.naturalWidth > 0).length);
  const summary = document.getElementById('summary');
  document.body.setAttribute('data-summary-bottom', summary ? Math.round(summary.getBoundingClientRect().bottom) : -1);
  document.body.setAttribute('data-window', window.innerHeight);
});
</script>"""


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it with apt-get)"
)
def test_report_loads_in_headless_chromium(pipeline_run, tmp_path):
    """A real browser: the page loads with no console errors, every image decodes, and the
    findings table is on the first screen (1280x800), as a screenshot shows."""
    import subprocess

    out, _, _ = pipeline_run
    page = tmp_path / "report.html"  # a copy with a probe script; the report itself has none
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK_IMAGES + "</body>"))
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--window-size=1280,800",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'data-images="(\d+)" data-rendered="(\d+)"', proc.stdout)
    assert found, proc.stdout[:500]
    total, rendered = int(found.group(1)), int(found.group(2))
    assert total >= 7 and rendered == total
    bottom = int(re.search(r'data-summary-bottom="(-?\d+)"', proc.stdout).group(1))
    window = int(re.search(r'data-window="(\d+)"', proc.stdout).group(1))
    assert 0 < bottom <= window, f"the findings table ends at {bottom} px, below the first screen ({window} px)"
    shot = tmp_path / "first-screen.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"]
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", (out / "report.html").as_uri()], timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 800) and len(set(image.convert("L").getdata())) > 10  # not a blank page
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


def test_list_shows_finished_failed_locked_and_half_done_runs(pipeline_run, tmp_path):
    """`hspace list`: one row per run folder (nested ones included), each stage's state,
    running ones with their lock owner, the leakage headline; fast, and no Prefect."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from hspace.data.catalog import RunFolder

    out, _, _ = pipeline_run
    root = tmp_path / "runs"
    shutil.copytree(out, root / "finished", ignore=shutil.ignore_patterns("*.zarr", "figures", ".prefect-results"))
    for name, stage_state, lock_pid in [
        ("scheduled/failed", "failed", None),
        ("locked", "running", os.getpid()),  # a live owner
        ("half", None, None),
    ]:
        shutil.copytree(root / "finished", root / name)
        meta = RunFolder(root / name).read()
        for stage in ("evaluate", "figures", "report"):
            meta["stages"].pop(stage)
        if stage_state:
            meta["stages"]["evaluate"] = {"state": stage_state}
        RunFolder(root / name).write(meta)
        (root / name / "eval" / "summary.json").unlink()
        if lock_pid:
            (root / name / ".lock").write_text(
                json.dumps({"pid": lock_pid, "host": socket.gethostname(), "started": "now", "command": "hspace run"})
            )
    result = hspace("list", root, "--json")
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.output)}
    assert set(entries) == {"finished", "failed", "locked", "half"}
    assert entries["finished"]["state"] == "complete" and entries["finished"]["n"] == 16
    assert entries["finished"]["leakage"]["offdiagonal"] > 0
    assert entries["failed"]["state"] == "failed" and entries["failed"]["stages"]["evaluate"] == "failed"
    assert entries["locked"]["state"] == f"running (pid {os.getpid()} on {socket.gethostname()})"
    assert entries["locked"]["stages"]["evaluate"].startswith("running (pid")
    assert entries["half"]["state"] == "incomplete" and entries["half"]["stages"]["report"] == "pending"
    assert entries["half"]["stages"]["pca"] == "done" and entries["half"]["leakage"] is None
    table = hspace("list", root).output
    assert "finished" in table and "complete" in table and "running" in table and "✓✓✓✓✓✓✓✓" in table

    for i in range(100):  # 100 runs, listed by a fresh process as a user does, without Prefect
        shutil.copytree(root / "half", root / "many" / f"r{i:03d}")
    start = time.time()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "hspace"), "list", str(root / "many"), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},  # a server that is not there
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 100
    in_process = time.time()
    assert hspace("list", root / "many", "--json").exit_code == 0
    assert time.time() - in_process < 1.0  # the listing itself; the process above also imports torch-free CLI code
    assert "prefect" not in proc.stderr.lower(), proc.stderr
    print(f"hspace list of 100 runs: {in_process - start:.2f} s as a process")


@pytest.mark.slow
def test_every_file_a_stage_writes_is_declared(prefect_server, model_dir, oracle_dir, clip_dir, tmp_path, monkeypatch):
    """Each pipeline stage of a small toy run (every figure on, the Jacobian and Fig. 8 too), run
    one at a time through the runner: every file it creates or changes lies inside an artifact
    its declaration names (``outputs``); the runner's own run.json is the only exception. A
    stage that writes somewhere else fails here.
    And the U-Net passes each stage makes (rows through the U-Net's forward, counted) are the
    cost its declaration gives `--plan`, the Jacobian's iterations (which stop at a tolerance)
    aside."""
    import hashlib

    from diffusers import UNet2DModel

    from hspace.data.catalog import ARTIFACTS, RunFolder
    from hspace.data.toy.train_diffae import DiffAERecipe, train_diffae
    from hspace.flows.runner import execute
    from hspace.tasks.check import unet_passes
    from hspace.tasks.config import (
        ClipEditsSection,
        CompareSection,
        DiffAESection,
        LatentSvdSection,
        LayersSection,
        load_config,
    )
    from hspace.tasks.stages import Context, creating_stage, pipeline_stages, registry

    cfg = load_config(write_config(tmp_path / "run.yaml", model_dir, oracle_dir))
    cfg.compare = CompareSection(n=3, calibration_n=3, evaluator=f"oracle:{oracle_dir}")
    cfg.latent_svd = LatentSvdSection(k=2, probe_n=2, probe_indices=1, evaluator=f"oracle:{oracle_dir}")
    cfg.sample.store_xt = True
    cfg.layers = LayersSection(points=["down_blocks.1", "mid_block"], attributes=["Smiling"], samples=8, components=1,
                               n=2, calibration_n=2, evaluator=f"oracle:{oracle_dir}")  # fmt: skip
    cfg.clip_edits = ClipEditsSection(
        prompt_pairs={"Smiling": ("a person", "a smiling person")}, clip=str(clip_dir), samples=4, held_out=2,
        epochs=1, basis=2, evaluator=f"oracle:{oracle_dir}",
    )  # fmt: skip
    tiny_ae = {"batch_size": 4, "latent_n": 32, "encoder_channels": (8, 8, 8), "block_out_channels": (8, 16, 16),
               "attention": False, "z_dim": 16, "image_size": 16, "steps": 1, "latent_steps": 1}  # fmt: skip
    train_diffae(tmp_path / "ae-ck", tmp_path / "ae", DiffAERecipe(**tiny_ae), report=lambda line: None)
    run = RunFolder(tmp_path / "run")
    ctx = Context(device="cpu", show_progress=False)

    def files() -> dict[str, str]:
        return {
            str(p.relative_to(run.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run.root.rglob("*")
            if p.is_file()
        }

    passes, forward = {"rows": 0}, UNet2DModel.forward

    def counted(self, sample, *args, **kwargs):
        passes["rows"] += int(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    from hspace.tasks import jacobian

    def jacobian_alone(*args, run=jacobian.run_jacobian, **kwargs):
        before = passes["rows"]
        result = run(*args, **kwargs)
        passes["iterations"] = passes["rows"] - before  # the Jacobian's own: it stops at a tolerance
        return result

    monkeypatch.setattr(jacobian, "run_jacobian", jacobian_alone)

    creating_stage().make_run(run, cfg, ctx)
    seen, made = {}, {}
    for name in pipeline_stages():
        stage = registry()[name]
        if name == "diffae":  # the tiny oracle's scores split at their median: labels of both kinds
            import numpy as np

            from hspace.tasks import diffae

            real = diffae.labels
            monkeypatch.setattr(diffae, "labels", lambda *a, real=real: (s := real(*a)) - np.median(s, 0) + 0.5 - 1e-6)
            cfg.diffae = DiffAESection(model=str(tmp_path / "ae"), attributes=["Smiling"], samples=8, steps=2, k=[2],
                                       held_out=2, evaluator=f"oracle:{oracle_dir}", pada_attribute="Male",
                                       clip=str(clip_dir), pada_texts=("a woman", "a man"), pada_steps=2)  # fmt: skip
        before = files()
        passes |= {"rows": 0, "iterations": 0}
        monkeypatch.setattr(UNet2DModel, "forward", counted)
        execute(run, stage, cfg, ctx, force=True)
        monkeypatch.setattr(UNet2DModel, "forward", forward)
        made[name] = passes["rows"] - passes["iterations"]
        after = files()
        written = sorted(f for f in after if before.get(f) != after[f] and f != ARTIFACTS["run_json"][0])
        allowed = [ARTIFACTS[a][0] for a in stage.outputs]
        stray = [f for f in written if not any(f == a or f.startswith(a + "/") for a in allowed)]
        assert not stray, f"stage {name} wrote outside its declaration {allowed}: {stray}"
        seen[name] = written
    assert any(f.startswith("jacobian.zarr/") for f in seen["jacobian_figure"])  # Fig. 7 ran: the check saw it
    # every stage wrote something; but avi, which edits toward a prompt and so refuses this pixel
    # model (its writes, directions/avi/, are checked on toy-sd by tests/test_avi.py)
    assert all(seen[s] for s in pipeline_stages() if s != "avi")
    bound = unet_passes(cfg)
    assert 0 < made.pop("compare") <= bound.pop("compare")  # calibrations stop when they reach the target
    assert made == bound
    assert all(made[s] for s in ("sample", "evaluate", "pc_names", "jacobian_figure", "efficiency", "figures"))
