"""Stages and the pipeline from Python, through the same runner as the ``hspace`` command
(the same checks, lock, fingerprints, run.json records and Prefect flow runs)."""

from __future__ import annotations

from pathlib import Path

from hspace.data.catalog import RunError, RunFolder


def _config(config, device: str | None = None):
    from hspace.tasks.config import RunConfig

    if isinstance(config, RunConfig):
        return config if device is None else config.model_copy(update={"device": device})
    values = dict(config or {})
    if device is not None:
        values["device"] = device
    try:
        return RunConfig.model_validate(values)
    except ValueError as e:  # pydantic's ValidationError: the config's own words
        raise RunError(f"config: {e}") from None


def run_stage(stage: str, run_dir: str | Path, config=None, device: str = "auto", **runtime) -> dict:
    """Run one stage as `hspace STAGE` does: ``config`` is a RunConfig or a dict of sections
    (``{"pca": {"components": 5}}``; missing keys take their defaults). A stage that creates
    its run folder (sample, invert) writes ``run_dir``. Returns the stage's summary;
    RunError (one line) for bad input."""
    from hspace.flows.runner import execute_stage
    from hspace.tasks.stages import registry

    stages = registry()
    if stage not in stages or not stages[stage].command:
        runnable = ", ".join(name for name, s in stages.items() if s.command)
        raise RunError(f"no stage {stage!r}; stages: {runnable}")
    return execute_stage(stages[stage], Path(run_dir), _config(config, device), {"break_lock": False, **runtime})


def run_pipeline(config=None, out: str | Path = "runs/pipeline", device: str | None = None) -> Path:
    """`hspace run`: the whole config checked first, then every stage (cached ones skipped)
    into ``out``; returns the path of its report."""
    from hspace.flows.runner import execute_pipeline
    from hspace.tasks.check import check_config, check_disk
    from hspace.tasks.stages import Context, creating_stage

    cfg = _config(config, device)
    facts = check_config(cfg, "the config")
    creating_stage().make_run(RunFolder(Path(out)), cfg, Context(device=facts.device), dry=True)
    check_disk(cfg, Path(out), facts)  # before any work, as `hspace run`
    execute_pipeline(cfg, Path(out))
    return RunFolder(Path(out)).report
