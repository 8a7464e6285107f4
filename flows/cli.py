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

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from hspace.data.catalog import RunError, RunFolder
from hspace.flows import apply_defaults, views
from hspace.flows.stage_commands import console, declared_outputs, fail, stage_command, write_error
from hspace.tasks.stages import Context, registry

apply_defaults()  # Prefect offline and quiet, before anything imports it (flows/entry.py)
# third-party deprecation noise (a library's use of torch.jit.script), not the user's business
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find and apply interpretable directions in the h-space of diffusion models.",
)
# ------------------------------------------------------------------ generated stage commands

for _stage in registry().values():  # one command per declared stage (flows/stage_commands.py)
    if _stage.command:
        stage_command(app, _stage)

# ------------------------------------------------------------------------- read-only commands


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show a run's config, stages (fingerprint, time, outputs), arrays and shard states."""
    from hspace.data.runs import inspect_run

    try:
        report = inspect_run(RunFolder(run_dir), declared_outputs())
    except RunError as e:
        fail(str(e))
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
        fail(f"{root} is not a folder; give the folder that holds your run folders (default: runs/)")
    entries = [run_summary(p) for p in find_runs(root)]
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
                problems = verify_run(run, fix=True, declared=declared_outputs())
        else:
            problems = verify_run(run, declared=declared_outputs())
    except RunError as e:
        fail(str(e))
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
    scales: Annotated[
        str | None,
        typer.Option(help="comma-separated strengths (columns); default -2..2, or 0..1 for a share (p2p, sdedit)"),
    ] = None,
    window: Annotated[str | None, typer.Option(help="S0:S1, steps where the edit is applied")] = None,
    asyrp: Annotated[bool, typer.Option(help="edited eps in P_t only (Asyrp); two passes per step")] = False,
    edit_method: Annotated[
        str | None, typer.Option(help="a registered editing method (h, asyrp, xT, ...; docs/ARCHITECTURE.md)")
    ] = None,
    target_prompt: Annotated[
        str | None,
        typer.Option(help="--edit-method p2p / pnp / sdedit: the prompt to edit toward (the source: the sample's)"),
    ] = None,
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("edit.png"),
    device: Annotated[str, typer.Option()] = "auto",
    prompt: Annotated[
        str | None, typer.Option(help="SD model: the text of a fresh sample (--model), or a photo's source prompt")
    ] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="SD model: guidance scale (default 7.5 for a fresh sample, 1 for --image)")
    ] = None,
    image: Annotated[
        list[Path], typer.Option(help="a photo (or a folder of them) to edit, with --model; repeat for several")
    ] = [],  # noqa: B006
    method: Annotated[str, typer.Option(help="with --image: ddpm (edit-friendly, exact) or ddim inversion")] = "ddpm",
    sdedit: Annotated[
        int | None, typer.Option(help="with --image: SDEdit instead of inversion, running the last K steps")
    ] = None,
    refine: Annotated[int, typer.Option(help="with --image --method ddim: fixed-point refinements per step")] = 3,
) -> None:
    """Replay a sample with the same noise and render a grid of h-space edits; or, with
    --image, invert a photo (or SDEdit it) and render its edits."""
    try:
        from hspace.tasks.edit import edit_sample
        from hspace.tasks.edit_methods import acts_on_code, parse_scales
        from hspace.tasks.sample import resolve_device

        values = None if scales is None else parse_scales(scales)
        if image:
            if acts_on_code(edit_method) and model is not None:
                raise RunError(f"--edit-method {edit_method} brings its own model (an autoencoder): drop --model")
            if run_dir is not None or (model is None and not acts_on_code(edit_method)):
                raise RunError("--image takes --model M (the model the directions were found on), not a run folder")
            from hspace.tasks.photo_edit import edit_photos

            how = {"method": method, "sdedit": sdedit, "eta": eta, "seed": seed, "refine": refine, "window": window}
            how |= {"edit_method": edit_method, "target_prompt": target_prompt}
            how |= {"asyrp": asyrp, "clip_sample": clip_sample, "prompt": prompt, "guidance_scale": guidance_scale}
            result = edit_photos(image, direction, values, out, model, **how, device=resolve_device(device))
            for line in result["lines"]:
                console.print(escape(line))
            console.print(f"grid: [bold]{result['path']}[/]; each edited image in {result['folder']}/")
            return
        if method != "ddpm" or sdedit is not None:
            raise RunError("--method and --sdedit are for --image PHOTO")
        where = {"run_dir": run_dir, "sample_index": sample_index, "model": model, "seed": seed, "steps": steps}
        how = {"eta": eta, "window": window, "asyrp": asyrp, "clip_sample": clip_sample, "edit_method": edit_method}
        how["target_prompt"] = target_prompt
        how |= {"prompt": prompt, "guidance_scale": 7.5 if guidance_scale is None else guidance_scale}
        path = edit_sample(direction, values, out, **where, **how, device=resolve_device(device))
    except RunError as e:
        fail(str(e))
    console.print(f"grid: [bold]{path}[/]")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    directions: Annotated[str | None, typer.Option(help="A,B,... (default: every direction of the run)")] = None,
    out: Annotated[Path, typer.Option(help="pack folder to write (new, empty, or a previous pack)")] = Path("pack"),
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Write directions as a shareable pack: the files, an index, a model card and a preview
    grid, in a layout huggingface_hub.upload_folder publishes as is."""
    try:
        from hspace.tasks.export import export_pack
        from hspace.tasks.sample import resolve_device

        names = [n.strip() for n in directions.split(",") if n.strip()] if directions else None
        index = export_pack(run_dir, names, out, device=resolve_device(device))
    except RunError as e:
        fail(str(e))
    console.print(f"pack: [bold]{out}[/] ({index.name}, README.md, preview.png); use it as --direction {out}/NAME")


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
    from hspace.tasks.check import check_config, check_disk, make_plan
    from hspace.tasks.config import load_config

    try:
        cfg = load_config(config)  # before any work: a wrong key fails here
        if dask_address:
            cfg = cfg.model_copy(update={"dask_address": dask_address})
        facts = check_config(cfg, f"--config {config}" if config else "the default config")
        from hspace.tasks.stages import creating_stage

        creating_stage().make_run(RunFolder(out), cfg, Context(device=facts.device), dry=True)  # another run in --out?
        if plan:
            views.show_plan(make_plan(cfg, out, facts), console)
            return
        check_disk(cfg, out, facts)  # what --plan counts, against the free space: before any work
        from hspace.flows.runner import execute_pipeline

        execute_pipeline(cfg, out, break_lock, console)
    except RunError as e:
        fail(str(e))
    except OSError as e:
        fail(write_error(e, out))
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
    stops serving and pauses the schedule). Needs a standing Prefect server (its scheduler
    service): the one PREFECT_API_URL names, else hspace's own (`hspace server start`)."""
    from hspace.flows.prefect_server import prefect_api
    from hspace.flows.schedule import make_deployment, serve_into, serve_until_stopped
    from hspace.tasks.check import check_config
    from hspace.tasks.config import load_config

    if cron is None and interval is None:
        cron = "0 3 * * *"
    try:
        cfg = load_config(config)
        check_config(cfg, f"--config {config}" if config else "the default config")  # before serving anything
        deployment = make_deployment(cfg, cron, name, out_root, interval, concurrency, keep)
    except RunError as e:
        fail(str(e))
    every = f"cron {cron!r}" if cron is not None else f"every {interval:g} s"
    console.print(
        f"serving deployment [bold]hspace-scheduled-run/{name}[/] on {every} (at most {concurrency} at "
        f"once" + (f", keeping the newest {keep} complete runs" if keep else "") + f"); runs land in {out_root}/"
    )
    serve_into(out_root)  # the runs it serves write there and nowhere else
    try:
        with prefect_api(console):
            serve_until_stopped(deployment)
    except RunError as e:
        fail(str(e))
    console.print(f"stopped serving {name}; the schedule is paused")


