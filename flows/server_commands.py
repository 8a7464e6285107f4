"""`hspace server start|status|stop`: the standing local Prefect server that hspace commands
reuse (flows/prefect_server.py) and the warm worker that runs them (flows/warm_worker.py)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from hspace.data.catalog import RunError
from hspace.flows.stage_commands import console, err, fail

server_app = typer.Typer(
    no_args_is_help=True,
    help="The standing local Prefect server hspace commands reuse (PREFECT_API_URL, when set, wins), "
    "and the warm worker that runs them without re-importing torch and Prefect.",
)


@server_app.command("start")
def server_start(
    worker: Annotated[bool, typer.Option(help="also start the warm worker (commands skip their imports)")] = True,
) -> None:
    """Start it (in $PREFECT_HOME, on a free loopback port) and wait until it answers."""
    from hspace.flows import prefect_server, warm_worker

    try:
        state = prefect_server.start()
        w = warm_worker.start_worker() if worker else None
    except (RunError, RuntimeError) as e:
        fail(str(e))
    console.print(f"Prefect server at {state['url'].removesuffix('/api')} (pid {state['pid']}, log {state['log']})")
    home = prefect_server.prefect_home()
    console.print(f"it asks for a credential: its UI's login takes the line in {home / prefect_server.AUTH} (yours)")
    mode = home.stat().st_mode & 0o777
    if mode & 0o022:  # others may create and replace files beside the server's database and state
        err.print(
            f"warning: {home} has mode {mode:04o}: other users may write into it; hspace refuses their files, but "
            "keep PREFECT_HOME on a private path (chmod 700 it, or point PREFECT_HOME elsewhere)"
        )
    if w:
        console.print(f"warm worker (pid {w['pid']}, log {w['log']}): commands run without re-importing")


@server_app.command("status")
def server_status() -> None:
    """Say whether it runs, where, and which API the next command will use."""
    from hspace.flows import prefect_server

    if os.environ.get("PREFECT_API_URL"):
        console.print(f"PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): hspace uses that server")
    state = prefect_server.status()
    if state is None:
        console.print(f"no hspace Prefect server in {prefect_server.prefect_home()}; the next command starts one")
        raise typer.Exit(1)
    word = "answering" if state["healthy"] else ("starting or stuck" if state["alive"] else "dead")
    where = state["url"].removesuffix("/api")
    console.print(f"Prefect server at {where}: {word} (pid {state['pid']}, log {state['log']})")
    from hspace.flows import warm_worker

    w = warm_worker.status()
    console.print(f"warm worker: pid {w['pid']}" if w and w["alive"] else "warm worker: not running")
    if not state["healthy"]:
        raise typer.Exit(1)


@server_app.command("stop")
def server_stop() -> None:
    """Stop it (its whole process group) and the warm worker."""
    from hspace.flows import prefect_server, warm_worker

    w = warm_worker.stop_worker()
    if w:
        console.print(f"stopped the warm worker (pid {w['pid']})")
    state = prefect_server.stop()
    console.print(f"stopped the Prefect server (pid {state['pid']})" if state else "no hspace Prefect server ran")
