"""A second local user on the same machine, as on a shared GPU box: `nobody` (through
setpriv, as root, which CI runs as) attacks what the owner's `hspace server start` left
running, with a world-writable PREFECT_HOME and umask 000 (a shared project folder):

- the standing Prefect server: reading, deleting and creating flow runs (and starting a run
  of a deployment) all answer 401; the UI's data endpoints too; the credential file cannot
  be read;
- the warm worker: its socket cannot be reached, and where the owner opens its folder, the
  worker refuses the other uid (SO_PEERCRED) and runs nothing;
and nothing is written anywhere. The second user is plain `/usr/bin/python3` with the
standard library (a venv under /root is not executable for it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from hspace.flows import prefect_server, warm_worker

pytestmark = pytest.mark.slow
HSPACE = str(Path(sys.executable).with_name("hspace"))
NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]

# what the other user runs: each attack as one request, its HTTP status (or the error) printed as JSON
ATTACK_API = r"""
import json, sys, urllib.request, urllib.error
url, run_id, deployment_id = sys.argv[1:4]
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return [r.status, r.read().decode()[:20000]]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode()[:200]]
out = {
    "read": call("POST", "/flow_runs/filter", {}),
    "read_one": call("GET", f"/flow_runs/{run_id}"),
    "delete": call("DELETE", f"/flow_runs/{run_id}"),
    "create": call("POST", "/flow_runs/", {"flow_id": run_id, "name": "mine"}),
    "run_deployment": call("POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": {}}),
    "ui_data": call("POST", "/ui/flow_runs/history", {"history_start": "2026-01-01T00:00:00Z",
        "history_end": "2027-01-01T00:00:00Z", "history_interval_seconds": 3600}),
    "ui_settings": call("GET", "/admin/settings"),
    "health": call("GET", "/health"),
}
try:
    with urllib.request.urlopen(url.removesuffix("/api") + "/", timeout=10) as r:
        out["ui_shell"] = [r.status, r.read().decode()[:20000]]
except urllib.error.HTTPError as e:
    out["ui_shell"] = [e.code, ""]
try:
    open(sys.argv[4]).read()
    out["credential"] = "read"
except OSError as e:
    out["credential"] = type(e).__name__
print(json.dumps(out))
"""

ATTACK_WORKER = r"""
import json, os, socket, sys
os.umask(0)
path, target = sys.argv[1:3]
request = {"argv": ["sample", "--model", "toy", "--n", "2", "--steps", "2", "--out", target],
           "cwd": "/tmp", "env": {"PATH": "/tmp/evil", "LD_PRELOAD": "/tmp/evil.so", "HSPACE_NO_WORKER": "1"}}
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    client.connect(path)
except OSError as e:
    print(json.dumps({"connected": False, "error": type(e).__name__}))
    sys.exit()
try:
    socket.send_fds(client, [json.dumps(request).encode()], [0, 1, 2])
    answer = client.recv(1000).decode()
except OSError as e:  # the worker hung up first
    answer = ""
