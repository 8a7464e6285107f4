"""The warm worker (flows/warm_worker.py) as users meet it: `hspace server start` starts it,
the `hspace` console script hands it a stage command, which runs with the client's terminal,
folder and environment and is recorded in Prefect like any other; bad input still gives one
line and exit 2; another environment runs in its own process and says so; a killed client
stops its command and frees the run's lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hspace.flows import warm_worker
from hspace.flows.cli import app

runner = CliRunner()
HSPACE = str(Path(sys.executable).with_name("hspace"))


def timed(*args, env=None):
    t0 = time.perf_counter()
    done = subprocess.run([HSPACE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    return done, time.perf_counter() - t0


@pytest.mark.slow
def test_warm_worker_runs_stage_commands(prefect_server, tmp_path):
    run = tmp_path / "run"
    args = ("--model", "toy", "--n", "16", "--steps", "4", "--batch-size", "16", "--device", "cpu", "--out", str(run))
    assert runner.invoke(app, ["sample", *args]).exit_code == 0
    assert runner.invoke(app, ["annotate", str(run), "--device", "cpu"]).exit_code == 0
    started = subprocess.run([HSPACE, "server", "start"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0 and "warm worker (pid" in started.stdout, started.stdout + started.stderr
    try:
        command = ("directions", run, "--attribute", "Smiling", "--top", "4", "--held-out", "4", "--device", "cpu")
        warm, warm_s = timed(*command)
        assert warm.returncode == 0 and "directions: done" in warm.stdout, warm.stdout + warm.stderr
        log = Path(warm_worker.status()["log"]).read_text()
        assert "exit 0" in log and "hspace directions" in log  # it ran in the worker
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        with get_client(sync_client=True) as client:  # recorded in Prefect like any command
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{run} directions"]))
            )
        assert runs and all(r.state.is_completed() for r in runs), runs
        cold, cold_s = timed(*command, env={**os.environ, "HSPACE_NO_WORKER": "1"})
        assert cold.returncode == 0, cold.stderr
        print(f"hspace directions: {warm_s:.2f} s in the warm worker, {cold_s:.2f} s in its own process")
        assert warm_s < cold_s
        assert (run / "directions" / "Smiling.safetensors").exists()
        bad, _ = timed("directions", run, "--attribute", "Nope", "--held-out", "4")
        assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        other, _ = timed(*command, env={**os.environ, "HSPACE_SOMETHING": "1"})
        assert other.returncode == 0 and "another environment; running here" in other.stderr
        # a client killed mid-command: its command stops and the run's lock is released
        proc = subprocess.Popen(
            [HSPACE, "pca", str(run), "--components", "2", "--device", "cpu"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while time.time() < deadline and not (run / ".lock").exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 60
        while time.time() < deadline and (run / ".lock").exists():
            time.sleep(0.2)
        assert not (run / ".lock").exists(), "the killed client's command kept the lock"
    finally:
        warm_worker.stop_worker()
    assert warm_worker.status() is None
