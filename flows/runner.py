"""The one stage runner, the service both fronts call: `hspace <stage>`, `hspace run` and
``import hspace`` (``run_stage``, ``run_pipeline``) go through ``execute_stage`` and
``execute_pipeline``, which go through ``execute``.

One prologue for every stage: the lock (held by the caller), the fingerprint
(tasks.stages.stage_key), one state record per stage in run.json (``stages``: state, key,
inputs, outputs, seconds), the stage body as a Prefect task, Prefect artifacts, and one
summary line. The cache decision is made here and only here, from run.json: a
single-stage command always runs its stage; `hspace run` skips a stage whose record is
done with the same fingerprint and whose recorded and declared outputs all exist (so a
rerun resumes, and a changed section redoes that stage and those downstream of it).
Prefect records every flow and task run and caches none of them.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from rich.console import Console

from hspace.data.catalog import RunError, RunFolder
from hspace.data.disk import require_space, run_disk_needs
from hspace.flows.progress import progress_bar
from hspace.tasks.config import RunConfig
from hspace.tasks.report import publish_artifacts
from hspace.tasks.stages import Context, Stage, creating_stage, pipeline_stages, registry, stage_key, stage_task

console = Console(highlight=False, soft_wrap=True)


def execute(run: RunFolder, stage: Stage, cfg: RunConfig, ctx: Context, force: bool = True) -> dict:
    """Run one stage into ``run`` (the caller holds its lock) and record it."""
    record = run.record()
    key = stage_key(stage, cfg, record.stage_dicts(), record.model.fingerprint)
    previous = record.stage_dicts().get(stage.name, {})
    if not force and stage.is_fresh(run, previous, key):
        ctx.log(f"{stage.name}: cached ({key})")
        return {**previous, "cached": True}
    needed = run_disk_needs(run, cfg).get(stage.name, 0)  # sampling checks its pending shards itself
    require_space(run.root, needed, f"the {stage.name} stage")
    t0 = time.perf_counter()
    with run.stage(stage.name, restore_on_refusal=force, key=key, inputs=list(stage.inputs), started=time.time()):
        result = stage_task().with_options(name=stage.name, task_run_name=f"{stage.name}-{key}")(
            str(run.root), stage.name, key, cfg.model_dump(mode="json"), ctx
        )
        if "error" in result:
            raise RunError(result["error"])  # puts the stage record back as it was
        publish_artifacts(run, stage, key, result)
    seconds = time.perf_counter() - t0
    run.set_stage(stage.name, state="done", seconds=round(seconds, 2), **result)
    line = "skipped" if result.get("skipped") else stage.summary(result)
    ctx.log(f"{stage.name}: done in {seconds:.1f} s" + (f"; {line}" if line else ""))
    return result


@flow(name="hspace-stage")
def stage_flow(run_dir: str, stage: str, config: dict, context: dict) -> dict:
    """One single-stage command as a Prefect flow run (named "RUN stage")."""
    run, cfg, declared = RunFolder(Path(run_dir)), RunConfig.model_validate(config), registry()[stage]
    ctx = Context(**context, log=console.print, bar=progress_bar)
    try:
        if declared.create:
            declared.make_run(run, cfg, ctx)
        return execute(run, declared, cfg, ctx, force=True)
    except RunError as e:  # bad input: one line from the CLI, not a failed flow run with a traceback
        return {"error": str(e)}


@flow(name="hspace-run")
def pipeline_flow(config: dict, out: str, context: dict) -> dict:
    """`hspace run`: every pipeline stage in order, each skipped when its record is fresh."""
    ctx = Context(**context, log=console.print, bar=progress_bar)
    return run_pipeline(RunFolder(Path(out)), RunConfig.model_validate(config), ctx)


def run_pipeline(run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
    import yaml

    creating_stage().make_run(run, cfg, ctx)
    meta = run.read()
    meta["pipeline_config"] = cfg.model_dump(mode="json")
    meta["pipeline_stages"] = pipeline_stages()  # what `hspace list` expects of this folder
    run.write(meta)
    run.run_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    summary = {}
    for name in pipeline_stages():
        result = execute(run, registry()[name], cfg, ctx, force=False)
        summary[name] = "cached" if result.get("cached") else "ran"
    return summary


def in_prefect(flow_obj, run_dir: Path, stage: str, fingerprint: str | None):
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


def execute_pipeline(cfg, out: Path, break_lock: bool = False, console=None) -> None:
    """The pipeline flow on ``out`` under the run folder's lock, recorded to the standing
    local Prefect server (or PREFECT_API_URL); `hspace run` and hspace.run_pipeline call it
    after checking the config."""
    from hspace.data import models
    from hspace.flows.prefect_server import prefect_api
    from hspace.tasks.sample import resolve_device

    context = {"device": resolve_device(cfg.device), "dask_address": cfg.dask_address}
    with RunFolder(out).lock(f"hspace run --out {out}", break_stale=break_lock):
        fingerprint = models.resolve(cfg.sample.model).fingerprint
        with prefect_api(console):
            in_prefect(pipeline_flow, out, "run", fingerprint)(cfg.model_dump(mode="json"), str(out), context)


def execute_stage(declared: Stage, run_dir: Path, cfg, runtime: dict) -> dict:
    """One stage on a run folder, as `hspace STAGE` runs it (checks, lock, Prefect flow);
    RunError for bad input. The CLI's stage commands and the Python API (hspace.run_stage)
    both call it."""
    from hspace.data import models
    from hspace.flows.prefect_server import prefect_api
    from hspace.tasks.sample import resolve_device

    run = RunFolder(run_dir)
    context = {
        "device": resolve_device(cfg.device),
        "dask_address": runtime.get("dask_address"),
        "allow_download": bool(runtime.get("allow_download")),
    }
    ctx = Context(**context, bar=progress_bar)
    if declared.create is None:
        run.record()  # a clear error for a folder that is not a run, before any lock
    if declared.check is not None:  # bad input refused before the lock and Prefect
        declared.check(run, cfg, ctx)
    if declared.create is not None:
        declared.make_run(run, cfg, ctx, dry=True)
    with run.lock(f"hspace {declared.name} {run_dir}", break_stale=runtime.get("break_lock", False)):
        if declared.create is not None:  # the flow run is tagged with the model's fingerprint
            spec = declared.section_values(cfg)[0].model
            tag = models.resolve(spec, allow_download=context["allow_download"]).fingerprint
        else:
            tag = run.record().model.fingerprint
        with prefect_api(console):  # the standing local server (PREFECT_API_URL, when set, wins)
            flow = in_prefect(stage_flow, run_dir, declared.name, tag)
            result = flow(str(run_dir), declared.name, cfg.model_dump(mode="json"), context)
        if "error" in result:
            raise RunError(result["error"])
    return result
