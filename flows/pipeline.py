"""``hspace run``: the whole pipeline as one Prefect flow of cached stages.

sample -> annotate -> pca -> directions (eq. 10) -> disentangle (eq. 11) -> evaluate
(Table 1) -> figures -> report. Each stage is a Prefect task whose cache key is the
stage's fingerprint: its config section, the fingerprints of the stages it reads, and
the code version. The run folder is the truth, as for sampling shards: run.json records
each stage's fingerprint, state, timing and outputs under ``pipeline``, and a stage runs
(with ``refresh_cache``) whenever its recorded fingerprint differs or an output is
missing. So a rerun after a crash resumes, and a rerun after changing one section redoes
that stage and those downstream of it, nothing upstream.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC
from pathlib import Path
from typing import Literal

import yaml
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data.catalog import PIPELINE_STAGES, RunError, RunFolder

PIPELINE_CODE_VERSION = "pipeline-1"
BINARY = ["Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Young"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleSection(Section):
    model: str = "toy"
    n: int = Field(256, gt=0)
    steps: int = Field(20, gt=0)
    eta: float = Field(0.0, ge=0, le=1)
    seed: int = 0
    batch_size: int = Field(64, gt=0)
    h_point: Literal["output", "input"] = "output"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class AnnotateSection(Section):
    annotators: list[str] = Field(default_factory=lambda: ["oracle"], min_length=1)
    batch_size: int = Field(256, gt=0)


class PCASection(Section):
    enabled: bool = True
    components: int = Field(10, gt=0)
    method: Literal["auto", "ipca", "randomized"] = "auto"
    workers: int = Field(1, gt=0)
    batch_size: int = Field(256, gt=0)


class DirectionsSection(Section):
    attributes: list[str] = Field(default_factory=lambda: list(BINARY), min_length=1)
    top: int = Field(32, gt=0)
    held_out: int = Field(64, ge=0, description="the last samples, never used to build directions")
    latent: Literal["h", "xT"] = "h"


class DisentangleSection(Section):
    enabled: bool = True
    conditions: dict[str, list[str]] = Field(
        default_factory=dict, description="attribute -> attributes to project out (default: all the others)"
    )
    keep_norm: bool = Field(True, description="rescale each projection to the original direction's norm")


class EvaluateSection(Section):
    enabled: bool = True
    evaluator: str = "oracle"
    n: int | None = Field(None, gt=0)
    gamma: float | Literal["auto"] = 1.0
    target: float | None = Field(None, gt=0)
    calibration_n: int = Field(16, gt=0)
    prompts: dict[str, tuple[str, str]] | None = None


class FiguresSection(Section):
    sample: int = Field(0, ge=0, description="the sample the edit grids show")
    scales: list[float] = Field(default_factory=lambda: [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0], min_length=1)
    pcs: int = Field(6, ge=0, description="PCs in the PCA grid (and random directions in the baseline grid)")
    name_samples: int = Field(16, ge=0, description="samples used to name PCs by the attribute they move (0: off)")
    efficiency: bool = Field(True, description="Fig. 8: h vs x_T directions of the first attribute from n pairs")
    jacobian: bool = Field(True, description="Fig. 7: Jacobian directions of `sample`, transferred to others")
    jacobian_step: int | None = Field(None, ge=0, description="default: steps // 5")
    jacobian_k: int = Field(3, gt=0)


class RunConfig(Section):
    device: str = "auto"
    dask_address: str | None = Field(
        None, description="run sampling shards and per-timestep PCA on this Dask scheduler (not part of any cache key)"
    )
    sample: SampleSection = Field(default_factory=SampleSection)
    annotate: AnnotateSection = Field(default_factory=AnnotateSection)
    pca: PCASection = Field(default_factory=PCASection)
    directions: DirectionsSection = Field(default_factory=DirectionsSection)
    disentangle: DisentangleSection = Field(default_factory=DisentangleSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    figures: FiguresSection = Field(default_factory=FiguresSection)


def load_config(path: Path | None) -> RunConfig:
    """The validated config; RunError naming the offending key (before any work starts)."""
    if path is None:
        return RunConfig()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise RunError(f"cannot read --config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RunError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RunError(f"--config {path} must be a mapping of sections (sample, annotate, pca, ...)")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise RunError(f"--config {path}: {key}: {msg}{more}; see `hspace config --example`") from None
    unknown = [a for a in cfg.disentangle.conditions if a not in cfg.directions.attributes]
    if unknown:
        raise RunError(f"--config {path}: disentangle.conditions names {unknown}, not in directions.attributes")
    return cfg


def _key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_keys(cfg: RunConfig, model_fingerprint: str) -> dict[str, str]:
    """Each stage's fingerprint: its section + upstream fingerprints + code version."""
    d = cfg.model_dump()
    k = {"sample": _key("sample", d["sample"], model_fingerprint, PIPELINE_CODE_VERSION)}
    k["annotate"] = _key("annotate", d["annotate"], k["sample"])
    k["pca"] = _key("pca", d["pca"], k["sample"])
    k["directions"] = _key("directions", d["directions"], k["annotate"])
    k["disentangle"] = _key("disentangle", d["disentangle"], k["directions"])
    k["evaluate"] = _key("evaluate", d["evaluate"], d["device"], k["directions"], k["disentangle"], k["annotate"])
    k["figures"] = _key("figures", d["figures"], k["pca"], k["directions"], k["disentangle"], k["annotate"])
    k["report"] = _key("report", [k[s] for s in STAGES[:-1]])
    return k


