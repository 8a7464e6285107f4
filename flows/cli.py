"""The ``hspace`` command line.

Every stage command (sample, invert, annotate, pca, name, jacobian, directions,
disentangle, evaluate) is generated from the stage's config section (tasks/config.py):
its options are the section's fields, with their names, defaults, limits and help, and
the values are validated by the section model itself. All of them run through the one
stage runner (flows/runner.py), as `hspace run` does.

Heavy imports (torch, diffusers, prefect) happen inside the commands that need them, so
read-only commands such as ``hspace inspect`` answer in well under two seconds.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from hspace.data.catalog import PIPELINE_STAGES, RunError, RunFolder
from hspace.tasks import views

# Defaults that make Prefect's ephemeral server usable offline and quiet (STACK_NOTES.md);
# set before anything imports prefect. The user's environment wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# third-party deprecation noise (a library's use of torch.jit.script), not the user's business
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find and apply interpretable directions in the h-space of diffusion models.",
)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _write_error(e: OSError, out: Path) -> str:
    return f"cannot write to {out}: {e.strerror or e} ({e.filename or out}); free space or fix permissions, then rerun"


# ------------------------------------------------------------------ generated stage commands

RUNTIME = {  # options of stage commands that are not config: no fingerprint includes them
    "device": (str, "auto", "auto, cpu, cuda, cuda:N"),
    "break_lock": (bool, False, "take over a lock held from another host (shared filesystem)"),
    "verbose": (bool, False, "log progress and warnings at INFO level"),
    "dask_address": (str | None, None, "tcp://host:port of a Dask scheduler (the run folder on a shared path)"),
    "allow_download": (bool, False, "let a Hugging Face id download if not cached"),
}


def stage_command(stage: str) -> None:
    """Register `hspace STAGE` from the stage's declaration: options generated from its
    config sections (tasks/config.py) plus the runtime options it takes; the values are
    validated by the section models and the stage runs through the runner."""
    from hspace.tasks.config import cli_parameters, config_from_options
    from hspace.tasks.stages import STAGES

    declared = STAGES[stage]
    creates, sections = declared.create is not None, declared.cli_sections or {stage: None}
    out = Annotated[Path, typer.Option(help="run folder to create (or resume)")]
    where = pyinspect.Parameter("out", pyinspect.Parameter.KEYWORD_ONLY, default=Path("runs/toy"), annotation=out)
    if not creates or stage == "invert":  # invert needs its new --out; the others take RUN
        run = Annotated[Path, typer.Argument(help="run folder")] if not creates else out
        kind = pyinspect.Parameter.POSITIONAL_OR_KEYWORD if not creates else pyinspect.Parameter.KEYWORD_ONLY
        where = pyinspect.Parameter("run_dir" if not creates else "out", kind, annotation=run)
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
            _fail(str(e))
        _run_stage(stage, run_dir, cfg, rt)

    command.__signature__ = pyinspect.Signature(params)
    command.__doc__ = declared.doc
    app.command(stage)(command)


def _run_stage(stage: str, run_dir: Path, cfg, runtime: dict) -> None:
    from hspace.data import models
    from hspace.flows.runner import in_prefect, stage_flow
    from hspace.tasks.sample import resolve_device
    from hspace.tasks.stages import STAGES, Context

    run, declared = RunFolder(run_dir), STAGES[stage]
    try:
        context = {
            "device": resolve_device(cfg.device),
            "dask_address": runtime.get("dask_address"),
            "allow_download": bool(runtime.get("allow_download")),
        }
        if declared.create is None:
            run.read()  # a clear error for a folder that is not a run, before any lock
        for check in (declared.check, declared.create):  # bad input refused before the lock and Prefect
            if check is not None:
                check(run, cfg, Context(**context), **({"dry": True} if check is declared.create else {}))
        with run.lock(f"hspace {stage} {run_dir}", break_stale=runtime["break_lock"]):
            tag = run.read()["model"].get("fingerprint") if run.exists() else None
            if declared.create is not None:  # the flow run is tagged with the model's fingerprint
                section = cfg.sample if stage == "sample" else cfg.invert
                tag = models.resolve(section.model, allow_download=context["allow_download"]).fingerprint
            flow = in_prefect(stage_flow, run_dir, stage, tag)
            result = flow(str(run_dir), stage, cfg.model_dump(mode="json"), context)
            if "error" in result:
                raise RunError(result["error"])
    except RunError as e:
        _fail(str(e))
    except OSError as e:
        _fail(_write_error(e, run_dir))
    outputs = result.get("outputs", [])
    shown = ", ".join(outputs[:4]) + (f" +{len(outputs) - 4} more" if len(outputs) > 4 else "")
    console.print(f"{stage} outputs in [bold]{run_dir}[/]: {shown or '(none)'}; see `hspace inspect {run_dir}`")


for _stage in ("sample", "invert", "annotate", "pca", "name", "jacobian", "directions", "disentangle", "evaluate"):
    stage_command(_stage)


# ------------------------------------------------------------------------- read-only commands


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show a run's config, stages (fingerprint, time, outputs), arrays and shard states."""
    from hspace.data.runs import inspect_run

    try:
        report = inspect_run(RunFolder(run_dir))
    except RunError as e:
        _fail(str(e))
    console.print_json(json.dumps(report)) if as_json else views.show_run(report, console)


