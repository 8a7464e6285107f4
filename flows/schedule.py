"""Scheduled pipeline runs (`hspace schedule`): a Prefect deployment of `hspace run` on a
cron or interval schedule, served until Ctrl-C or SIGTERM; each run writes its own folder
and, with ``keep``, old complete runs are pruned. The pipeline itself is
flows.runner.run_pipeline."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

from prefect import flow

from hspace.data.catalog import RunError, RunFolder
from hspace.flows.progress import progress_bar
from hspace.tasks.config import RunConfig

SERVED_ROOT = "HSPACE_SCHEDULE_OUT_ROOT"  # set by `hspace schedule` (serve_into)


def check_scheduled(config, out_root, keep):
    """A scheduled run's parameters checked as the CLI checks them, before anything is
    written: ``out_root`` the folder `hspace schedule` serves, ``keep`` None or a positive
    integer, the config by its model and the whole-config check. RunError otherwise (a run
    created through the API with other values)."""
    import os

    from pydantic import ValidationError

    from hspace.tasks.check import check_config
    from hspace.tasks.config import validation_message

    served = os.environ.get(SERVED_ROOT)
    if not served:
        raise RunError(f"this deployment runs only under `hspace schedule` (which sets {SERVED_ROOT}); nothing written")
    if not isinstance(out_root, str) or Path(out_root).resolve() != Path(served):
        raise RunError(f"out_root {out_root!r} is not the folder this schedule serves ({served}); nothing written")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise RunError(f"keep must be a positive integer or null, got {keep!r}; nothing written")
    try:
        cfg = RunConfig.model_validate(config)
    except ValidationError as e:
        raise RunError(validation_message(e, "config: ") + "; nothing written") from None
    return cfg, check_config(cfg, "the scheduled run's config")


def serve_into(out_root: Path) -> None:
    """Record, for the flow runs this process serves (they inherit its environment), the one
    folder they may write into (``check_scheduled``)."""
    import os

    os.environ[SERVED_ROOT] = str(Path(out_root).resolve())


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
    (a CancelledError traceback); here SIGTERM cancels the runner's polling loops through
    their anyio cancel scope (level-triggered: a cancellation that some await swallows is
    delivered again at the next one; a single asyncio task.cancel() from SIGINT was lost
    in 3 of 5 full-suite runs and the runner kept serving). A scheduled run in flight gets
    SIGTERM too (the runner would otherwise wait for it, however long): its folder is left
    as a killed run leaves it, and a rerun resumes it."""
    import asyncio
    import contextlib
    import os
    import signal

    from prefect.runner import Runner

    class QuietRunner(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            for entry in list(self._flow_run_process_map.values()):
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(entry.get("pid"), signal.SIGTERM)
            loop, loops = getattr(self, "_loop", None), getattr(self, "_loops_task_group", None)
            if loop is None or loops is None:  # not serving yet: stop as Ctrl-C would
                os.kill(os.getpid(), signal.SIGINT)
                return

            def stop() -> None:
                self.stopping = True
                poller = getattr(self, "_scheduled_run_poller", None)
                if poller is not None:
                    poller.stopping = True
                loops.cancel_scope.cancel()

            loop.call_soon_threadsafe(stop)

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
    oldest complete runs beyond ``keep`` are deleted (logged, and a Prefect artifact).
    Parameters that `hspace schedule` would not have served (``check_scheduled``) fail the
    run at once with one logged line; nothing is written and the schedule goes on."""
    from datetime import datetime

    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger
    from prefect.runtime import flow_run
    from prefect.states import Failed

    from hspace.data.runs import prune_runs
    from hspace.tasks.check import check_disk

    start = flow_run.scheduled_start_time or datetime.now(UTC)
    try:
        cfg, facts = check_scheduled(config, out_root, keep)
        out = Path(out_root) / f"{start.strftime('%Y%m%dT%H%M%S')}-{flow_run.name}"
        check_disk(cfg, out, facts)  # the plan's bytes against the free space, before anything starts
    except RunError as e:
        message = " ".join(str(e).split())  # one line, also for the whole-config check's list
        get_run_logger().error("refused: %s", message)
        return Failed(message=f"refused: {message}")
    from hspace.flows.runner import console, run_pipeline
    from hspace.tasks.sample import resolve_device
    from hspace.tasks.stages import Context

    run = RunFolder(out)
    with run.lock(f"hspace schedule run {flow_run.name}"):
        ctx = Context(
            device=resolve_device(cfg.device), dask_address=cfg.dask_address, log=console.print, bar=progress_bar
        )
        run_pipeline(run, cfg, ctx)
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