STAGES = PIPELINE_STAGES
INPUTS = {  # what each stage reads (its fingerprint includes theirs)
    "sample": ["model"],
    "annotate": ["sample"],
    "pca": ["sample"],
    "directions": ["annotate", "sample"],
    "disentangle": ["directions"],
    "evaluate": ["directions", "disentangle", "annotate"],
    "figures": ["pca", "directions", "disentangle", "annotate"],
    "report": STAGES[:-1],
}


def example_config(kind: str = "toy") -> str:
    """A documented example config (YAML) for the toy world or the CelebA-HQ DDPM."""
    if kind == "toy":
        return TOY_EXAMPLE
    return CELEBA_EXAMPLE


TOY_EXAMPLE = """\
# hspace run --config run.yaml --out runs/pipeline
# Every key is optional; these are the defaults (toy world, ~5-8 min on 2 CPU cores).
device: auto                  # auto, cpu, cuda, cuda:N
dask_address: null            # e.g. tcp://scheduler:8786: sampling shards and PCA run there (shared run folder)
sample:                       # hspace sample (sec. 3): h_{T:1} of every sample into samples.zarr
  model: toy                  # 'toy', a local diffusers folder, or a Hugging Face id in the local cache
  n: 256
  steps: 20                   # DDIM steps; directions only apply to runs with the same steps
  eta: 0.0
  seed: 0
  batch_size: 64              # = one Zarr shard = one Prefect task
  h_point: output             # output or input of the U-Net mid block
  dtype: float32
annotate:                     # hspace annotate: oracle | oracle:PATH | celeba40:PATH | hopenet:PATH | clip:PATH
  annotators: [oracle]
pca:                          # hspace pca (sec. 4.1, Fig. 5-6)
  enabled: true
  components: 10
  method: auto                # auto | ipca | randomized
  workers: 1                  # Dask workers (one task per timestep)
directions:                   # hspace directions (eq. 10), one per attribute
  attributes: [Smiling, Eyeglasses, Wearing_Hat, Male, Young]
  top: 32                     # top/bottom K samples
  held_out: 64                # the last samples are never used to build directions
  latent: h                   # h or xT
disentangle:                  # hspace disentangle (eq. 11)
  enabled: true
  conditions: {}              # e.g. {Wearing_Hat: [Male]}; default: all the other attributes
  keep_norm: true             # rescale each projection to the original's norm (false: eq. 11 as is)
evaluate:                     # hspace evaluate (Table 1) on the held-out samples
  enabled: true
  evaluator: oracle
  gamma: 1.0                  # a number, or auto (calibrated per direction)
figures:
  sample: 0                   # the sample the edit grids show
  scales: [-3, -2, -1, 0, 1, 2, 3]
  pcs: 6
  name_samples: 16            # samples used to name each PC after the attribute it moves
  efficiency: true            # Fig. 8: h vs x_T directions of the first attribute from 1..30 pairs
  jacobian: true              # Fig. 7: top Jacobian directions of `sample`, transferred to other samples
  jacobian_step: null         # default: steps // 5
  jacobian_k: 3
"""

