"""A warm worker: `hspace` commands in a process that has imported torch, diffusers, Prefect
and hspace once, so a short stage command costs its work plus Prefect's flow engine, not
three seconds of imports (like a build tool's daemon).

`hspace server start` starts it beside the standing Prefect server; `hspace server stop` ends
both. The worker serves only its owner: it listens on a Unix socket of mode 0600 in a folder
of mode 0700 (``$PREFECT_HOME/hspace-worker.d``, whatever the umask), checks every peer's uid
(SO_PEERCRED) and refuses any other with one line in its log; a client checks the same of
the worker before it sends anything. For each command the client (the
`hspace` console script) sends its argv, working folder and environment, and passes its own
stdin, stdout and stderr (SCM_RIGHTS), so output, progress bars and colours reach the user's
terminal as they would from a local process; the worker forks, the child runs the command
and reports its exit code. Ctrl-C and SIGTERM at the client go to the child; a client that
dies (kill -9) closes the socket and the child stops itself, releasing the run's lock.

The worker is used only when it is exactly what the client would run: the same code (every
hspace source file's size and mtime, and the interpreter) and the same environment for
everything that configures it (PREFECT_*, HSPACE_*, HF_*, CUDA_*, TORCH*, OMP_*, MKL_*,
PYTHON*). Otherwise the command runs in its own process as always, with one line saying why.
A command runs in the worker's own environment; of the request's, only those configuring
variables (not PYTHON*, LD_* or PATH) and the terminal's (TERM, COLUMNS, ...) are taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

STATE = "hspace-worker.json"
ENV_PREFIXES = ("PREFECT_", "HSPACE_", "HF_", "CUDA_", "TORCH", "OMP_", "MKL_", "PYTHON")
# what a request's environment may set in the command's (PYTHON* paths, LD_*, PATH never: the
# worker's own, which the fingerprint says equal the client's where it is honest)
REQUEST_PREFIXES = ("PREFECT_", "HSPACE_", "HF_", "CUDA_", "TORCH", "OMP_", "MKL_")
TERMINAL = ("TERM", "COLORTERM", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
PACKAGES = ("hspace", "hspace.hcore", "hspace.data", "hspace.tasks", "hspace.flows")


def _home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def state_path() -> Path:
    return _home() / STATE


def socket_dir() -> Path:
    """The 0700 folder of the worker's socket (created, or checked to be this user's and private)."""
    folder = _home() / "hspace-worker.d"
    try:
        folder.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RuntimeError(f"{folder} is not a folder of yours: delete it (PREFECT_HOME is shared?) and rerun")
    os.chmod(folder, 0o700)
    return folder


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _owned(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def command_env(own: dict, requested: dict) -> dict:
    """The environment a command runs in: the worker's own (``own``, as started) with the
    request's configuring and terminal variables in place of the worker's."""
    env = {k: v for k, v in own.items() if not k.startswith(REQUEST_PREFIXES) and k not in TERMINAL}
    env |= {k: str(v) for k, v in requested.items() if k.startswith(REQUEST_PREFIXES) or k in TERMINAL}
    return env


def code_fingerprint() -> str:
    """The interpreter and every hspace source file (path, size, mtime)."""
    import importlib.util

    digest = hashlib.sha256(sys.executable.encode())
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        for folder in spec.submodule_search_locations or []:
            for path in sorted(Path(folder).glob("*.py")):
                st = path.stat()
                digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def env_key(env) -> dict:
    return {k: v for k, v in sorted(env.items()) if k.startswith(ENV_PREFIXES)}


def status() -> dict | None:
    """The recorded worker ({pid, socket, code, env, log, started, alive}) or None (also where
    the record is not this user's file: another user cannot point commands at their socket)."""
    if not _owned(state_path()):
        return None
    try:
        state = json.loads(state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    try:
        os.kill(int(state["pid"]), 0)
        state["alive"] = True
    except (ProcessLookupError, PermissionError, ValueError):
        state["alive"] = False
    return state


def serve(preload: Callable[[], None], run: Callable[[list[str]], int], log_path: Path) -> None:
    """The worker's loop: import everything once (``preload``), then fork one child per
    request, which runs ``run(argv)`` with the client's terminal, folder and environment."""
    env = env_key(os.environ)  # as started: importing torch sets TORCHINDUCTOR_CACHE_DIR
    own = dict(os.environ)
    preload()
    path = socket_dir() / f"{os.getpid()}.sock"
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # the socket is born 0600, whatever the user's umask
    try:
        server.bind(str(path))
    finally:
        os.umask(umask)
    os.chmod(path, 0o600)
    server.listen(16)
    me = os.getuid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children report their exit code themselves
    state = {"pid": os.getpid(), "socket": str(path), "code": code_fingerprint(), "env": env}
    state |= {"log": str(log_path), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = state_path().with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)  # it lists the environment
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    os.replace(tmp, state_path())

    def stop(*_):
        path.unlink(missing_ok=True)
        if status() and status()["pid"] == os.getpid():
            state_path().unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        conn, _ = server.accept()
        try:
            uid = peer_uid(conn)
        except OSError:
            conn.close()
            continue
        if uid != me:  # nothing is read from another user, let alone run
            with open(log_path, "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} refused a connection from uid {uid}: this worker serves "
                          f"only uid {me}\n")  # fmt: skip
            conn.close()
            continue
        try:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(message.decode())
        except (OSError, ValueError):
            conn.close()
            continue
        if os.fork() == 0:
            server.close()
            _child(conn, fds, request, run, log_path, own)
        conn.close()
        for fd in fds:
            os.close(fd)


def _child(conn: socket.socket, fds: list[int], request: dict, run, log_path: Path, own: dict) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.chdir(request["cwd"])
    env = command_env(own, request["env"])
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["hspace", *request["argv"]]
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")

    finished = threading.Event()

    def watch() -> None:  # the client went away (kill -9): stop as Ctrl-C would
        if conn.recv(1) == b"" and not finished.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    t0, code = time.time(), 1
    try:
        code = run(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001  (reported to the user's terminal, then the code)
        import traceback

        traceback.print_exc()
    finally:
        finished.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command is over: nothing may interrupt the report
        import atexit

        try:
            atexit._run_exitfuncs()  # what a normal exit does: Prefect drains its log and event workers
        except Exception:  # noqa: BLE001
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        with open(log_path, "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} pid {os.getpid()} exit {code} in {time.time() - t0:.2f} s: "
                      f"hspace {' '.join(request['argv'])}\n")  # fmt: skip
        try:
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass
        os._exit(code)


def run_remote(argv: list[str]) -> int | None:
    """Run ``argv`` in the warm worker; None where there is none, or it is not exactly what
    this process would run (then the caller runs the command itself)."""
    state = status()
    if not state or not state["alive"]:
        return None
    if state["env"] != env_key(os.environ):
        print("hspace: the warm worker has another environment; running here", file=sys.stderr)
        return None
    if state["code"] != code_fingerprint():
        print("hspace: hspace changed since the warm worker started (`hspace server stop` ends it); running here",
              file=sys.stderr)  # fmt: skip
        return None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(state["socket"])
        if peer_uid(client) != os.getuid():  # the terminal and environment go to our own worker only
            print(f"hspace: the warm worker's socket {state['socket']} is not served by you; running here",
                  file=sys.stderr)  # fmt: skip
            return None
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(client, [json.dumps(request).encode()], [0, 1, 2])
    except OSError:
        return None
    reader = client.makefile("rb")
    first = reader.readline()
    if not first:
        return None
    child = int(json.loads(first)["pid"])
    forward = lambda sig, _frame: _signal(child, sig)  # noqa: E731
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    line = reader.readline()
    if not line:
        print("hspace: the warm worker's process for this command died", file=sys.stderr)
        return 1
    return int(json.loads(line)["exit"])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def start_worker(timeout: float = 120.0) -> dict:
    """Start the warm worker for this PREFECT_HOME (or return the running one) and wait until
    it has imported everything and listens."""
    import subprocess

    current = status()
    if current and current["alive"]:
        return current
    from hspace.flows.prefect_server import private_home

    private_home()
    socket_dir()  # a folder that is not ours is refused here, before anything starts
    log = _home() / "hspace-worker.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hspace.flows.entry", "--warm-worker"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = status()
        if current and current["pid"] == proc.pid and Path(current["socket"]).exists():
            return current
        if proc.poll() is not None:
            raise RuntimeError(f"the warm worker exited while starting; see {log}")
        time.sleep(0.2)
    raise RuntimeError(f"the warm worker did not start within {timeout:.0f} s; see {log}")


def stop_worker() -> dict | None:
    """Stop the warm worker (commands it is running finish on their own)."""
    current = status()
    if current is None:
        return None
    if current["alive"]:
        _signal(int(current["pid"]), signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and status() is not None:
            time.sleep(0.1)
    state_path().unlink(missing_ok=True)
    return current
