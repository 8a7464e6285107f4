"""A standing local Prefect server that every `hspace` command finds and reuses.

Without one, each command that runs a flow starts Prefect's ephemeral API server (a uvicorn
subprocess): 9-25 s before a stage whose work may take one. hspace keeps
one `prefect server start` per PREFECT_HOME instead, on a free loopback port, recorded in
``$PREFECT_HOME/hspace-server.json``; `hspace server start|status|stop` manage it and the
first command that needs Prefect starts it (one line says so). Flow and task runs are
recorded in it as they would be in the ephemeral one, and its UI shows them.

The server asks for a credential (Prefect's basic auth, ``server.api.auth_string``): a random
string written at first start to ``$PREFECT_HOME/hspace-server.auth`` with mode 0600 (the folder
made 0700 when hspace creates it); every hspace process sends it as ``api.auth_string``. Another
local user can reach the port but gets 401 on every API endpoint (the UI's data included). The
files hspace trusts in PREFECT_HOME (state, credential) must belong to the user running it.

PREFECT_API_URL set by the user always wins: hspace then uses that server, starts none, and
leaves its authentication to the user's Prefect settings (docs/operations.md).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from hspace.data.catalog import RunError, pid_alive

STATE = "hspace-server.json"
AUTH = "hspace-server.auth"  # the server's credential, "hspace:<random>", mode 0600
START_TIMEOUT = float(os.environ.get("HSPACE_SERVER_START_TIMEOUT", "120"))


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _state_path() -> Path:
    return prefect_home() / STATE


def private_home() -> Path:
    """PREFECT_HOME, created with mode 0700 (whatever the umask) where hspace creates it; a
    folder that exists is left as the user made it (`hspace server start` warns when others
    may write into it)."""
    home = prefect_home()
    if not home.exists():
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(home, 0o700)
    return home


def check_owned(path: Path, private: bool) -> None:
    """RunError unless ``path`` is a regular file of this user (and, with ``private``, one
    that nobody else may read or write): hspace never trusts a state file or credential that
    another user could have put into a shared PREFECT_HOME."""
    st = os.lstat(path)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    elif private and st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}: others may read it"
    if problem:
        raise RunError(
            f"{path} {problem}; hspace trusts only its own files in PREFECT_HOME: delete it (and point "
            "PREFECT_HOME at a folder only you can write), then rerun"
        )


def auth_string() -> str:
    """The standing server's credential: read from ``$PREFECT_HOME/hspace-server.auth``,
    created there at first need (mode 0600, written whole before it appears: a racing
    command reads the winner's)."""
    path = private_home() / AUTH
    if not os.path.lexists(path):
        tmp = path.with_name(f"{AUTH}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"hspace:{secrets.token_urlsafe(32)}\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another command made it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    check_owned(path, private=True)
    value = path.read_text().strip()
    if not value:
        raise RunError(f"{path} is empty; delete it and run `hspace server stop`, then rerun")
    return value


def auth_header(auth: str) -> dict[str, str]:
    """The HTTP header Prefect's basic auth expects for ``auth``."""
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def healthy(url: str, timeout: float = 2.0, auth: str | None = None) -> bool:
    """Whether the Prefect API at ``url`` (…/api) answers (with ``auth``: an authenticated
    endpoint, so a server that is not ours, or not yet serving its API, does not count)."""
    path, headers = ("/admin/version", auth_header(auth)) if auth else ("/health", {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def status() -> dict | None:
    """The recorded standing server ({pid, url, log, started, auth, alive, healthy}) or None;
    healthy: it answers an authenticated request with this PREFECT_HOME's credential."""
    path = _state_path()
    if not os.path.lexists(path):
        return None
    check_owned(path, private=False)
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    state["alive"] = pid_alive(int(state.get("pid", 0)))
    auth = auth_string() if state.get("auth") else None
    state["healthy"] = state["alive"] and bool(auth) and healthy(state["url"], auth=auth)
    return state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(timeout: float = START_TIMEOUT) -> dict:
    """Start the standing server (or return the running one) and wait until it answers."""
    current = status()
    if current and current["alive"] and not current.get("auth"):
        stop()  # started by an hspace without credentials: anyone on this machine could use it
        current = None
    if current and current["healthy"]:
        return current
    if current and current["alive"]:  # recorded and starting (another command started it): wait for it
        return _wait(current, timeout)
    home = private_home()
    auth = auth_string()
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
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth  # every API endpoint asks for it (basic auth)
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
        state["auth"] = AUTH  # the credential's file name in PREFECT_HOME (never the credential)
        tmp = _state_path().with_suffix(".partial")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, _state_path())
        return _wait(state, timeout)
    finally:
        claim.unlink(missing_ok=True)


def _wait(state: dict, timeout: float) -> dict:
    deadline = time.time() + timeout
    auth = auth_string()
    while time.time() < deadline:
        if healthy(state["url"], auth=auth):
            return {**state, "alive": True, "healthy": True}
        if not pid_alive(int(state["pid"])):
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
        while time.time() < deadline and pid_alive(pid):
            _reap(pid)
            time.sleep(0.2)
        if pid_alive(pid):
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
    need; call before the first flow run. Its URL and credential go into this process's
    environment (PREFECT_API_URL, PREFECT_API_AUTH_STRING), which the processes it starts
    (a schedule's flow runs) inherit. Returns its URL (None where the user's PREFECT_API_URL
    or an entered settings context decides)."""
    if _prefect_already_configured():
        return None
    current = status()
    if not (current and current["healthy"]):
        if console is not None:
            if current and current["alive"] and not current.get("auth"):
                pid = current["pid"]
                console.print(f"restarting the Prefect server (pid {pid}): it was started without a credential")
            console.print("starting a local Prefect server for hspace (once; `hspace server stop` stops it) ...")
        current = start()
        if console is not None:
            console.print(f"Prefect server at {current['url'].removesuffix('/api')} (pid {current['pid']})")
    os.environ["PREFECT_API_URL"] = current["url"]
    os.environ["PREFECT_API_AUTH_STRING"] = auth_string()
    return current["url"]


def client_settings(url: str) -> dict:
    """The Prefect settings (objects -> values) that make a client use the standing server at
    ``url`` with its credential."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    return {PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth_string()}


@contextmanager
def prefect_api(console=None):
    """Flow runs inside this block record to the standing server (``use_standing_server``),
    also in a process that imported Prefect before (a notebook): Prefect reads its settings
    when it is imported, so the URL and credential are also entered as a settings context."""
    url = use_standing_server(console)
    if url is None:
        yield None
        return
    from prefect.settings import temporary_settings

    with temporary_settings(updates=client_settings(url)):
        yield url