CELEBA_EXAMPLE = """\
# hspace run --config celeba.yaml --out runs/celeba   (a GPU is strongly advised)
# The DDPM from the local Hugging Face cache (huggingface-cli download google/ddpm-ema-celebahq-256),
# the AnyCost CelebA-40 classifier, Hopenet and CLIP from local files.
device: cuda
sample:
  model: google/ddpm-ema-celebahq-256
  n: 10000
  steps: 50
  eta: 0.0
  batch_size: 32
  dtype: float16
annotate:
  annotators:
    - celeba40:/models/anycost/attribute_predictor.pt
    - hopenet:/models/hopenet/hopenet_robust_alpha1.pkl
pca:
  components: 10
  method: randomized          # D = 512x8x8 = 32,768: see README "PCA engines"
  workers: 4
directions:
  attributes: [Smiling, Eyeglasses, Wearing_Hat, Male, Young]   # add yaw (Hopenet) with a numeric gamma:
  top: 100                                                       # CLIP's prompts do not score pose
  held_out: 1000
disentangle:
  conditions: {Eyeglasses: [Young], Wearing_Hat: [Male]}
evaluate:
  evaluator: clip:/models/clip-vit-base-patch32   # a folder saved by CLIPModel.save_pretrained
  n: 1000
  gamma: auto
  prompts:
    Smiling: [A smiling person, A person]
    Eyeglasses: [A person wearing glasses, A person]
    Wearing_Hat: [A person wearing a hat, A person]
    Male: [A man, A woman]
    Young: [A young person, An old person]
figures:
  scales: [-2, -1, 0, 1, 2]
"""


# ------------------------------------------------------------------------------ stages


def _outputs_exist(run: RunFolder, outputs: list[str]) -> bool:
    return all((run.root / o).exists() for o in outputs)


def run_stages(cfg: RunConfig, out: Path, log=print) -> dict:
    """Run the pipeline into ``out`` (called inside the flow; the CLI holds the lock)."""
    from prefect import task

    from data import models
    from tasks.sample import init_run, resolve_device

    run = RunFolder(out)
    device = resolve_device(cfg.device)
    ref = models.resolve(cfg.sample.model)
    keys = stage_keys(cfg, ref.fingerprint)
    s = cfg.sample
    sample_config = {
        "n": s.n,
        "steps": s.steps,
        "eta": s.eta,
        "seed": s.seed,
        "batch_size": s.batch_size,
        "h_point": s.h_point,
        "dtype": s.dtype,
    }
    if cfg.directions.held_out >= s.n - 1:
        raise RunError(f"directions.held_out {cfg.directions.held_out} leaves no samples to build directions from")
    _, scheduler = models.load(ref)
    meta = init_run(run, sample_config, ref, scheduler, device)
    meta["pipeline_config"] = cfg.model_dump(mode="json")
    run.write(meta)
    (run.root / "run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    bodies = {
        "sample": lambda: _sample(run, cfg.dask_address),
        "annotate": lambda: _annotate(run, cfg, device),
        "pca": lambda: _pca(run, cfg),
        "directions": lambda: _directions(run, cfg),
        "disentangle": lambda: _disentangle(run, cfg),
        "evaluate": lambda: _evaluate(run, cfg, device, log),
        "figures": lambda: _figures(run, cfg, device),
        "report": lambda: _report(run, cfg),
    }
    summary = {}
    for stage in STAGES:
        key = keys[stage]
        record = run.read().get("pipeline", {}).get(stage, {})
        fresh = record.get("key") == key and record.get("state") == "done"
        fresh = fresh and _outputs_exist(run, record.get("outputs", []))
        if fresh:
            log(f"{stage}: cached ({key})")
            summary[stage] = "cached"
            continue

        @task(
            name=f"pipeline-{stage}",
            cache_key_fn=lambda ctx, params: params["key"],
            result_storage=run.prefect_results,
            persist_result=True,
            refresh_cache=True,  # run.json, not Prefect's record, says whether the files exist
        )
        def stage_task(stage: str, key: str) -> dict:
            result = bodies[stage]()
            publish_artifacts(run, stage, key, result)
            return result

        t0 = time.perf_counter()
        _set(run, stage, key=key, state="running", started=time.time(), inputs=INPUTS[stage])
        try:
            result = stage_task(stage, key)
        except BaseException:
            _set(run, stage, state="failed")
            raise
        seconds = time.perf_counter() - t0
        _set(run, stage, state="done", seconds=round(seconds, 2), **result)
        log(f"{stage}: done in {seconds:.1f} s" + headline(stage, result))
        summary[stage] = "ran"
    return summary


