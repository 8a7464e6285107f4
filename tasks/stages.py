"""The stage registry: each stage is one declaration (DVC/Dagster style, ../STYLE.md).

A ``Stage`` names its config sections (tasks/config.py), the stages whose outputs it reads,
and one function (load through the catalog -> hcore -> save through the catalog) that
returns what it wrote. Everything else is derived from the declaration by the one runner
(flows/runner.py): the CLI command and its options, the `hspace run` step, the
fingerprint (Prefect cache key and run.json record), the state record and its outputs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from hspace.data.catalog import PIPELINE_STAGES, RunError, RunFolder, fingerprint, require_sampled
from hspace.tasks import views
from hspace.tasks.config import RunConfig
from hspace.tasks.progress import progress_bar

log = logging.getLogger(__name__)
CODE_VERSION = "stages-3"  # part of every fingerprint: bump when a stage's maths or layout changes
PIPELINE = PIPELINE_STAGES


@dataclass
class Context:
    """What a stage needs besides its config and not part of any fingerprint."""

    device: str = "cpu"
    dask_address: str | None = None
    show_progress: bool = True
    allow_download: bool = False
    log: Callable[[str], None] = field(default=log.info)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (or top-level keys) its fingerprint hashes
    inputs: tuple[str, ...]  # stages whose outputs it reads (their fingerprints enter its own)
    body: Callable[[RunFolder, RunConfig, Context], dict]  # -> {"outputs": [...], ...}
    summary: Callable[[dict], str] = lambda result: ""
    create: Callable | None = None  # (run, cfg, ctx, dry) -> run.json: sample and invert make the run folder
    check: Callable | None = None  # (run, cfg, ctx): bad input refused before the lock and Prefect start
    doc: str = ""  # the help of `hspace NAME`
    cli_sections: dict | None = None  # sections (-> fields or None for all) as options; default its own
    runtime: tuple[str, ...] = ()  # runtime options of its command besides device, break_lock, verbose


def stage_key(stage: Stage, cfg: RunConfig, meta: dict) -> str:
    """The stage's fingerprint: its sections, the recorded fingerprints of its inputs (the
    model's for a stage that creates the run) and the code version."""
    parts = [
        getattr(cfg, s).model_dump(mode="json") if hasattr(getattr(cfg, s), "model_dump") else getattr(cfg, s)
        for s in stage.sections
    ]
    upstream = [meta["stages"].get(s, {}).get("key") for s in stage.inputs]
    return fingerprint(stage.name, parts, upstream, meta["model"].get("fingerprint"), CODE_VERSION)


def run_stage_body(run_dir: str, stage: str, key: str, config: dict, ctx: Context) -> dict:
    """One stage as a Prefect task whose cache key is its fingerprint (its result goes to
    Prefect's own storage, never into the run folder); it always runs when called:
    run.json's stage record, not Prefect's, says whether the outputs exist. Bad input (RunError) comes back
    as ``{"error": message}``, not as a failed task, so a refused command writes nothing
    and logs no traceback; the runner raises it where the command started."""
    try:
        return STAGES[stage].body(RunFolder(run_dir), RunConfig.model_validate(config), ctx)
    except RunError as e:
        return {"error": str(e)}


@functools.cache
def stage_task():
    """``run_stage_body`` as the Prefect task (made on first use: declaring the stages, as
    the CLI does for its help, must not import Prefect)."""
    from prefect import task

    return task(name="stage", persist_result=True, refresh_cache=True, cache_key_fn=lambda c, p: p["key"])(
        run_stage_body
    )


# ----------------------------------------------------------------------------- bodies


def _create_sample(run: RunFolder, cfg: RunConfig, ctx: Context, dry: bool = False):
    from hspace.tasks.sample import create_run

    return create_run(run, cfg.sample, ctx.device, ctx.allow_download, dry=dry)


def _create_invert(run: RunFolder, cfg: RunConfig, ctx: Context, dry: bool = False):
    from hspace.tasks.invert import create_inversion_run

    return create_inversion_run(run, cfg.invert, ctx.device, dry=dry)


def _check_annotators(run: RunFolder, cfg: RunConfig, ctx: Context) -> None:
    from hspace.data.annotators import load_annotator

    for spec in cfg.annotate.annotators:  # a bad spec or weight file fails before anything runs
        load_annotator(spec, ctx.device)


def _outputs(run: RunFolder, paths) -> list[str]:
    return [run.relative(p) for p in paths]


