"""`hspace schedule` end to end, as a user runs it: a real `prefect server start` on
loopback (its scheduler loop shortened through Prefect's own setting), `hspace schedule`
serving a small config every few seconds, at least two scheduled runs completing into
their own folders, runs never overlapping (concurrency 1), then SIGTERM stops serving
with one line and pauses the schedule. In-process flow tests cannot see a server whose
scheduler never fires (SQLAlchemy 2.1 beside Prefect 3.8.8 did exactly that)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from hspace.data.catalog import RunError, RunFolder
from hspace.data.runs import prune_runs, run_state
from hspace.tasks.stages import pipeline_stages

pytestmark = pytest.mark.slow
HSPACE = Path(sys.executable).parent / "hspace"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, f"{p.args[:3]} exited with {p.returncode} while waiting for {what}"
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> tuple[str, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args[:3]} did not stop within {timeout} s after {sig!r}:\n{out}\n{err}") from None
    return out, err


@pytest.fixture
def small_config(tmp_path, model_dir) -> Path:
    from hspace.data.annotators import save_oracle
    from hspace.data.toy import faces as toyfaces
    from hspace.hcore.annotators import OracleNet

    torch.manual_seed(2)
    net = OracleNet(list(toyfaces.BINARY_ATTRIBUTES), list(toyfaces.POSE_ATTRIBUTES), width=8).eval()
    oracle = save_oracle(net, tmp_path / "oracle")
    cfg = {
        "device": "cpu",
        "sample": {"model": str(model_dir), "n": 8, "steps": 2, "batch_size": 8},
        "annotate": {"annotators": [f"oracle:{oracle}"]},
        "pca": {"components": 2},
        "directions": {"attributes": ["Smiling", "Male"], "top": 2, "held_out": 2},
        "evaluate": {"evaluator": f"oracle:{oracle}", "n": 2},
        "figures": {"pcs": 1, "name_samples": 0, "scales": [0, 1], "efficiency": False, "jacobian": False},
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_scheduled_runs_fire_on_a_real_server_and_sigterm_stops_cleanly(tmp_path, small_config):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",  # Prefect's own setting; default 60
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "OMP_NUM_THREADS": "1",
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    runs = tmp_path / "runs"
    serving = None
    try:

        def healthy() -> bool:
            try:
                return api(url, "/health") is True
            except OSError:
                return False

        wait_for(healthy, 120, "the Prefect server to answer", [server])
        serving = subprocess.Popen(
            [str(HSPACE), "schedule", "--config", str(small_config), "--interval", "12", "--name", "probe"]
            + ["--out-root", str(runs)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

        def complete() -> list[Path]:
            return [p for p in runs.iterdir() if run_state(p) == "complete"] if runs.exists() else []

        wait_for(lambda: len(complete()) >= 2, 150, "two scheduled runs to complete", [server, serving])
        # a scheduled run in flight is drained by Prefect's runner before it stops: on a loaded 2-core
        # machine that run alone can take a minute (a CI run once needed more than 60 s)
        out, err = stop(serving, signal.SIGTERM, timeout=180)
        assert "stopped serving probe; the schedule is paused" in out, out + err
        assert "Traceback" not in out + err and "CancelledError" not in out + err, out + err

        for folder in complete()[:2]:
            meta = RunFolder(folder).read()
            assert all(meta["stages"][s]["state"] == "done" for s in pipeline_stages())
            assert (folder / "report.html").exists()
        deployment = api(url, "/deployments/name/hspace-scheduled-run/probe")
        assert deployment["paused"] is True
        assert deployment["concurrency_limit"] == 1 or deployment["global_concurrency_limit"]["limit"] == 1
        flow_runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
        done = sorted(
            (r["start_time"], r["end_time"]) for r in flow_runs if r["state_type"] == "COMPLETED" and r["start_time"]
        )
        assert len(done) >= 2
        for (_, end), (start, _) in zip(done, done[1:], strict=False):  # concurrency 1: no overlap
            assert start >= end, done
    finally:
        if serving is not None and serving.poll() is None:
            stop(serving, signal.SIGKILL)
        stop(server, signal.SIGTERM)


def make_pipeline_folder(root: Path, name: str, created: str, state: str) -> Path:
    run = RunFolder(root / name)
    meta = run.init({"n": 1}, {"fingerprint": "x"}, {})
    meta["created"] = created
    meta["stages"] = {stage: {"state": "done"} for stage in pipeline_stages()}
    meta["pipeline_config"] = {}
    if state == "failed":
        meta["stages"]["evaluate"]["state"] = "failed"
    run.write(meta)
    if state != "failed":
        (run.root / "report.html").write_text("<html></html>")
    if state == "running":
        (run.root / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return run.root


def test_keep_deletes_only_the_oldest_complete_runs(tmp_path):
    folders = {
        name: make_pipeline_folder(tmp_path, name, created, state)
        for name, created, state in [
            ("a", "2026-01-01T00:00:00", "complete"),
            ("b", "2026-01-02T00:00:00", "failed"),
            ("c", "2026-01-03T00:00:00", "complete"),
            ("d", "2026-01-04T00:00:00", "running"),
            ("e", "2026-01-05T00:00:00", "complete"),
        ]
    }
    assert [run_state(p) for p in folders.values()] == ["complete", "failed", "complete", "running", "complete"]
    assert prune_runs(tmp_path, 2) == [folders["a"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c", "d", "e"]
    assert prune_runs(tmp_path, 1) == [folders["c"]]
    assert prune_runs(tmp_path, 1) == []  # never the only complete one; never failed or running
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "d", "e"]
    with pytest.raises(RunError, match="--keep must be at least 1"):
        prune_runs(tmp_path, 0)