@app.command("list")
def list_runs(
    root: Annotated[Path, typer.Argument(help="folder holding run folders (searched 3 levels deep)")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Every run folder under ROOT: model, size, each stage's state and the headline
    leakage. Reads run.json files only: no Prefect."""
    from hspace.data.runs import find_runs, run_summary

    if not root.is_dir():
        _fail(f"{root} is not a folder; give the folder that holds your run folders (default: runs/)")
    entries = [run_summary(p, PIPELINE_STAGES) for p in find_runs(root)]
    print(json.dumps(entries, indent=2)) if as_json else views.show_runs(entries, root, console)


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    fix: Annotated[
        bool, typer.Option(help="mark damaged sample shards pending so `hspace sample` redoes them")
    ] = False,
) -> None:
    """Read back every chunk (crc32c), marker and direction file; report damage and the remedy."""
    from hspace.data.runs import verify_run

    run = RunFolder(run_dir)
    try:
        if fix:
            run.read()  # never create a lock (or a folder) where there is no run
            with run.lock(f"hspace verify --fix {run_dir}"):
                problems = verify_run(run, fix=True)
        else:
            problems = verify_run(run)
    except RunError as e:
        _fail(str(e))
    if not problems:
        console.print(f"{run_dir}: every chunk, marker and direction file reads back intact")
        return
    console.print(
        views.table(
            f"{len(problems)} problem(s) in {run_dir}",
            ["what", "problem", "remedy"],
            [(p["what"], p["detail"], p["remedy"]) for p in problems],
        )
    )
    raise typer.Exit(1)


@app.command()
def edit(
    run_dir: Annotated[Path | None, typer.Argument(help="run folder to take the sample from")] = None,
    sample_index: Annotated[int | None, typer.Option("--sample", help="index of the sample in RUN")] = None,
    model: Annotated[str | None, typer.Option(help="model, instead of RUN (with --seed)")] = None,
    seed: Annotated[int, typer.Option(help="with --model: run seed (sample 0 of that seed)")] = 0,
    steps: Annotated[int, typer.Option(help="with --model: DDIM steps")] = 20,
    eta: Annotated[float, typer.Option(help="with --model: eta_t of eq. (5) (1: the paper's synthesis)")] = 1.0,
    clip_sample: Annotated[
        str, typer.Option(help="with --model: clamp P_t to [-1, 1]: off (eq. (3)), on, model")
    ] = "off",
    direction: Annotated[list[str], typer.Option(help="FILE or FILE:gamma; repeat for several")] = [],  # noqa: B006
    scales: Annotated[str, typer.Option(help="comma-separated gammas (columns)")] = "-2,-1,0,1,2",
    window: Annotated[str | None, typer.Option(help="S0:S1, steps where the edit is applied")] = None,
    asyrp: Annotated[bool, typer.Option(help="edited eps in P_t only (Asyrp); two passes per step")] = False,
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("edit.png"),
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Replay a sample with the same noise and render a grid of h-space edits."""
    try:
        from hspace.tasks.edit import edit_sample, parse_scales
        from hspace.tasks.sample import resolve_device

        values = parse_scales(scales)
        where = {"run_dir": run_dir, "sample_index": sample_index, "model": model, "seed": seed, "steps": steps}
        how = {"eta": eta, "window": window, "asyrp": asyrp, "clip_sample": clip_sample}
        path = edit_sample(direction, values, out, **where, **how, device=resolve_device(device))
    except RunError as e:
        _fail(str(e))
    console.print(f"grid: [bold]{path}[/]")


# ---------------------------------------------------------------------------- pipeline


@app.command("run")
def run_pipeline(
    config: Annotated[Path | None, typer.Option(help="YAML config (see `hspace config --example`)")] = None,
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/pipeline"),
    dask_address: Annotated[
        str | None, typer.Option(help="Dask scheduler for shards and PCA (overrides the config)")
    ] = None,
    break_lock: Annotated[
        bool, typer.Option(help="take over a lock held from another host (shared filesystem)")
    ] = False,
    plan: Annotated[
        bool,
        typer.Option(help="check the config; print the stages, UNet passes, disk and time it takes; write nothing"),
    ] = False,
) -> None:
    """The whole pipeline as one Prefect flow of cached stages: sample, annotate, PCA,
    directions, disentangle, evaluate, figures, report. Rerun to resume; change a section
    and rerun to redo that stage and those after it. The whole config is checked first
    (every section against every other, every weight file loaded): all problems at once."""
    from hspace.tasks.check import check_config, make_plan
    from hspace.tasks.config import load_config

    try:
        cfg = load_config(config)  # before any work: a wrong key fails here
        if dask_address:
            cfg = cfg.model_copy(update={"dask_address": dask_address})
        facts = check_config(cfg, f"--config {config}" if config else "the default config")
        from hspace.tasks.stages import STAGES, Context

        STAGES["sample"].create(RunFolder(out), cfg, Context(device=facts.device), dry=True)  # another run in --out?
        if plan:
            views.show_plan(make_plan(cfg, out, facts), console)
            return
        from hspace.data import models
        from hspace.flows.runner import in_prefect, pipeline_flow
        from hspace.tasks.sample import resolve_device

        context = {"device": resolve_device(cfg.device), "dask_address": cfg.dask_address}
        run = RunFolder(out)
        with run.lock(f"hspace run --out {out}", break_stale=break_lock):
            fingerprint = models.resolve(cfg.sample.model).fingerprint
            in_prefect(pipeline_flow, out, "run", fingerprint)(cfg.model_dump(mode="json"), str(out), context)
    except RunError as e:
        _fail(str(e))
    except OSError as e:
        _fail(_write_error(e, out))
    console.print(f"report: [bold]{RunFolder(out).report}[/] (stages and fingerprints: `hspace inspect {out}`)")


@app.command("schedule")
def schedule(
    config: Annotated[Path | None, typer.Option(help="YAML config (see `hspace config --example`)")] = None,
    cron: Annotated[str | None, typer.Option(help="cron schedule, e.g. '0 3 * * *' (03:00 daily; the default)")] = None,
    interval: Annotated[float | None, typer.Option(help="instead of --cron: a run every this many seconds")] = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "hspace-nightly",
    out_root: Annotated[Path, typer.Option(help="each run writes OUT_ROOT/<time>-<run name>")] = Path("runs/scheduled"),
    concurrency: Annotated[int, typer.Option(help="runs of this deployment at once (later ones wait)")] = 1,
    keep: Annotated[int | None, typer.Option(help="after each run, delete the oldest complete runs beyond N")] = None,
) -> None:
    """Serve a Prefect deployment of `hspace run` on a schedule (blocks; Ctrl-C or SIGTERM
    stops serving and pauses the schedule). Needs a standing Prefect server: PREFECT_API_URL."""
    from hspace.flows.schedule import make_deployment, serve_until_stopped
    from hspace.tasks.check import check_config
    from hspace.tasks.config import load_config

    if cron is None and interval is None:
        cron = "0 3 * * *"
    try:
        cfg = load_config(config)
        check_config(cfg, f"--config {config}" if config else "the default config")  # before serving anything
        deployment = make_deployment(cfg, cron, name, out_root, interval, concurrency, keep)
    except RunError as e:
        _fail(str(e))
    every = f"cron {cron!r}" if cron is not None else f"every {interval:g} s"
    console.print(
        f"serving deployment [bold]hspace-scheduled-run/{name}[/] on {every} (at most {concurrency} at "
        f"once" + (f", keeping the newest {keep} complete runs" if keep else "") + f"); runs land in {out_root}/"
    )
    serve_until_stopped(deployment)
    console.print(f"stopped serving {name}; the schedule is paused")


@app.command("config")
def config_cmd(
    example: Annotated[bool, typer.Option(help="print a documented example config")] = True,
    celeba: Annotated[bool, typer.Option(help="the example for google/ddpm-ema-celebahq-256 instead")] = False,
) -> None:
    """Print a documented example config for `hspace run --config`."""
    from hspace.tasks.config import example_config

    typer.echo(example_config("celeba" if celeba else "toy"), nl=False)


@app.command("train-toy")
def train_toy(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder (resumed if it exists)")] = Path(
        "runs/toy-train/checkpoint"
    ),
    out: Annotated[Path, typer.Option(help="where to export the diffusers model folder")] = Path(
        "runs/toy-train/model"
    ),
    recipe_name: Annotated[
        str | None, typer.Option("--recipe", help="v1 or v2; default: the checkpoint's, else v2")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="total training steps (default: the recipe's)")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    decay_from: Annotated[int | None, typer.Option(help="cosine learning-rate decay from this step to 0")] = None,
    oracle_out: Annotated[Path | None, typer.Option(help="also train the oracle annotator into this folder")] = None,
    oracle_steps: Annotated[int, typer.Option(help="oracle training steps")] = 1200,
    oracle_blur: Annotated[float, typer.Option(help="oracle training: soften renders by up to this (0 = sharp)")] = 0.0,
) -> None:
    """Train the toy-faces DDPM (a Prefect flow; kill it any time and rerun to resume)."""
    from dataclasses import asdict

    from hspace.tasks.train_toy import resolve_recipe

    if not 0.0 <= oracle_blur <= 1.0:
        _fail(f"--oracle-blur must be in [0, 1] (the largest blend towards the blur), got {oracle_blur}")
    try:
        overrides = {"steps": steps, "checkpoint_every": checkpoint_every, "decay_from": decay_from}
        recipe = resolve_recipe(checkpoint, recipe_name, overrides)
        from hspace.flows.train_toy import train_toy_flow

        result = train_toy_flow(
            str(checkpoint),
            str(out),
            asdict(recipe),
            str(oracle_out) if oracle_out else None,
            oracle_steps,
            oracle_blur,
            oracle_style=recipe.style,
        )
    except (RunError, ValueError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write the checkpoint or model: {e}")
    console.print(
        f"toy model at step {result['step']}: [bold]{out}[/]" + (f"; oracle: {result['oracle']}" if oracle_out else "")
    )


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