def headline(stage: str, result: dict) -> str:
    """The one number worth reading when a stage ends, e.g. evaluate's Table-1 leakage."""
    if result.get("skipped"):
        return " (skipped)"
    if stage == "sample":
        return f"; {result.get('recomputed_shards', 0)} shards computed"
    if stage == "annotate":
        return f"; {len(result.get('attributes', []))} attributes"
    if stage == "directions":
        return f"; {len(result.get('outputs', []))} directions"
    if stage == "evaluate":
        before = result.get("summary", {}).get("original", {})
        after = result.get("summary", {}).get("disentangled", {})
        off, diag = before.get("mean_offdiagonal"), before.get("mean_diagonal")
        if off is None or diag is None:
            return ""
        text = f"; leakage off-diagonal {off:.3g}, diagonal {diag:.3g}"
        if after.get("mean_offdiagonal") is not None and off and diag:
            text = (
                f"; leakage off-diagonal {off:.3g} -> {after['mean_offdiagonal']:.3g} "
                f"({100 * (after['mean_offdiagonal'] / off - 1):+.0f}%), "
                f"diagonal kept {100 * after['mean_diagonal'] / diag:.0f}%"
            )
        return text
    return ""


def publish_artifacts(run: RunFolder, stage: str, key: str, result: dict) -> None:
    """Prefect artifacts for the UI: a markdown summary per stage, the leakage tables of
    the evaluation, and a link to the report (keys: lowercase, digits, dashes)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    slug = "".join(c if c.isalnum() else "-" for c in run.root.name.lower()).strip("-") or "run"
    outputs = "\n".join(f"- `{run.root / o}`" for o in result.get("outputs", [])) or "- (none)"
    create_markdown_artifact(
        f"### {stage}\n\nrun folder `{run.root}`, fingerprint `{key}`\n\noutputs:\n{outputs}\n",
        key=f"hspace-{slug}-{stage}",
        description=f"hspace run stage {stage}",
    )
    if stage == "evaluate" and (run.root / "eval").exists():
        import csv

        for label in ("original", "disentangled"):
            path = run.root / "eval" / f"leakage_{label}.csv"
            if path.exists():
                rows = list(csv.DictReader(path.open()))
                create_table_artifact(rows, key=f"hspace-{slug}-leakage-{label}", description=f"leakage ({label})")
    if stage == "report":
        report = (run.root / "report.html").resolve()
        create_link_artifact(report.as_uri(), link_text="report.html", key=f"hspace-{slug}-report")


def _set(run: RunFolder, stage: str, **fields) -> None:
    meta = run.read()
    meta.setdefault("pipeline", {}).setdefault(stage, {}).update(fields)
    run.write(meta)


def _sample(run: RunFolder, dask_address: str | None) -> dict:
    from flows.sample import sample_flow

    result = sample_flow(str(run.root), dask_address=dask_address)
    run.set_stage("sample", state="done", recomputed_shards=len(result["recomputed"]))
    return {"outputs": ["samples.zarr"], "recomputed_shards": len(result["recomputed"])}


def _annotate(run: RunFolder, cfg: RunConfig, device: str) -> dict:
    from data.catalog import SampleStore
    from flows.sample import progress_bar
    from tasks.annotate import annotate_run

    names = []
    n = SampleStore(run.samples).layout.n
    with progress_bar() as bar:
        for spec in cfg.annotate.annotators:
            job = bar.add_task(f"annotate ({spec.split(':')[0]})", total=n, rate="")
            names = annotate_run(
                str(run.root), spec, cfg.annotate.batch_size, device, progress=lambda k, job=job: bar.advance(job, k)
            )["names"]
    return {"outputs": ["annotations.zarr"], "attributes": names}


def _pca(run: RunFolder, cfg: RunConfig) -> dict:
    if not cfg.pca.enabled:
        return {"outputs": [], "skipped": True}
    from flows.sample import progress_bar
    from tasks.pca import run_pca

    p = cfg.pca
    with progress_bar() as bar:
        job = bar.add_task("pca (timesteps)", total=run.read()["config"]["steps"], rate="")
        r = run_pca(
            str(run.root),
            p.components,
            p.method,
            p.batch_size,
            p.workers,
            cfg.dask_address,
            progress=lambda i: bar.advance(job, i),
        )
    return {"outputs": ["pca.zarr"], "method": r.get("method")}


def _directions(run: RunFolder, cfg: RunConfig) -> dict:
    from tasks.supervised import build_direction

    d = cfg.directions
    first = cfg.sample.n - d.held_out
    files = []
    for attribute in d.attributes:
        r = build_direction(str(run.root), attribute, d.top, d.latent, first=first)
        files.append(str(Path(r["path"]).relative_to(run.root)))
    return {"outputs": files}


def _disentangle(run: RunFolder, cfg: RunConfig) -> dict:
    if not cfg.disentangle.enabled:
        return {"outputs": [], "skipped": True}
    from tasks.supervised import disentangle_direction

    attrs = cfg.directions.attributes
    names = [a if cfg.directions.latent == "h" else f"{a}_xT" for a in attrs]
    files = []
    for a, name in zip(attrs, names, strict=True):
        against = cfg.disentangle.conditions.get(a) or [x for x in attrs if x != a]
        against_names = [x if cfg.directions.latent == "h" else f"{x}_xT" for x in against]
        if not against_names:
            continue
        r = disentangle_direction(str(run.root), name, against_names, keep_norm=cfg.disentangle.keep_norm)
        files.append(str(Path(r["path"]).relative_to(run.root)))
    return {"outputs": files}


def _evaluate(run: RunFolder, cfg: RunConfig, device: str, log) -> dict:
    e = cfg.evaluate
    if not e.enabled or cfg.directions.latent != "h":
        return {"outputs": [], "skipped": True}
    from flows.sample import progress_bar
    from tasks.evaluate import run_evaluation

    with progress_bar() as bar:
        job = bar.add_task("evaluate (edit-and-score passes)", total=None, rate="")
        summary = run_evaluation(
            str(run.root),
            list(cfg.directions.attributes),
            disentangled=cfg.disentangle.enabled,
            evaluator=e.evaluator,
            n=e.n,
            gamma=None if e.gamma == "auto" else float(e.gamma),
            target=e.target,
            calibration_n=e.calibration_n,
            prompts=e.prompts,
            keep_norm=cfg.disentangle.keep_norm,
            conditions=cfg.disentangle.conditions,
            device=device,
            log=log,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    return {"outputs": ["eval/summary.json"], "summary": {k: summary[k] for k in summary if k != "calibration"}}


def _figures(run: RunFolder, cfg: RunConfig, device: str) -> dict:
    from flows.sample import progress_bar
    from tasks.figures import pipeline_figures

    with progress_bar() as bar:
        job = bar.add_task("figures", total=None, rate="")
        files = pipeline_figures(
            run, cfg, device, progress=lambda name, total: bar.update(job, advance=1, total=total, rate=name)
        )
    return {"outputs": [str(Path(f).relative_to(run.root)) for f in files]}


def _report(run: RunFolder, cfg: RunConfig) -> dict:
    from tasks.report import write_report

    path = write_report(run)
    return {"outputs": [str(path.relative_to(run.root))]}


def validate_cron(cron: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise RunError(
            f"--cron {cron!r} is not a cron expression: give five fields (minute hour day month weekday), "
            "e.g. '0 3 * * *' for 03:00 every day"
        ) from None
    return cron


def make_deployment(
    cfg: RunConfig,
    cron: str | None,
    name: str,
    out_root: Path,
    interval: float | None = None,
    concurrency: int = 1,
    keep: int | None = None,
):
    """A Prefect deployment of the pipeline on a cron schedule (or every ``interval``
    seconds); each run writes its own folder under ``out_root`` (served by `hspace
    schedule`). At most ``concurrency`` runs at once (default 1: a run that outlasts the
    interval makes the next one wait, so two large runs never share a GPU); ``keep``: after
    each completed run, delete the oldest complete run folders beyond that many."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    if (cron is None) == (interval is None):
        raise RunError("give either --cron or --interval")
    if cron is not None:
        validate_cron(cron)
    if interval is not None and not interval > 0:
        raise RunError(f"--interval must be a positive number of seconds, got {interval}")
    if concurrency < 1:
        raise RunError(f"--concurrency must be at least 1, got {concurrency}")
    if keep is not None and keep < 1:
        raise RunError(f"--keep must be at least 1, got {keep}")
    return scheduled_run.to_deployment(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"config": cfg.model_dump(mode="json"), "out_root": str(Path(out_root).resolve()), "keep": keep},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description="hspace run on a schedule (hspace schedule)",
    )


