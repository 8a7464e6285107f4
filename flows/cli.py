"""The ``hspace`` command line.

Heavy imports (torch, diffusers, prefect) happen inside the commands that need them, so
read-only commands such as ``hspace inspect`` answer in well under two seconds and never
start a Prefect server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from data.catalog import RunError, RunFolder, require_sampled

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
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _OneLine(logging.Formatter):
    """'warning: ...' on one line (no wrapping, no timestamp table): what a terminal user
    and a log file both read best."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def _in_prefect(flow_obj, run_dir: Path, stage: str, fingerprint: str | None):
    """``flow_obj`` with its flow runs named after the run folder and stage (``runs/x sample``)
    and tagged ``run:<folder name>`` and ``model:<sha256[:12]>``, so the runs of one folder
    or one model are found in the Prefect UI by name or tag."""
    from prefect import tags

    tagged = [f"run:{Path(run_dir).name}"] + ([f"model:{fingerprint[:12]}"] if fingerprint else [])
    named = flow_obj.with_options(flow_run_name=f"{run_dir} {stage}")

    def call(*args, **kwargs):
        with tags(*tagged):
            return named(*args, **kwargs)

    return call


def _fingerprint(run_dir: Path) -> str | None:
    return RunFolder(run_dir).read().get("model", {}).get("fingerprint")


# --------------------------------------------------------------------------- sample


