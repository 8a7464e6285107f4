"""A standing local Prefect server that every `hspace` command finds and reuses.

Without one, each command that runs a flow starts Prefect's ephemeral API server (a uvicorn
subprocess): 9-25 s before a stage whose work may take one (STACK_NOTES.md). hspace keeps
one `prefect server start` per PREFECT_HOME instead, on a free loopback port, recorded in
``$PREFECT_HOME/hspace-server.json``; `hspace server start|status|stop` manage it and the
first command that needs Prefect starts it (one line says so). Flow and task runs are
recorded in it as they would be in the ephemeral one, and its UI shows them.

PREFECT_API_URL set by the user always wins: hspace then uses that server and starts none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from hspace.data.catalog import RunError

STATE = "hspace-server.json"
START_TIMEOUT = float(os.environ.get("HSPACE_SERVER_START_TIMEOUT", "120"))


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _state_path() -> Path:
    return prefect_home() / STATE


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``url`` (…/api) answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status() -> dict | None:
    """The recorded standing server ({pid, url, log, started, healthy}) or None."""
    try:
        state = json.loads(_state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    state["alive"] = _alive(int(state.get("pid", 0)))
    state["healthy"] = state["alive"] and healthy(state["url"])
    return state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(timeout: float = START_TIMEOUT) -> dict:
    """Start the standing server (or return the running one) and wait until it answers."""
    current = status()
    if current and current["healthy"]:
        return current
    if current and current["alive"]:  # recorded and starting (another command started it): wait for it
        return _wait(current, timeout)
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    claim = home / (STATE + ".starting")
    try:  # one starter at a time: two commands racing must not start two servers
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except FileExistsError:
        if time.time() - claim.stat().st_mtime > timeout:  # a starter that died
            claim.unlink(missing_ok=True)
            return start(timeout)
        deadline = time.time() + timeout
        while time.time() < deadline:
            current = status()
            if current and current["healthy"]:
                return current
            time.sleep(0.5)
        raise RunError(
            f"another command is starting the Prefect server in {home} and it did not answer; see its log"
        ) from None
    try:
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        log = home / "hspace-server.log"
        prefect = Path(sys.executable).parent / "prefect"
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stop() ends it whole, Ctrl-C here does not
            )
        state = {"pid": proc.pid, "url": url, "log": str(log), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = _state_path().with_suffix(".partial")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, _state_path())
        return _wait(state, timeout)
    finally:
        claim.unlink(missing_ok=True)


def _wait(state: dict, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if healthy(state["url"]):
            return {**state, "alive": True, "healthy": True}
        if not _alive(int(state["pid"])):
            _state_path().unlink(missing_ok=True)
            raise RunError(f"the Prefect server exited while starting; its log: {state['log']}")
        time.sleep(0.3)
    raise RunError(
        f"the Prefect server (pid {state['pid']}) did not answer at {state['url']} within {timeout:.0f} s; "
        f"see {state['log']}, or `hspace server stop` and retry"
    )


def stop() -> dict | None:
    """Stop the standing server (its whole process group); None if none was recorded."""
    current = status()
    if current is None:
        return None
    pid = int(current["pid"])
    if current["alive"]:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.time() + 15
        while time.time() < deadline and _alive(pid):
            _reap(pid)
            time.sleep(0.2)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _state_path().unlink(missing_ok=True)
    return current


def _reap(pid: int) -> None:
    try:  # our own child (started by this process): collect it so it does not linger as a zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _prefect_already_configured() -> bool:
    """A Prefect API chosen by the user (PREFECT_API_URL) or by a settings context already
    entered in this process (a notebook, a test harness)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        return bool(get_current_settings().api.url)
    return False


def use_standing_server(console=None) -> str | None:
    """Point this process's Prefect client at the standing server, starting it on first
    need; call before the first flow run. Returns its URL (None where the user's
    PREFECT_API_URL or an entered settings context decides)."""
    if _prefect_already_configured():
        return None
    current = status()
    if not (current and current["healthy"]):
        if console is not None:
            console.print("starting a local Prefect server for hspace (once; `hspace server stop` stops it) ...")
        current = start()
        if console is not None:
            console.print(f"Prefect server at {current['url'].removesuffix('/api')} (pid {current['pid']})")
    os.environ["PREFECT_API_URL"] = current["url"]
    return current["url"]


@contextmanager
def prefect_api(console=None):
    """Flow runs inside this block record to the standing server (``use_standing_server``),
    also in a process that imported Prefect before (a notebook): Prefect reads
    PREFECT_API_URL when it is imported, so the URL is also entered as a settings context."""
    url = use_standing_server(console)
    if url is None:
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