@app.command("config")
def config_cmd(
    example: Annotated[bool, typer.Option(help="print a documented example config")] = True,
    celeba: Annotated[bool, typer.Option(help="the example for google/ddpm-ema-celebahq-256 instead")] = False,
    sd: Annotated[bool, typer.Option(help="the example for a Stable Diffusion model instead")] = False,
    toy_sd: Annotated[bool, typer.Option(help="the example for the shipped toy-sd model (data/toy/sd.py)")] = False,
) -> None:
    """Print a documented example config for `hspace run --config`."""
    from hspace.tasks.config import example_config

    typer.echo(example_config("toy_sd" if toy_sd else "sd" if sd else "celeba" if celeba else "toy"), nl=False)


@app.command("train-toy")
def train_toy(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder (resumed if it exists)")] = Path(
        "runs/toy-train/checkpoint"
    ),
    out: Annotated[Path, typer.Option(help="where to export the diffusers model folder")] = Path(
        "runs/toy-train/model"
    ),
    recipe_name: Annotated[
        str | None,
        typer.Option("--recipe", help="v1, v2, toy-sd, clip, diffae, hdae; default: the checkpoint's, else v2"),
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

    from hspace.data.toy.train import resolve_recipe

    if not 0.0 <= oracle_blur <= 1.0:
        fail(f"--oracle-blur must be in [0, 1] (the largest blend towards the blur), got {oracle_blur}")
    try:
        if recipe_name == "toy-sd":  # data/toy/sd.py: VAE, then U-Net + text encoder; --steps: the U-Net's
            from hspace.flows.train_toy import train_sd_command

            return train_sd_command(checkpoint, out, steps, checkpoint_every, console)
        if recipe_name in ("clip", "diffae", "hdae"):  # toy-clip, toy-diffae (a diffusion autoencoder), toy-hdae
            from hspace.flows.train_toy import train_recipe_command

            return train_recipe_command(recipe_name, checkpoint, out, steps, checkpoint_every, console)
        overrides = {"steps": steps, "checkpoint_every": checkpoint_every, "decay_from": decay_from}
        recipe = resolve_recipe(checkpoint, recipe_name, overrides)
        from hspace.flows.prefect_server import prefect_api

        with prefect_api(console):
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
        fail(str(e))
    except OSError as e:
        fail(f"cannot write the checkpoint or model: {e}")
    console.print(
        f"toy model at step {result['step']}: [bold]{out}[/]" + (f"; oracle: {result['oracle']}" if oracle_out else "")
    )


from hspace.flows.morph_command import morph  # noqa: E402  (hspace morph: DiffMorpher)
from hspace.flows.server_commands import server_app  # noqa: E402  (hspace server start|status|stop)

app.command()(morph)
app.add_typer(server_app, name="server")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