@app.command()
def sample(
    model: Annotated[
        str, typer.Option(help="'toy', a local diffusers folder, or a Hugging Face id (local cache)")
    ] = "toy",
    n: Annotated[int, typer.Option(help="number of samples")] = 256,
    steps: Annotated[int, typer.Option(help="DDIM steps (num_inference_steps)")] = 50,
    eta: Annotated[float, typer.Option(help="DDIM eta: 0 deterministic, 1 DDPM-like")] = 0.0,
    seed: Annotated[int, typer.Option(help="run seed; sample i uses a generator seeded from (seed, i)")] = 0,
    batch_size: Annotated[int, typer.Option(help="samples per batch = per Zarr shard")] = 32,
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/toy"),
    h_point: Annotated[str, typer.Option(help="'output' or 'input' of the mid block")] = "output",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 for the UNet")] = "float32",
    allow_download: Annotated[bool, typer.Option(help="let a Hugging Face id download if not cached")] = False,
    dask_address: Annotated[
        str | None, typer.Option(help="run the shards on this Dask scheduler (OUT must be on a shared path)")
    ] = None,
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Mass-sample a model, storing h at every step, x0 and seeds in OUT/samples.zarr."""
    _configure_logging(verbose)
    for name, value in (("--n", n), ("--steps", steps), ("--batch-size", batch_size)):
        if value <= 0:
            _fail(f"{name} must be a positive integer, got {value}")
    if not (0 <= eta <= 1):
        _fail(f"--eta must be in [0, 1] (0 = DDIM, 1 = DDPM-like), got {eta}")
    if h_point not in ("output", "input"):
        _fail(f"--h-point must be 'output' or 'input', got {h_point!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        _fail(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}")
    try:
        from data import models
        from tasks.sample import init_run, resolve_device

        ref = models.resolve(model, allow_download=allow_download)
        dev = resolve_device(device)
        unet, scheduler = models.load(ref)
        from hcore.hspace import NoMidBlockError, h_shape

        try:
            h_shape(unet)
        except NoMidBlockError as e:
            raise RunError(str(e)) from None
        train_steps = scheduler.config.num_train_timesteps
        if steps > train_steps:
            _fail(f"--steps {steps} exceeds the model's {train_steps} training timesteps; use at most {train_steps}")
        del unet
        config = {
            "n": n,
            "steps": steps,
            "eta": eta,
            "seed": seed,
            "batch_size": batch_size,
            "h_point": h_point,
            "dtype": dtype,
        }
        run = RunFolder(out)
        with run.lock(f"hspace sample --out {out}", break_stale=break_lock):
            init_run(run, config, ref, scheduler, dev)
            from flows.sample import sample_flow

            with run.stage("sample"):
                result = _in_prefect(sample_flow, out, "sample", ref.fingerprint)(str(out), dask_address=dask_address)
            run.set_stage("sample", state="done", recomputed_shards=len(result["recomputed"]))
    except RunError as e:
        _fail(str(e))
    except OSError as e:
        _fail(
            f"cannot write to {out}: {e.strerror or e} ({e.filename or out}); "
            "free space or fix permissions, then rerun the same command"
        )
    console.print(
        f"samples: [bold]{out / 'samples.zarr'}[/] ({n} samples, {steps} steps); inspect with `hspace inspect {out}`"
    )


# --------------------------------------------------------------------------- invert


@app.command()
def invert(
    images: Annotated[Path, typer.Option(help="folder with positive/ and negative/, or any folder with --labels")],
    out: Annotated[Path, typer.Option(help="new run folder")],
    model: Annotated[str, typer.Option(help="'toy', a local diffusers folder, or a Hugging Face id")] = "toy",
    labels: Annotated[Path | None, typer.Option(help="CSV with a 'file' column and one column per attribute")] = None,
    attribute: Annotated[str, typer.Option(help="attribute name of positive/ vs negative/")] = "label",
    steps: Annotated[int, typer.Option(help="DDIM steps (directions apply to runs with the same steps)")] = 50,
    refine: Annotated[int, typer.Option(help="fixed-point refinements per step (0 = plain DDIM inversion)")] = 3,
    batch_size: Annotated[int, typer.Option(help="images per batch = per Zarr shard")] = 32,
    h_point: Annotated[str, typer.Option(help="'output' or 'input' of the mid block")] = "output",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 for the UNet")] = "float32",
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
) -> None:
    """DDIM-invert real images (eta = 0), storing h_{T:1}, x_T and the reconstruction error;
    the labels become annotations, so `hspace directions OUT --attribute A` works as on samples."""
    for name, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value <= 0:
            _fail(f"{name} must be a positive integer, got {value}")
    if refine < 0:
        _fail(f"--refine must be 0 or more, got {refine}")
    if h_point not in ("output", "input"):
        _fail(f"--h-point must be 'output' or 'input', got {h_point!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        _fail(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}")
    try:
        from data import models
        from tasks.invert import list_images, load_images, write_labels
        from tasks.sample import init_run, resolve_device

        names, scores = list_images(images, labels, attribute)
        ref = models.resolve(model)
        dev = resolve_device(device)
        unet, scheduler = models.load(ref)
        if steps > scheduler.config.num_train_timesteps:
            _fail(f"--steps {steps} exceeds the model's {scheduler.config.num_train_timesteps} training timesteps")
        size = unet.config.sample_size
        image_shape = (unet.config.in_channels, size, size)
        del unet
        load_images(images, names, size)  # every file readable, before anything is written
        config = {
            "kind": "inversion",
            "n": len(names),
            "steps": steps,
            "eta": 0.0,
            "seed": 0,  # no generator draws anything at eta = 0; kept for the run.json schema
            "batch_size": batch_size,
            "h_point": h_point,
            "dtype": dtype,
            "refine": refine,
            "images_dir": str(Path(images).resolve()),
            "images": names,
            "labels": scores,
        }
        run = RunFolder(out)
        with run.lock(f"hspace invert --out {out}", break_stale=break_lock):
            init_run(run, config, ref, scheduler, dev)
            from flows.invert import invert_flow

            with run.stage("invert"):
                result = _in_prefect(invert_flow, out, "invert", ref.fingerprint)(str(out), image_shape)
            with run.stage("annotate", annotator="labels"):
                columns = write_labels(run, scores)
            run.set_stage("invert", state="done", recon_mse=result["recon_mse"])
    except RunError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write to {out}: {e.strerror or e} ({e.filename or out}); free space or fix permissions")
    psnr = 10 * math.log10(4 / max(result["recon_mse"], 1e-12))
    console.print(
        f"inverted {len(names)} images into [bold]{out / 'samples.zarr'}[/]; reconstruction MSE "
        f"{result['recon_mse']:.5f} (PSNR {psnr:.1f} dB, images in [-1, 1]); labels: {', '.join(columns)}; "
        f"next: `hspace directions {out} --attribute {columns[0]} --top K`"
    )


# --------------------------------------------------------------------------- inspect


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show a run's config, arrays (shape, dtype, chunks, shards, bytes) and shard states."""
    import zarr

    from data.catalog import SampleStore

    run = RunFolder(run_dir)
    try:
        meta = run.read()
    except RunError as e:
        _fail(str(e))
    report = {
        "run": str(run_dir),
        "config": meta["config"],
        "model": meta["model"],
        "stages": meta["stages"],
        "pipeline": meta.get("pipeline", {}),
        "versions": meta.get("versions", {}),
        "arrays": [],
        "lock": run.lock_holder(),
    }
    report["errors"] = []
    for store_path in sorted(run.root.glob("*.zarr")):
        try:
            group = zarr.open_group(store_path, mode="r")
            arrays = sorted(group.arrays())
        except (ValueError, KeyError, OSError) as e:
            report["errors"].append(f"{store_path.name}: unreadable ({type(e).__name__}: {e})")
            continue
        for name, arr in arrays:
            report["arrays"].append(
                {
                    "store": store_path.name,
                    "name": name,
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "chunks": list(arr.chunks),
                    "shards": list(arr.shards) if arr.shards else None,
                    "bytes_on_disk": _du(store_path / name),
                    "bytes_raw": int(arr.nbytes),
                }
            )
    if run.samples.exists():
        try:
            store = SampleStore(run.samples)
            pending = store.pending_shards()
            report["shards"] = {
                "total": store.layout.n_shards,
                "done": store.layout.n_shards - len(pending),
                "pending": pending,
            }
        except RunError as e:
            report["shards"] = {"error": str(e)}
    if as_json:
        console.print_json(json.dumps(report))
        return
    console.print(
        f"[bold]run[/] {run_dir}   model [bold]{meta['model'].get('id')}[/] "
        f"(sha256 {meta['model'].get('fingerprint', '')[:12]}, revision {meta['model'].get('revision')})"
    )
    console.print("config: " + ", ".join(f"{k}={v}" for k, v in meta["config"].items()))
    if report["lock"]:
        console.print(f"[yellow]locked[/] by pid {report['lock'].get('pid')} since {report['lock'].get('started')}")
    table = Table(title="arrays")
    for col in ("store", "array", "shape", "dtype", "chunks", "shards", "on disk", "raw"):
        table.add_column(col)
    for a in report["arrays"]:
        table.add_row(
            a["store"],
            a["name"],
            str(tuple(a["shape"])),
            a["dtype"],
            str(tuple(a["chunks"])),
            str(tuple(a["shards"])) if a["shards"] else "-",
            _human(a["bytes_on_disk"]),
            _human(a["bytes_raw"]),
        )
    console.print(table)
    for problem in report["errors"]:
        console.print(f"[red]{problem}[/]")
    if "shards" in report:
        s = report["shards"]
        if "error" in s:
            console.print(f"[red]samples.zarr: {s['error']}[/]")
        else:
            pend = s["pending"]
            console.print(
                f"shards: {s['done']}/{s['total']} done"
                + (f", pending: {pend[:20]}{' ...' if len(pend) > 20 else ''}" if pend else "")
            )
    stages = Table(title="stages")
    for col in ("stage", "state", "details"):
        stages.add_column(col)
    for name, st in meta["stages"].items():
        stages.add_row(name, st.get("state", "?"), ", ".join(f"{k}={v}" for k, v in st.items() if k != "state"))
    console.print(stages)
    if meta.get("pipeline"):
        table = Table(title="hspace run stages")
        for col in ("stage", "state", "cache key", "inputs", "seconds", "outputs (size on disk)"):
            table.add_column(col)
        for name, st in meta["pipeline"].items():
            outs = []
            for o in st.get("outputs", [])[:4]:
                path = run.root / o
                size = (
                    sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                    if path.is_dir()
                    else (path.stat().st_size if path.exists() else None)
                )
                outs.append(f"{o} ({_human(size)})" if size is not None else f"{o} (missing)")
            more = len(st.get("outputs", [])) - 4
            table.add_row(
                name,
                st.get("state", "?"),
                str(st.get("key", "")),
                ", ".join(st.get("inputs", [])),
                str(st.get("seconds", "")),
                ", ".join(outs) + (f" +{more} more" if more > 0 else ""),
            )
        console.print(table)


@app.command("list")
def list_runs(
    root: Annotated[Path, typer.Argument(help="folder holding run folders (searched 3 levels deep)")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Every run folder under ROOT: model, size, the state of each stage (running ones with
    their lock owner) and the headline leakage numbers. Reads run.json files only: no Prefect."""

    from data.catalog import PIPELINE_STAGES, find_runs, run_summary

    if not root.is_dir():
        _fail(f"{root} is not a folder; give the folder that holds your run folders (default: runs/)")
    entries = [run_summary(p, PIPELINE_STAGES) for p in find_runs(root)]
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    if not entries:
        console.print(f"no run folders under {root}")
        return

    def mark(state: str) -> str:
        if state == "done":
            return "[green]✓[/]"
        if state == "pending":
            return "[dim]·[/]"
        return "[red]✗[/]" if state.startswith("failed") else "[yellow]…[/]"

    table = Table(show_lines=False)
    for col in ("run", "model", "created", "n x T", "state", "stages", "leakage"):
        table.add_column(col, overflow="fold")
    for e in entries:
        lk = e.get("leakage") or {}
        leak = ""
        if lk.get("offdiagonal") is not None:
            leak = f"{lk['offdiagonal']:.3g}"
            if lk.get("offdiagonal_disentangled") is not None and lk["offdiagonal"]:
                change = 100 * (lk["offdiagonal_disentangled"] / lk["offdiagonal"] - 1)
                kept = 100 * lk["diagonal_disentangled"] / lk["diagonal"] if lk.get("diagonal") else float("nan")
                leak += f" -> {lk['offdiagonal_disentangled']:.3g} ({change:+.0f}%, {kept:.0f}% kept)"
        table.add_row(
            os.path.relpath(e["path"], root),
            Path(str(e.get("model") or "")).name,
            (e.get("created") or "")[:16],
            f"{e.get('n') or ''} x {e.get('steps') or ''}",
            e["state"],
            "".join(mark(state) for state in e["stages"].values()),
            leak,
        )
    console.print(table)
    console.print(
        "stages: " + " ".join(PIPELINE_STAGES) + " (pipeline runs; single commands list their own) - "
        "✓ done, ✗ failed, … running, · pending; leakage: mean |off-diagonal| of Table 1, original -> "
        "disentangled (change, share of the diagonal kept). Per stage: --json",
        highlight=False,
    )


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    fix: Annotated[
        bool, typer.Option(help="mark damaged sample shards pending so `hspace sample` redoes them")
    ] = False,
) -> None:
    """Read back every chunk (crc32c), marker and direction file; report damage and the remedy."""
    from data.catalog import verify_run

    run = RunFolder(run_dir)
    if fix:
        try:
            run.read()  # never create a lock (or a folder) where there is no run
            with run.lock(f"hspace verify --fix {run_dir}"):
                problems = verify_run(run, fix=True)
        except RunError as e:
            _fail(str(e))
    else:
        problems = verify_run(run)
    if not problems:
        console.print(f"{run_dir}: every chunk, marker and direction file reads back intact")
        return
    table = Table(title=f"{len(problems)} problem(s) in {run_dir}")
    for col in ("what", "problem", "remedy"):
        table.add_column(col)
    for p in problems:
        table.add_row(p["what"], p["detail"], p["remedy"])
    console.print(table)
    raise typer.Exit(1)


# --------------------------------------------------------------------------- edit


@app.command()
def edit(
    run_dir: Annotated[Path | None, typer.Argument(help="run folder to take the sample from")] = None,
    sample_index: Annotated[int | None, typer.Option("--sample", help="index of the sample in RUN")] = None,
    model: Annotated[str | None, typer.Option(help="model, instead of RUN (with --seed)")] = None,
    seed: Annotated[int, typer.Option(help="with --model: run seed (sample 0 of that seed)")] = 0,
    steps: Annotated[int, typer.Option(help="with --model: DDIM steps")] = 50,
    eta: Annotated[float, typer.Option(help="with --model: DDIM eta")] = 0.0,
    direction: Annotated[list[str], typer.Option(help="FILE or FILE:gamma; repeat for several")] = [],  # noqa: B006
    scales: Annotated[str, typer.Option(help="comma-separated gammas (columns)")] = "-2,-1,0,1,2",
    window: Annotated[str | None, typer.Option(help="S0:S1, steps where the edit is applied")] = None,
    asyrp: Annotated[bool, typer.Option(help="edited eps in P_t only (Asyrp); two passes per step")] = False,
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("edit.png"),
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Replay a sample with the same noise and render a grid of h-space edits."""
    from data import models
    from data.figures import grid_image, save_grid
    from tasks import edit as edit_tasks
    from tasks.sample import resolve_device

    try:
        scale_values = [float(s) for s in scales.split(",") if s.strip()]
    except ValueError:
        _fail(f"--scales {scales!r} is not a comma-separated list of numbers")
    if not direction:
        _fail("give at least one --direction FILE[:gamma]")
    if not (0 <= eta <= 1):
        _fail(f"--eta must be in [0, 1], got {eta}")
    if not all(math.isfinite(g) for g in scale_values):
        _fail(f"--scales {scales!r} holds a non-finite value")
    try:
        if run_dir is not None:
            if model is not None:
                _fail("give either RUN --sample I or --model M --seed S, not both")
            meta = RunFolder(run_dir).read()
            cfg = meta["config"]
            if sample_index is None or not (0 <= sample_index < cfg["n"]):
                _fail(f"--sample must be an index in [0, {cfg['n']}) for this run")
            ref = models.ModelRef(**{k: meta["model"][k] for k in ("id", "path", "revision", "fingerprint")})
            run_dtype = cfg.get("dtype", "float32")
            spec = edit_tasks.SampleSpec(cfg["seed"], sample_index, cfg["steps"], cfg["eta"], cfg["h_point"])
            if cfg.get("kind") == "inversion":  # a real image: start from its inverted x_T
                import dataclasses

                import numpy as np
                import torch

                from data.catalog import SampleStore

                x_T = np.asarray(SampleStore(RunFolder(run_dir).samples).group["xT"][sample_index])
                spec = dataclasses.replace(spec, x_T=torch.from_numpy(x_T))
        elif model is not None:
            ref = models.resolve(model)
            run_dtype = "float32"
            spec = edit_tasks.SampleSpec(seed, 0, steps, eta, "output")
        else:
            _fail("give RUN --sample I, or --model M --seed S")
        unet, scheduler = models.load_for_run(
            {"model": ref.to_dict(), "config": {"dtype": run_dtype}}, device=resolve_device(device)
        )
        from hcore.hspace import h_shape

        specs = [edit_tasks.parse_direction(d) for d in direction]
        vectors = edit_tasks.load_directions(
            specs,
            model_fingerprint=ref.fingerprint,
            steps=spec.steps,
            h_shape=h_shape(unet),
            h_point=spec.h_point,
            scheduler=scheduler,
        )
        cells, rows, cols = edit_tasks.plan_grid(specs, scale_values)
        images = edit_tasks.render_edits(
            unet, scheduler, spec, vectors, cells, window=edit_tasks.parse_window(window, spec.steps), asyrp=asyrp
        )
        title = (
            f"sample {spec.index} (seed {spec.run_seed})"
            + (", Asyrp" if asyrp else "")
            + (f", window {window}" if window else "")
        )
        save_grid(out, grid_image(images, rows, cols, title=title))
    except RunError as e:
        _fail(str(e))
    console.print(f"grid: [bold]{out}[/]")


# --------------------------------------------------------------------------- annotate


@app.command()
def annotate(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    annotator: Annotated[str, typer.Option(help="oracle | oracle:PATH")] = "oracle",
    batch_size: Annotated[int, typer.Option(help="images per annotator batch (= chunk of the scores array)")] = 256,
    device: Annotated[str, typer.Option()] = "auto",
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
) -> None:
    """Score every stored x0 with an annotator into RUN/annotations.zarr (resumable)."""
    if batch_size <= 0:
        _fail(f"--batch-size must be a positive integer, got {batch_size}")
    try:
        from data.annotators import load_annotator
        from tasks.sample import resolve_device

        run = RunFolder(run_dir)
        run.read()
        dev = resolve_device(device)
        load_annotator(annotator, dev)  # fail on a bad spec or file before locking and starting Prefect
        with run.lock(f"hspace annotate {run_dir}", break_stale=break_lock):
            from flows.annotate import annotate_flow

            with run.stage("annotate", annotator=annotator):
                result = _in_prefect(annotate_flow, run_dir, "annotate", _fingerprint(run_dir))(
                    str(run_dir), annotator, batch_size, dev
                )
            run.set_stage("annotate", state="done", annotator=annotator, names=result["names"])
    except RunError as e:
        _fail(str(e))
    console.print(f"scores: [bold]{run_dir / 'annotations.zarr'}[/] ({', '.join(result['names'])})")


# --------------------------------------------------------------------------- pca


@app.command()
def pca(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    components: Annotated[int, typer.Option(help="principal components per timestep (K)")] = 10,
    method: Annotated[str, typer.Option(help="auto | ipca | randomized (see docs: auto picks by data size)")] = "auto",
    batch_size: Annotated[int, typer.Option(help="rows read per chunk (and IncrementalPCA batch)")] = 256,
    workers: Annotated[int, typer.Option(help="local Dask workers (one timestep per task)")] = 1,
    dask_address: Annotated[str | None, typer.Option(help="tcp://host:port of an existing Dask scheduler")] = None,
    reference_step: Annotated[
        int | None, typer.Option(help="step whose components fix the signs (default T//2)")
    ] = None,
    complete_shards_only: Annotated[bool, typer.Option(help="use only complete shards of an unfinished run")] = False,
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
) -> None:
    """Per-timestep PCA of h (paper sec. 4.1): RUN/pca.zarr and directions pcNN + randomNN."""
    if method not in ("auto", "ipca", "randomized"):
        _fail(f"--method must be auto, ipca or randomized, got {method!r}")
    if workers <= 0 or batch_size <= 0:
        _fail("--workers and --batch-size must be positive")
    try:
        run = RunFolder(run_dir)
        run.read()
        with run.lock(f"hspace pca {run_dir}", break_stale=break_lock):
            from flows.pca import pca_flow

            with run.stage("pca"):
                result = _in_prefect(pca_flow, run_dir, "pca", _fingerprint(run_dir))(
                    str(run_dir),
                    components,
                    method,
                    batch_size,
                    workers,
                    dask_address,
                    reference_step,
                    complete_shards_only,
                )
            run.set_stage(
                "pca",
                state="done",
                method=result["method"],
                k=components,
                n=result["n"],
                wall_seconds=round(result["wall_seconds"], 2),
            )
    except RunError as e:
        _fail(str(e))
    ratios = ", ".join(f"{r:.3f}" for r in result["explained_variance_ratio_mean"][:5])
    console.print(
        f"pca: [bold]{run_dir / 'pca.zarr'}[/] ({result['method']}, n={result['n']}, "
        f"{result['wall_seconds']:.1f} s); explained variance ratio of PC0-4 (mean over t): {ratios}"
    )
    console.print(
        f"directions: {run_dir / 'directions'}/pc00..pc{components - 1:02d}, random00..; "
        f"view with `hspace edit {run_dir} --sample 0 --direction {run_dir}/directions/pc00.safetensors "
        "--scales -3,-2,-1,0,1,2,3`"
    )


@app.command("name")
def name_directions(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    directions: Annotated[
        str, typer.Option(help="comma-separated direction names in RUN/directions")
    ] = "pc00,pc01,pc02,pc03,pc04,pc05,pc06,pc07,pc08,pc09",
    annotator: Annotated[str, typer.Option(help="oracle | oracle:PATH")] = "oracle",
    n: Annotated[int | None, typer.Option(help="samples edited per direction (the run's first n; default 64)")] = None,
    gamma: Annotated[float, typer.Option(help="edit strength; each direction is applied at -gamma and +gamma")] = 2.0,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Measure how much each direction moves every attribute and name it (pc02 ~ yaw)."""
    try:
        from data import models
        from data.annotators import load_annotator
        from tasks import evaluate
        from tasks.sample import resolve_device

        run = RunFolder(run_dir)
        meta = run.read()
        require_sampled(meta, "hspace name")
        cfg = meta["config"]
        n = min(64, cfg["n"]) if n is None else n
        if not (0 < n <= cfg["n"]):
            _fail(f"--n must be in [1, {cfg['n']}] (samples in this run)")
        names = [d.strip() for d in directions.split(",") if d.strip()]
        dev = resolve_device(device)
        unet, scheduler = models.load_for_run(meta, device=dev)
        net = load_annotator(annotator, dev)
        vectors = [v for v, _ in evaluate.load_run_directions(run, meta, names, unet, scheduler)]
        changes = evaluate.attribute_changes(unet, scheduler, net, cfg, list(range(n)), vectors, gamma)
        import torch

        from data.catalog import SampleStore

        x0 = torch.from_numpy(SampleStore(run.samples).x0[:n]).float() / 127.5 - 1
        scale = net.score(x0).numpy().std(0)
        table = evaluate.name_directions(changes, list(net.names), names, scale)
        out = evaluate.save_naming(run, table, list(net.names), gamma)
    except RunError as e:
        _fail(str(e))
    for row in table:
        console.print(f"{row['direction']} ≈ [bold]{row['name']}[/] ({row['change']:+.3f} at ±{gamma:g})")
    console.print(f"table: [bold]{out}[/]")


# --------------------------------------------------------------------------- jacobian


@app.command()
def jacobian(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    sample_index: Annotated[int, typer.Option("--sample", help="sample I of the run")] = 0,
    step: Annotated[int, typer.Option(help="step S of the schedule (0 = first denoising step)")] = 0,
    k: Annotated[int, typer.Option(help="number of singular vectors")] = 8,
    block: Annotated[int | None, typer.Option(help="SM Alg. 2 in blocks of b vectors (memory bound)")] = None,
    roi: Annotated[str | None, typer.Option(help="x0,y0,x1,y1: region of interest in pixels")] = None,
    mask: Annotated[Path | None, typer.Option(help="PNG mask (white = region of interest)")] = None,
    tol: Annotated[float, typer.Option(help="stop when singular values and subspace change less")] = 1e-4,
    max_iters: Annotated[int, typer.Option(help="iteration cap (a warning says when it is hit)")] = 100,
    localize: Annotated[
        int | None,
        typer.Option(
            help="with --roi/--mask: search the top-R singular subspace of the whole image's J for the K "
            "directions whose change stays most inside the region (instead of the masked J's SVD)"
        ),
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
) -> None:
    """Image-specific directions (paper sec. 4.2): top-K right singular vectors of d eps / d h."""
    if tol <= 0 or max_iters <= 0:
        _fail("--tol and --max-iters must be positive")
    try:
        from tasks.jacobian import run_jacobian
        from tasks.sample import resolve_device

        run = RunFolder(run_dir)
        run.read()
        dev = resolve_device(device)
        with run.lock(f"hspace jacobian {run_dir}", break_stale=break_lock), run.stage("jacobian"):
            from flows.sample import progress_bar

            with progress_bar() as bar:
                job = bar.add_task("jacobian (subspace iterations)", total=max_iters, rate="")
                result = run_jacobian(
                    str(run_dir),
                    sample_index,
                    step,
                    k,
                    block,
                    roi,
                    str(mask) if mask else None,
                    tol,
                    max_iters,
                    dev,
                    localize=localize,
                    progress=lambda it, change, tol_: bar.update(
                        job, completed=it, rate=f"change {change:.1e} (tol {tol_:.0e})"
                    ),
                )
        run.set_stage("jacobian", state="done", last=result["group"])
    except RunError as e:
        _fail(str(e))
    values = ", ".join(f"{s:.3g}" for s in result["singular_values"])
    what = f"gains |J v| {values}" if localize else f"singular values {values}"
    console.print(
        f"jacobian: [bold]{run_dir / 'jacobian.zarr'}[/]/{result['group']} (t={result['t']}, "
        f"{result['iterations']} iterations{'' if result['converged'] else ', NOT converged'}); {what}"
    )
    if result["share_inside"] is not None:
        console.print(
            "inside the region: " + ", ".join(f"{x:.0%}" for x in result["share_inside"]) + " of eps's change"
        )
    console.print(
        f"directions: {run_dir / 'directions'}/jac_s{sample_index}_t{step}_00.. "
        f"(try `hspace edit {run_dir} --sample {sample_index} --direction ...`)"
    )


# --------------------------------------------------------------------------- supervised


@app.command("directions")
def supervised_direction(
    run_dir: Annotated[Path, typer.Argument(help="run folder (annotated)")],
    attribute: Annotated[str, typer.Option(help="attribute name in annotations.zarr, e.g. Smiling")],
    top: Annotated[int, typer.Option(help="k: top-k and bottom-k samples by the score")] = 32,
    latent: Annotated[str, typer.Option(help="h (h_{T:1}) or xT (initial noise)")] = "h",
    name: Annotated[str | None, typer.Option(help="file name in RUN/directions (default: the attribute)")] = None,
    first: Annotated[int | None, typer.Option(help="rank only samples 0..N-1 (hold the rest out)")] = None,
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
) -> None:
    """Mean-difference direction of an attribute (paper eq. (10)) into RUN/directions."""
    try:
        from tasks.supervised import build_direction

        run = RunFolder(run_dir)
        run.read()
        with run.lock(f"hspace directions {run_dir}", break_stale=break_lock), run.stage("directions"):
            result = build_direction(str(run_dir), attribute, top, latent, name, first=first)
        run.set_stage("directions", state="done")
    except RunError as e:
        _fail(str(e))
    console.print(
        f"direction: [bold]{result['path']}[/] (|v| = {result['norm']:.2f}, {top} positives, {top} negatives)"
    )


@app.command()
def disentangle(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    direction: Annotated[str, typer.Option(help="direction name in RUN/directions")],
    against: Annotated[str, typer.Option(help="comma-separated directions to project out (eq. (11))")],
    name: Annotated[str | None, typer.Option(help="output name (default: DIRECTION_disentangled)")] = None,
    keep_norm: Annotated[
        bool, typer.Option(help="rescale the projection to the original's norm (--no-keep-norm: eq. (11) as is)")
    ] = True,
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
) -> None:
    """Disentangle a direction by projection (paper eq. (11)), over all timesteps jointly."""
    try:
        from tasks.supervised import disentangle_direction

        run = RunFolder(run_dir)
        run.read()
        with run.lock(f"hspace disentangle {run_dir}", break_stale=break_lock), run.stage("disentangle"):
            result = disentangle_direction(
                str(run_dir), direction, [a.strip() for a in against.split(",") if a.strip()], name, keep_norm
            )
        run.set_stage("disentangle", state="done")
    except RunError as e:
        _fail(str(e))
    console.print(
        f"direction: [bold]{result['path']}[/] (cosine with the original {result['cosine_with_original']:.3f})"
    )


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    directions: Annotated[str, typer.Option(help="comma-separated direction names (files in RUN/directions)")],
    disentangled: Annotated[
        bool, typer.Option(help="also each direction projected against the others (eq. 11)")
    ] = False,
    keep_norm: Annotated[
        bool,
        typer.Option(help="--disentangled: rescale each projection to its original's norm (--no-keep-norm: as is)"),
    ] = True,
    evaluator: Annotated[
        str, typer.Option(help="oracle | oracle:PATH | clip:PATH | celeba40:PATH | hopenet:PATH")
    ] = "oracle",
    n: Annotated[
        int | None,
        typer.Option(help="held-out samples edited per direction (default: 1000 or all held-out ones if fewer)"),
    ] = None,
    gamma: Annotated[str, typer.Option(help="edit strength: a number, or 'auto' (calibrated per direction)")] = "1.0",
    target: Annotated[
        float | None,
        typer.Option(help="--gamma auto: mean change of the direction's attribute to reach (default 0.5, pose 10 deg)"),
    ] = None,
    calibration_n: Annotated[int, typer.Option(help="--gamma auto: samples used to calibrate")] = 16,
    prompts: Annotated[
        Path | None, typer.Option(help="clip: YAML/JSON mapping attribute -> [positive prompt, negative prompt]")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Table 1: mean change of every attribute per direction, original and disentangled."""
    fixed_gamma = None if gamma == "auto" else _parse_float(gamma, "--gamma", "a number or 'auto'")
    if target is not None and not (math.isfinite(target) and target > 0):
        _fail("--target must be a positive number")
    if calibration_n < 1:
        _fail("--calibration-n must be at least 1")
    names = [d.strip() for d in directions.split(",") if d.strip()]
    if not names:
        _fail("--directions is empty")
    prompt_pairs = _read_prompts(prompts) if prompts else None
    try:
        from flows.sample import progress_bar
        from tasks.evaluate import run_evaluation
        from tasks.sample import resolve_device

        with progress_bar() as bar:
            job = bar.add_task("evaluate (edit-and-score passes)", total=None, rate="")
            summary = run_evaluation(
                str(run_dir),
                names,
                disentangled=disentangled,
                evaluator=evaluator,
                n=n,
                gamma=fixed_gamma,
                target=target,
                calibration_n=calibration_n,
                prompts=prompt_pairs,
                device=resolve_device(device),
                log=console.print,
                progress=lambda done, total: bar.update(job, completed=done, total=total),
                keep_norm=keep_norm,
            )
    except RunError as e:
        _fail(str(e))
    for label in ("original", "disentangled"):
        if label in summary:
            s = summary[label]
            line = f"{label}: mean |diagonal| {_fmt(s['mean_diagonal'])}, "
            line += f"mean |off-diagonal| {_fmt(s['mean_offdiagonal'])}"
            if "degrees" in s:
                d = s["degrees"]
                line += f"; pose (deg): {_fmt(d['mean_diagonal'])}, {_fmt(d['mean_offdiagonal'])}"
            console.print(line)
    console.print(f"tables and heatmaps: [bold]{run_dir / 'eval'}[/]")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _parse_float(text: str, option: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        _fail(f"{option} must be {expected}, got {text!r}")
    return value


def _read_prompts(path: Path) -> dict[str, tuple[str, str]]:
    """attribute -> (positive, negative) from a YAML or JSON file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        _fail(f"cannot read --prompts {path}: {str(e).splitlines()[0]}")
    ok = (
        isinstance(data, dict)
        and data
        and all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(isinstance(p, str) for p in v)
            for k, v in data.items()
        )
    )
    if not ok:
        _fail(f"--prompts {path} must map each attribute to [positive prompt, negative prompt]")
    return {k: (v[0], v[1]) for k, v in data.items()}


# --------------------------------------------------------------------------- run / config


@app.command("run")
def run_pipeline(
    config: Annotated[Path | None, typer.Option(help="YAML config (see `hspace config --example`)")] = None,
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/pipeline"),
    dask_address: Annotated[
        str | None, typer.Option(help="Dask scheduler for sampling shards and PCA (overrides the config)")
    ] = None,
    break_lock: Annotated[
        bool,
        typer.Option(help="take over a lock held from another host (shared filesystem)"),
    ] = False,
) -> None:
    """The whole pipeline as one Prefect flow of cached stages: sample, annotate, PCA,
    directions, disentangle, evaluate, figures, report. Rerun to resume; change a section
    and rerun to redo that stage and those after it."""
    from flows.pipeline import load_config, pipeline_flow_fn

    try:
        cfg = load_config(config)  # before any work: a wrong key fails here
        if dask_address:
            cfg = cfg.model_copy(update={"dask_address": dask_address})
        run = RunFolder(out)
        with run.lock(f"hspace run --out {out}", break_stale=break_lock):
            from data import models

            fingerprint = models.resolve(cfg.sample.model).fingerprint if cfg.sample.model else None
            _in_prefect(pipeline_flow_fn(), out, "run", fingerprint)(cfg.model_dump(mode="json"), str(out))
    except RunError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write to {out}: {e.strerror or e} ({e.filename or out}); free space or fix permissions")
    console.print(f"report: [bold]{out / 'report.html'}[/] (stages and cache keys: `hspace inspect {out}`)")


@app.command("schedule")
def schedule(
    config: Annotated[Path | None, typer.Option(help="YAML config (see `hspace config --example`)")] = None,
    cron: Annotated[str | None, typer.Option(help="cron schedule, e.g. '0 3 * * *' (03:00 daily; the default)")] = None,
    interval: Annotated[float | None, typer.Option(help="instead of --cron: a run every this many seconds")] = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "hspace-nightly",
    out_root: Annotated[Path, typer.Option(help="each scheduled run writes OUT_ROOT/<time>-<run name>")] = Path(
        "runs/scheduled"
    ),
    concurrency: Annotated[int, typer.Option(help="runs of this deployment at once (later ones wait)")] = 1,
    keep: Annotated[
        int | None, typer.Option(help="after each run, delete the oldest complete run folders beyond N")
    ] = None,
) -> None:
    """Serve a Prefect deployment of `hspace run` on a schedule (blocks; Ctrl-C or SIGTERM
    stops serving and pauses the schedule). Needs a standing Prefect server: PREFECT_API_URL."""
    from flows.pipeline import load_config, make_deployment

    if cron is None and interval is None:
        cron = "0 3 * * *"
    try:
        cfg = load_config(config)
        deployment = make_deployment(cfg, cron, name, out_root, interval=interval, concurrency=concurrency, keep=keep)
    except RunError as e:
        _fail(str(e))
    from flows.pipeline import serve_until_stopped

    every = f"cron {cron!r}" if cron is not None else f"every {interval:g} s"
    console.print(
        f"serving deployment [bold]hspace-scheduled-run/{name}[/] on {every} (at most {concurrency} at once"
        + (f", keeping the newest {keep} complete runs" if keep else "")
        + f"); runs land in {out_root}/"
    )
    serve_until_stopped(deployment)
    console.print(f"stopped serving {name}; the schedule is paused")


@app.command("config")
def config_cmd(
    example: Annotated[bool, typer.Option(help="print a documented example config")] = True,
    celeba: Annotated[bool, typer.Option(help="the example for google/ddpm-ema-celebahq-256 instead")] = False,
) -> None:
    """Print a documented example config for `hspace run --config`."""
    from flows.pipeline import example_config

    typer.echo(example_config("celeba" if celeba else "toy"), nl=False)


# --------------------------------------------------------------------------- train-toy


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
        typer.Option("--recipe", help="v1 or v2 (data/toy.py RECIPES); default: the checkpoint's own, else v1"),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="total training steps (default: the recipe's)")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    decay_from: Annotated[
        int | None, typer.Option(help="cosine learning-rate decay from this step to zero at --steps")
    ] = None,
    oracle_out: Annotated[Path | None, typer.Option(help="also train the oracle annotator into this folder")] = None,
    oracle_steps: Annotated[int, typer.Option(help="oracle training steps")] = 1200,
    oracle_blur: Annotated[
        float,
        typer.Option(help="oracle training: soften renders by up to this (0 = sharp only, as the shipped oracle)"),
    ] = 0.0,
) -> None:
    """Train the toy-faces DDPM (a Prefect flow; kill it any time and rerun to resume)."""
    import json
    from dataclasses import asdict

    from data.toy import RECIPES, recipe_from_dict

    if recipe_name is not None and recipe_name not in RECIPES:
        _fail(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe_name!r}")
    candidates = (checkpoint / "recipe.json", checkpoint.with_name(checkpoint.name + ".old") / "recipe.json")
    saved = next((p for p in candidates if p.exists()), None)
    if recipe_name is None and saved is not None:
        try:
            recipe = recipe_from_dict(json.loads(saved.read_text()))  # resume with the checkpoint's recipe
        except (RunError, ValueError, TypeError) as e:
            _fail(f"cannot read the recipe of checkpoint {checkpoint}: {e}")
    else:
        recipe = RECIPES[recipe_name or "v1"]
    overrides = {
        k: v
        for k, v in (("steps", steps), ("checkpoint_every", checkpoint_every), ("decay_from", decay_from))
        if v is not None
    }
    if any(v <= 0 for v in overrides.values()):
        _fail("--steps, --checkpoint-every and --decay-from must be positive")
    if not 0.0 <= oracle_blur <= 1.0:
        _fail(f"--oracle-blur must be in [0, 1] (the largest blend towards the blur), got {oracle_blur}")
    total = overrides.get("steps", recipe.steps)
    if decay_from is not None and decay_from >= total:
        _fail(f"--decay-from {decay_from} must be below the total steps ({total})")
    recipe_dict = {**asdict(recipe), **overrides}
    try:
        from flows.train_toy import train_toy_flow

        result = train_toy_flow(
            str(checkpoint),
            str(out),
            recipe_dict,
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
