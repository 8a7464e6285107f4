"""`hspace STAGE` commands, generated from the stage registry (tasks/stages.py): each
declared stage with ``command=True`` gets a command whose options are its config
sections' fields (tasks/config.py) plus the runtime options it takes, and runs through
the one runner (flows/runner.py), as `hspace run` does."""

from __future__ import annotations

import inspect as pyinspect
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from hspace.data.catalog import RunError
from hspace.flows import views
from hspace.tasks.stages import Stage, registry

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, ``error: ...``, and exit ``code`` (2: bad input)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def write_error(e: OSError, out: Path) -> str:
    return f"cannot write to {out}: {e.strerror or e} ({e.filename or out}); free space or fix permissions, then rerun"


RUNTIME = {  # options of stage commands that are not config: no fingerprint includes them
    "device": (str, "auto", "auto, cpu, cuda, cuda:N"),
    "break_lock": (bool, False, "take over a lock held from another host (shared filesystem)"),
    "verbose": (bool, False, "log progress and warnings at INFO level"),
    "dask_address": (str | None, None, "tcp://host:port of a Dask scheduler (the run folder on a shared path)"),
    "allow_download": (bool, False, "let a Hugging Face id download if not cached"),
}


def stage_command(app: typer.Typer, declared: Stage) -> None:
    """Register `hspace STAGE` from the stage's declaration: options generated from its
    config sections (tasks/config.py) plus the runtime options it takes; the values are
    validated by the section models and the stage runs through the runner. A stage that
    creates its run folder takes --out (with its declared default, else required); the
    others take the run folder as their argument."""
    from hspace.flows.options import cli_parameters, config_from_options

    sections = declared.cli_sections or {declared.name: None}
    if declared.create is None:
        run = Annotated[Path, typer.Argument(help="run folder")]
        where = pyinspect.Parameter("run_dir", pyinspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=run)
    else:
        out = Annotated[Path, typer.Option(help="run folder to create (or resume)")]
        default = Path(declared.out_default) if declared.out_default else pyinspect.Parameter.empty
        where = pyinspect.Parameter("out", pyinspect.Parameter.KEYWORD_ONLY, default=default, annotation=out)
    runtime = {k: v for k, v in RUNTIME.items() if k in ("device", "break_lock", "verbose", *declared.runtime)}
    params = [where] + [p for name, fields in sections.items() for p in cli_parameters(name, fields)]
    flags = {"verbose": ("--verbose", "-v")}  # the rest: --name-with-dashes (and --no-... for a bool)
    params += [
        pyinspect.Parameter(
            name,
            pyinspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[kind, typer.Option(*flags.get(name, ()), help=text)],
        )
        for name, (kind, default, text) in runtime.items()
    ]

    def command(**kw) -> None:
        run_dir = kw.pop("out", None) or kw.pop("run_dir")
        views.configure_logging(kw.pop("verbose"))
        rt = {k: kw.pop(k) for k in list(kw) if k in runtime}
        try:
            cfg = config_from_options(kw, {"device": rt["device"], "dask_address": rt.get("dask_address")})
        except RunError as e:
            fail(str(e))
        _run_stage(declared, run_dir, cfg, rt)

    command.__signature__ = pyinspect.Signature(params)
    command.__doc__ = declared.doc
    app.command(declared.name)(command)


def _run_stage(declared: Stage, run_dir: Path, cfg, runtime: dict) -> None:
    from hspace.flows.runner import execute_stage

    try:
        result = execute_stage(declared, run_dir, cfg, runtime)
    except RunError as e:
        fail(str(e))
    except OSError as e:
        fail(write_error(e, run_dir))
    outputs = result.get("outputs", [])
    shown = ", ".join(outputs[:4]) + (f" +{len(outputs) - 4} more" if len(outputs) > 4 else "")
    console.print(f"{declared.name} outputs in [bold]{run_dir}[/]: {shown or '(none)'}; see `hspace inspect {run_dir}`")


def declared_outputs() -> dict[str, list[str]]:
    """stage -> the catalog artifacts it declares (for inspect and verify)."""
    return {s.name: list(s.outputs) for s in registry().values()}
