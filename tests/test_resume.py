"""Kill `hspace sample` (SIGKILL to its whole process group, so the ephemeral Prefect server
it started dies with it) in the middle of a run, resume with the same command, and compare
with an uninterrupted run: identical arrays, no shard marked done that is not complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from hspace.data.stores import SampleStore
from hspace.flows.cli import app
from hspace.tasks.stages import pipeline_stages

ARGS = ["--n", "96", "--steps", "30", "--batch-size", "4", "--device", "cpu", "--eta", "1.0", "--seed", "5"]


def hspace_cmd() -> list[str]:
    return [sys.executable, "-m", "hspace.flows.cli"]


def done_count(run: Path) -> int:
    try:
        return int((zarr.open_array(run / "samples.zarr" / "done", mode="r")[:] == 1).sum())
    except Exception:  # not created yet
        return 0


def kill_9_once(cmd: list[str], env: dict, ready, timeout: float = 240) -> subprocess.Popen:
    """Start ``cmd`` in its own process group and SIGKILL the whole group (its ephemeral
    Prefect server included) as soon as ``ready()`` holds (or it exits, or ``timeout``)."""
    victim = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    return victim


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float = 300) -> tuple[int, str]:
    """Run in a new process group with output to a file (a lingering server child holding a
    pipe would hang the caller); kill the whole group afterwards."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return code, log.read_text()


@pytest.mark.slow
def test_kill_and_resume_yields_identical_arrays(prefect_server, model_dir, tmp_path):
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below: bitwise equality needs the same reduction order
    try:
        result = CliRunner().invoke(app, ["sample", "--model", str(model_dir), *ARGS, "--out", str(reference)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output

    run = tmp_path / "victim"
    # one torch thread: with 2 cores shared by pytest and two Prefect servers, OpenMP's
    # spinning barriers make a 2-thread child crawl
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # the victim finds the suite's standing server, as a user's command would
    cmd = [*hspace_cmd(), "sample", "--model", str(model_dir), *ARGS, "--out", str(run)]
    victim = kill_9_once(cmd, env, lambda: done_count(run) >= 3)
    killed_at = done_count(run)
    assert 3 <= killed_at < 24, f"kill came too late or too early ({killed_at} of 24 shards done)"

    store = SampleStore(run / "samples.zarr")
    h = store.h[:]
    for k in store.done_shards():  # a shard marked done is complete
        assert not np.isnan(h[4 * k : 4 * k + 4].astype(np.float32)).any()

    # the dead process's lock is provably stale (same host, no such pid): the same command resumes
    resumed = run_logged([*cmd], env, tmp_path / "resume.log")
    assert resumed[0] == 0, resumed[1][-3000:]
    assert f"took over the lock of pid {victim.pid}" in resumed[1] and "no longer running" in resumed[1]

    ref, got = SampleStore(reference / "samples.zarr"), SampleStore(run / "samples.zarr")
    assert got.complete()
    for name in ("h", "x0", "seeds", "timesteps"):
        np.testing.assert_array_equal(getattr(got, name)[:], getattr(ref, name)[:], err_msg=name)


@pytest.mark.slow
def test_kill_9_during_hspace_run_and_a_plain_rerun_finishes(tmp_path, model_dir):
    """`hspace run` killed by SIGKILL mid-pipeline: rerunning the same command takes over the
    dead process's lock (one warning line naming its pid) and finishes every stage."""
    import json

    import yaml

    from hspace.data.annotators import save_oracle
    from hspace.data.toy import faces as toyfaces
    from hspace.hcore.annotators import OracleNet

    torch.manual_seed(2)
    oracle = save_oracle(
        OracleNet(list(toyfaces.BINARY_ATTRIBUTES), list(toyfaces.POSE_ATTRIBUTES), width=8).eval(), tmp_path / "o"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device": "cpu",
                "sample": {"model": str(model_dir), "n": 48, "steps": 20, "batch_size": 4},
                "annotate": {"annotators": [f"oracle:{oracle}"]},
                "pca": {"components": 2},
                "directions": {"attributes": ["Smiling"], "top": 4, "held_out": 4},
                "evaluate": {"evaluator": f"oracle:{oracle}", "n": 2},
                "figures": {"pcs": 1, "name_samples": 0, "scales": [0, 1], "efficiency": False, "jacobian": False},
            }
        )
    )
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = [*hspace_cmd(), "run", "--config", str(config), "--out", str(run)]
    victim = kill_9_once(cmd, env, lambda: done_count(run) >= 2)
    assert (run / ".lock").exists() and done_count(run) < 12, "the kill came after sampling"
    code, output = run_logged(cmd, env, tmp_path / "rerun.log")
    assert code == 0, output[-3000:]
    assert f"took over the lock of pid {victim.pid}" in output and "no longer running" in output
    meta = json.loads((run / "run.json").read_text())
    assert all(meta["stages"][s]["state"] == "done" for s in pipeline_stages()) and (run / "report.html").exists()
    assert not (run / ".lock").exists()