def _sample(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.tasks.sample import run_shards

    computed = run_shards(run, ctx.dask_address, show_progress=ctx.show_progress)
    return {"outputs": _outputs(run, [run.samples]), "recomputed_shards": len(computed), "n": cfg.sample.n}


def _invert(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.data.stores import SampleStore
    from hspace.tasks.invert import write_labels
    from hspace.tasks.sample import run_shards

    meta = run.read()
    computed = run_shards(run, show_progress=ctx.show_progress)
    columns = write_labels(run, meta["config"]["labels"])
    mse = float(SampleStore(run.samples).group["recon_mse"][:].mean())
    return {
        "outputs": _outputs(run, [run.samples, run.annotations]),
        "recomputed_shards": len(computed),
        "recon_mse": mse,
        "labels": columns,
        "n": meta["config"]["n"],
    }


def _annotate(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.data.annotators import load_annotator
    from hspace.data.stores import SampleStore
    from hspace.tasks.annotate import annotate_run

    nets = {spec: load_annotator(spec, ctx.device) for spec in cfg.annotate.annotators}  # bad ones fail first
    names, n = [], SampleStore(run.samples).layout.n
    with progress_bar(disable=not ctx.show_progress) as bar:
        for spec, net in nets.items():
            job = bar.add_task(f"annotate ({spec.split(':')[0]})", total=n, rate="")
            advance = lambda k, job=job: bar.advance(job, k)  # noqa: E731
            result = annotate_run(str(run.root), spec, cfg.annotate.batch_size, ctx.device, advance, net)
            names = result["names"]
    return {"outputs": _outputs(run, [run.annotations]), "annotators": cfg.annotate.annotators, "attributes": names}


def _pca(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    if not cfg.pca.enabled:
        return {"outputs": [], "skipped": True}
    from hspace.tasks.pca import run_pca

    p = cfg.pca
    with progress_bar(disable=not ctx.show_progress) as bar:
        job = bar.add_task("pca (timesteps)", total=run.read()["config"]["steps"], rate="")
        r = run_pca(
            str(run.root),
            p.components,
            p.method,
            p.batch_size,
            p.workers,
            ctx.dask_address,
            p.reference_step,
            p.complete_shards_only,
            progress=lambda i: bar.advance(job, i),
        )
    return {
        "outputs": _outputs(run, [run.pca] + [run.direction(d) for d in r["directions"]]),
        "method": r["method"],
        "k": p.components,
        "n_samples": r["n"],
        "wall_seconds": round(r["wall_seconds"], 2),
        "variance_ratio": r["explained_variance_ratio_mean"][:5],
        "weak_sign_alignment": r["weak_sign_alignment"],
    }


def _name(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.tasks.evaluate import name_run_directions

    meta = run.read()
    require_sampled(meta, "hspace name")
    s = cfg.name
    n = min(64, meta["config"]["n"]) if s.n is None else s.n
    if n > meta["config"]["n"]:
        raise RunError(f"--n must be in [1, {meta['config']['n']}] (samples in this run)")
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    net = load_annotator(s.annotator, ctx.device)
    table, path = name_run_directions(run, meta, s.directions, net, n, s.gamma, unet, scheduler)
    names = [{"direction": r["direction"], "name": r["name"], "change": r["change"]} for r in table]
    return {"outputs": _outputs(run, [path, path.with_suffix(".json")]), "names": names, "gamma": s.gamma}


def _jacobian(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.tasks.jacobian import run_jacobian

    j = cfg.jacobian
    with progress_bar(disable=not ctx.show_progress) as bar:
        job = bar.add_task("jacobian (subspace iterations)", total=j.max_iters, rate="")
        status = lambda it, change, tol: bar.update(job, completed=it, rate=f"change {change:.1e} (tol {tol:.0e})")  # noqa: E731
        r = run_jacobian(
            str(run.root),
            j.sample,
            j.step,
            j.k,
            j.block,
            j.roi,
            str(j.mask) if j.mask else None,
            j.tol,
            j.max_iters,
            ctx.device,
            localize=j.localize,
            progress=status,
        )
    return {"outputs": _outputs(run, [run.jacobian, *r.pop("directions")]), **r}


def _directions(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.tasks.supervised import build_direction

    d, run_config = cfg.directions, run.read()["config"]
    n, held_out = run_config["n"], d.held_out_of(run_config)
    if held_out >= n - 1:
        raise RunError(f"--held-out {held_out} leaves no samples of this run's {n} to build directions from")
    if d.name and len(d.attributes) > 1:
        raise RunError("--name names one direction: give a single --attribute with it")
    files = [
        build_direction(str(run.root), a, d.top, d.latent, d.name, first=n - held_out)["path"] for a in d.attributes
    ]
    return {"outputs": _outputs(run, files), "top": d.top, "held_out": held_out}


def _disentangle(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    if not cfg.disentangle.enabled:
        return {"outputs": [], "skipped": True}
    from hspace.tasks.supervised import direction_name, disentangle_direction

    s, latent = cfg.disentangle, cfg.directions.latent
    names = s.directions or [direction_name(a, latent) for a in cfg.directions.attributes]
    if s.name and len(names) > 1:
        raise RunError("--name names one direction: give a single --direction with it")
    files, cosines = [], {}
    for name in names:
        attribute = name.removesuffix("_xT")
        against = s.against or [direction_name(a, latent) for a in s.conditions.get(attribute, [])]
        against = against or [x for x in names if x != name]
        if not against:
            continue
        r = disentangle_direction(str(run.root), name, against, s.name, keep_norm=s.keep_norm)
        files.append(r["path"])
        cosines[name] = round(r["cosine_with_original"], 4)
    return {"outputs": _outputs(run, files), "cosine_with_original": cosines}


def _evaluate(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    e = cfg.evaluate
    if not e.enabled or cfg.directions.latent != "h":
        return {"outputs": [], "skipped": True}
    from hspace.data.eval_folder import EvalFolder
    from hspace.tasks.evaluate import run_evaluation

    with progress_bar(disable=not ctx.show_progress) as bar:
        job = bar.add_task("evaluate (edit-and-score passes)", total=None, rate="")
        summary = run_evaluation(
            str(run.root),
            e.directions or list(cfg.directions.attributes),
            disentangled=e.disentangled and cfg.disentangle.enabled,
            evaluator=e.evaluator,
            n=e.n,
            gamma=None if e.gamma == "auto" else e.gamma,
            target=e.target,
            calibration_n=e.calibration_n,
            prompts=e.prompts,
            keep_norm=cfg.disentangle.keep_norm,
            conditions=cfg.disentangle.conditions,
            device=ctx.device,
            log=ctx.log,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    return {
        "outputs": _outputs(run, [EvalFolder(run.eval).summary_path]),
        "summary": {k: summary[k] for k in summary if k != "calibration"},
    }


def _figures(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.tasks.figures import pipeline_figures

    with progress_bar(disable=not ctx.show_progress) as bar:
        job = bar.add_task("figures", total=None, rate="")
        files = pipeline_figures(
            run, cfg, ctx.device, progress=lambda name, total: bar.update(job, advance=1, total=total, rate=name)
        )
    return {"outputs": _outputs(run, files)}


def _report(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    from hspace.tasks.report import write_report

    return {"outputs": _outputs(run, [write_report(run)])}


_STAGE_LIST = [
    Stage(
        "sample",
        ("sample",),
        (),
        _sample,
        lambda r: f"{r['recomputed_shards']} shards computed",
        create=_create_sample,
        runtime=("dask_address", "allow_download"),
        doc="Mass-sample a model (paper sec. 3), storing h at every step, x0 and seeds in OUT/samples.zarr.",
    ),
    Stage(
        "invert",
        ("invert",),
        (),
        _invert,
        views.recon,
        create=_create_invert,
        doc="DDIM-invert real images (eta = 0) into a run folder, their labels as annotations, so "
        "`hspace directions OUT --attribute A` works as on samples.",
    ),
    Stage(
        "annotate",
        ("annotate",),
        ("sample",),
        _annotate,
        lambda r: f"{len(r['attributes'])} attributes",
        check=_check_annotators,
        doc="Score every stored x0 with annotators into RUN/annotations.zarr (resumable).",
    ),
    Stage(
        "pca",
        ("pca",),
        ("sample",),
        _pca,
        views.pca_line,
        runtime=("dask_address",),
        doc="Per-timestep PCA of h (paper sec. 4.1): RUN/pca.zarr and directions pcNN + randomNN.",
    ),
    Stage(
        "name",
        ("name",),
        ("pca", "sample"),
        _name,
        views.names_line,
        doc="Measure how much each direction moves every attribute and name it (pc02 ~ yaw).",
    ),
    Stage(
        "jacobian",
        ("jacobian",),
        ("sample",),
        _jacobian,
        views.jac,
        doc="Image-specific directions (paper sec. 4.2, Alg. 1 and 2): top-K right singular vectors of d eps/d h.",
    ),
    Stage(
        "directions",
        ("directions",),
        ("annotate", "sample"),
        _directions,
        lambda r: f"{len(r['outputs'])} directions",
        doc="Mean-difference direction per attribute (paper eq. (10)).",
    ),
    Stage(
        "disentangle",
        ("disentangle", "directions"),
        ("directions",),
        _disentangle,
        lambda r: f"{len(r['outputs'])} directions",
        doc="Disentangle directions by projection (paper eq. (11)).",
    ),
    Stage(
        "evaluate",
        ("evaluate", "disentangle", "directions", "device"),
        ("directions", "disentangle", "annotate"),
        _evaluate,
        views.leakage,
        cli_sections={"evaluate": None, "disentangle": ["keep_norm"]},
        doc="Table 1: mean change of every attribute per direction, original and disentangled (eq. (11)), "
        "on held-out samples.",
    ),
    Stage(
        "figures",
        ("figures", "directions", "annotate"),
        ("pca", "directions", "disentangle", "annotate"),
        _figures,
        lambda r: f"{len(r['outputs'])} files",
    ),
    Stage("report", (), tuple(PIPELINE[:-1]), _report),
]
STAGES: dict[str, Stage] = {s.name: s for s in _STAGE_LIST}