def serve_until_stopped(deployment) -> None:
    """Serve ``deployment`` until Ctrl-C or SIGTERM; either pauses its schedule and returns
    quietly. Prefect's runner answers SIGTERM with a sys.exit from inside the event loop
    (a CancelledError traceback); here SIGTERM is turned into SIGINT, which asyncio
    handles by cancelling the runner's task cleanly, as for Ctrl-C."""
    import asyncio
    import os
    import signal

    from prefect.runner import Runner

    class QuietRunner(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    runner = QuietRunner(pause_on_shutdown=True)
    runner.add_deployment(deployment)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass


@flow(name="hspace-scheduled-run")
def scheduled_run(config: dict, out_root: str, keep: int | None = None) -> str:
    """One scheduled pipeline run into OUT_ROOT/<scheduled time>-<flow run name> (module
    level, so a Prefect runner can load it by its entrypoint); then, with ``keep``, the
    oldest complete runs beyond ``keep`` are deleted (logged, and a Prefect artifact)."""
    from datetime import datetime

    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger
    from prefect.runtime import flow_run

    from data.catalog import prune_runs

    start = flow_run.scheduled_start_time or datetime.now(UTC)
    out = Path(out_root) / f"{start.strftime('%Y%m%dT%H%M%S')}-{flow_run.name}"
    cfg = RunConfig.model_validate(config)
    run = RunFolder(out)
    with run.lock(f"hspace schedule run {flow_run.name}"):
        run_stages(cfg, out)
    if keep is not None:
        deleted = prune_runs(Path(out_root), keep)
        if deleted:
            get_run_logger().info("--keep %d: deleted %s", keep, ", ".join(p.name for p in deleted))
            create_markdown_artifact(
                "**--keep {}**: deleted the oldest complete runs\n\n{}".format(
                    keep, "\n".join(f"- `{p}`" for p in deleted)
                ),
                key="hspace-pruned-runs",
                description="run folders deleted by hspace schedule --keep",
            )
    return str(out)


def pipeline_flow_fn():
    """The Prefect flow (built lazily so importing this module stays cheap)."""
    from prefect import flow

    @flow(name="hspace-run")
    def hspace_run(config: dict, out: str) -> dict:
        cfg = RunConfig.model_validate(config)
        return run_stages(cfg, Path(out))

    return hspace_run