print(json.dumps({"connected": True, "answer": answer}))
"""


def as_nobody(script: str, *args: str) -> dict:
    done = subprocess.run(
        [*NOBODY, "/usr/bin/python3", "-c", script, *args], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def owner_api(url: str, auth: str, method: str, path: str, body=None):
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", **prefect_server.auth_header(auth)},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture
def shared_home():
    """A PREFECT_HOME in a world-writable folder (as on a shared project disk), and a private
    folder of the owner (0700) that the other user's request aims at."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as a second local user (CI runs as root)")
    root = Path(tempfile.mkdtemp(prefix="hspace-shared-", dir="/tmp"))
    os.chmod(root, 0o777)
    home = root / "prefect-home"
    home.mkdir(mode=0o777)
    os.chmod(home, 0o777)
    private = Path(tempfile.mkdtemp(prefix="hspace-owner-"))  # 0700
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)
    yield home, private, env
    subprocess.run([HSPACE, "server", "stop"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(private, ignore_errors=True)


def test_another_user_is_refused_by_server_and_worker(shared_home, monkeypatch):
    home, private, env = shared_home
    started = subprocess.run(
        [HSPACE, "server", "start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0),
    )
    assert started.returncode == 0, started.stdout + started.stderr
    monkeypatch.setenv("PREFECT_HOME", str(home))
    state = prefect_server.status()
    assert state and state["healthy"], state
    auth_file = home / prefect_server.AUTH
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600"
    auth, url = prefect_server.auth_string(), state["url"]

    # the owner's history: a flow run whose parameters name a private folder, and a deployment
    flow = owner_api(url, auth, "POST", "/flows/", {"name": "probe-flow"})
    run = owner_api(url, auth, "POST", "/flow_runs/", {"flow_id": flow["id"], "name": "secret-run",
                                                        "parameters": {"out_root": str(private)}})  # fmt: skip
    deployment = owner_api(url, auth, "POST", "/deployments/", {"name": "probe", "flow_id": flow["id"]})

    seen = as_nobody(ATTACK_API, url, run["id"], deployment["id"], str(auth_file))
    for attack in ("read", "read_one", "delete", "create", "run_deployment", "ui_data", "ui_settings"):
        assert seen[attack][0] == 401, (attack, seen[attack])
    assert seen["credential"] == "PermissionError"
    assert seen["health"][0] == 200  # Prefect leaves the health probe open; it tells nothing
    assert "secret-run" not in seen["ui_shell"][1] and str(private) not in seen["ui_shell"][1]
    # the owner's history is intact, and the attempts created nothing
    assert owner_api(url, auth, "GET", f"/flow_runs/{run['id']}")["name"] == "secret-run"
    assert [r["name"] for r in owner_api(url, auth, "POST", "/flow_runs/filter", {})] == ["secret-run"]
    # without the credential the owner's own plain client is refused too: it is the server that asks
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(urllib.request.Request(url + "/flow_runs/filter", data=b"{}", method="POST"))

    # the warm worker: started with umask 000 in a world-writable PREFECT_HOME
    worker = warm_worker.status()
    assert worker and worker["alive"], worker
    sock = Path(worker["socket"])
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700" and oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(warm_worker.state_path().stat().st_mode & 0o777) == "0o600"
    target = private / "run-by-nobody"
    assert as_nobody(ATTACK_WORKER, str(sock), str(target)) == {"connected": False, "error": "PermissionError"}
    # the owner opens the folder and socket to everyone: the worker's own uid check still refuses
    os.chmod(sock.parent, 0o777)
    os.chmod(sock, 0o777)
    try:
        answer = as_nobody(ATTACK_WORKER, str(sock), str(target))
    finally:
        os.chmod(sock.parent, 0o700)
        os.chmod(sock, 0o600)
    assert answer["connected"] is True and answer["answer"] == "", answer
    time.sleep(1)
    assert not target.exists() and not Path("/tmp/run-by-nobody").exists()
    log = Path(worker["log"]).read_text()
    assert f"refused a connection from uid {65534}" in log and "run-by-nobody" not in log
    # the owner's own command still runs in the worker
    done = subprocess.run([HSPACE, "server", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert "answering" in done.stdout, done.stdout + done.stderr


def test_request_environment_is_limited_to_configuring_variables():
    own = {"PATH": "/usr/bin", "HOME": "/home/me", "PYTHONPATH": "/mine", "HSPACE_OLD": "1", "TERM": "dumb"}
    requested = {
        "PATH": "/tmp/evil",
        "LD_PRELOAD": "/tmp/evil.so",
        "LD_LIBRARY_PATH": "/tmp",
        "PYTHONPATH": "/tmp/evil",
        "PYTHONSTARTUP": "/tmp/evil.py",
        "HOME": "/tmp",
        "HSPACE_NO_WORKER": "1",
        "PREFECT_API_URL": "http://x/api",
        "OMP_NUM_THREADS": "2",
        "TERM": "xterm-256color",
        "COLUMNS": "99",
    }
    env = warm_worker.command_env(own, requested)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "PYTHONPATH": "/mine",
        "HSPACE_NO_WORKER": "1",
        "PREFECT_API_URL": "http://x/api",
        "OMP_NUM_THREADS": "2",
        "TERM": "xterm-256color",
        "COLUMNS": "99",
    }


def test_state_and_credential_files_of_another_user_are_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    auth = prefect_server.auth_string()
    path = tmp_path / "home" / prefect_server.AUTH
    assert auth.startswith("hspace:") and len(auth) > 40 and prefect_server.auth_string() == auth
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    os.chmod(path, 0o644)
    from hspace.data.catalog import RunError

    with pytest.raises(RunError, match="has mode 0644: others may read it"):
        prefect_server.auth_string()
    os.chmod(path, 0o600)
    state = tmp_path / "home" / prefect_server.STATE
    state.write_text(json.dumps({"pid": 1, "url": "http://127.0.0.1:9/api", "auth": prefect_server.AUTH}))
    if os.getuid() == 0:  # a state file planted by another user (as root: chown it to nobody)
        os.chown(state, 65534, 65534)
        with pytest.raises(RunError, match="belongs to uid 65534, not to you"):
            prefect_server.status()
        wstate = warm_worker.state_path()
        wstate.write_text(json.dumps({"pid": os.getpid(), "socket": "/tmp/x.sock", "env": {}, "code": ""}))
        os.chown(wstate, 65534, 65534)
        assert warm_worker.status() is None  # commands run in their own process instead
