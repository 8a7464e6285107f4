"""The stage registry (DVC and Dagster style: a stage declares what it reads and writes): a
stage is one ``STAGE = Stage(...)`` declaration at the end of its own module in tasks/, next
to its logic.

A declaration names the stage, its config sections (tasks/config.py), the stages whose
outputs it reads, the run-folder artifacts it writes (catalog keys, known before it runs)
and one body ``body(run, *sections, ctx) -> {"outputs": [...], ...}``. Everything else is
derived from the declarations: the CLI command and its options (flows/cli.py), `hspace run`'s
order, the fingerprint and the run.json record (flows/runner.py), the plan, the report's
stage table and the Prefect artifacts. A new stage is one new module with its declaration
plus its config section; no list of stages is written anywhere else.

Stage modules keep heavy imports (torch, diffusers, Prefect) inside functions, so that
collecting the declarations for the CLI's help costs well under a second.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hspace.data.catalog import ARTIFACTS, RunError, RunFolder, fingerprint
from hspace.data.disk import DISK_FULL, disk_full_message
from hspace.tasks.config import RunConfig

log = logging.getLogger(__name__)
CODE_VERSION = "stages-4"  # part of every fingerprint: bump when a stage's maths or layout changes
BEFORE = "before"  # ``inputs=BEFORE``: every pipeline stage ordered before this one (the report)


@dataclass
class Context:
    """What a stage needs besides its config and not part of any fingerprint."""

    device: str = "cpu"
    dask_address: str | None = None
    show_progress: bool = True
    allow_download: bool = False
    log: Callable[[str], None] = field(default=log.info)
    # the progress display long work draws: a rich Progress factory (the fronts give theirs,
    # flows/progress.py); rich's plain one where none is given
    bar: Callable[..., Any] | None = None

    def progress(self):
        """A progress display (rich.progress.Progress) for the body's loops: hidden without
        show_progress."""
        if self.bar is None:
            from rich.progress import Progress

            return Progress(disable=not self.show_progress)
        return self.bar(disable=not self.show_progress)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (or top-level keys): fingerprinted, handed to the body by name
    inputs: tuple[str, ...] | str  # stages whose outputs it reads (their fingerprints enter its own), or BEFORE
    outputs: tuple[str, ...]  # catalog artifacts (data.catalog.ARTIFACTS keys) it writes
    body: Callable  # body(run, <each section by its name>, ctx) -> {"outputs": [paths relative to the run], ...}
    summary: Callable[[dict], str] = lambda result: ""  # the one line after "done in N s"
    create: Callable | None = None  # (run, *sections, ctx, dry) -> run.json: a stage that makes the run folder
    check: Callable | None = None  # (run, cfg, ctx): bad input refused before the lock and Prefect start
    publish: Callable | None = None  # (run, slug) -> None: Prefect artifacts beyond the outputs list
    doc: str = ""  # the help of `hspace NAME`
    command: bool = True  # `hspace NAME` exists
    pipeline: bool = True  # part of `hspace run`
    out_default: str | None = None  # a creating stage's --out default (None: --out is required)
    cli_sections: dict | None = None  # sections (-> fields or None for all) as options; default its own
    runtime: tuple[str, ...] = ()  # runtime options of its command besides device, break_lock, verbose
    cost: Callable | None = None  # (RunConfig) -> U-Net sample-passes its body makes, for --plan (None: none)

    def __post_init__(self):
        unknown = [o for o in self.outputs if o not in ARTIFACTS]
        if unknown:
            raise ValueError(f"stage {self.name}: outputs {unknown} are not catalog artifacts ({sorted(ARTIFACTS)})")
        for what, fn in (("body", self.body), ("create", self.create)):
            if fn is None:
                continue
            params = list(inspect.signature(fn).parameters)
            want = ["run", *self.sections, "ctx"]
            if params[: len(want)] != want:
                raise ValueError(
                    f"stage {self.name}: its {what} must take its sections by name, ({', '.join(want)}); "
                    f"it takes ({', '.join(params)})"
                )

    def section_values(self, cfg: RunConfig) -> list:
        return [getattr(cfg, s) for s in self.sections]

    def sections_of(self, cfg: RunConfig) -> dict:
        """Its sections of ``cfg`` by name: what its body and create take as keywords."""
        return dict(zip(self.sections, self.section_values(cfg), strict=True))

    def run_body(self, run: RunFolder, cfg: RunConfig, ctx: Context) -> dict:
        return self.body(run, ctx=ctx, **self.sections_of(cfg))

    def make_run(self, run: RunFolder, cfg: RunConfig, ctx: Context, dry: bool = False):
        """Create (or re-check) the run folder of a creating stage; ``dry``: checks only."""
        return self.create(run, ctx=ctx, dry=dry, **self.sections_of(cfg))

    def declared_paths(self, run: RunFolder) -> list[Path]:
        return [run.path(o) for o in self.outputs]

    def is_fresh(self, run: RunFolder, record: dict, key: str) -> bool:
        """Whether this stage need not run (the one cache decision): its run.json record is
        done under ``key`` and every output it recorded and declared is on disk (a stage
        its config turned off declares nothing)."""
        return (
            record.get("key") == key
            and record.get("state") == "done"
            and run.has(record.get("outputs"))
            and (bool(record.get("skipped")) or all(p.exists() for p in self.declared_paths(run)))
        )


_DECLARES = re.compile(r"^STAGE = Stage\(", re.MULTILINE)


@functools.cache
def registry() -> dict[str, Stage]:
    """Every stage declared in a module of hspace.tasks (``STAGE = Stage(...)`` at module
    level), in an order that follows the inputs: each stage after the stages it reads (ties by
    name), one with ``inputs=BEFORE`` (the report) after every pipeline stage, which become its
    inputs."""
    import hspace.tasks as package

    found: dict[str, Stage] = {}
    for info in pkgutil.iter_modules(package.__path__):
        source = Path(package.__path__[0], f"{info.name}.py")
        if source.exists() and _DECLARES.search(source.read_text()):
            s = importlib.import_module(f"hspace.tasks.{info.name}").STAGE
            if s.name in found:
                raise ValueError(f"two stages are named {s.name!r}")
            found[s.name] = s
    depth = _depths(found)
    ordered = sorted(found.values(), key=lambda s: (depth[s.name], s.name))
    stages: dict[str, Stage] = {}
    for s in ordered:
        if s.inputs == BEFORE:
            s = _with_inputs(s, tuple(p.name for p in ordered if p.pipeline and p.inputs != BEFORE))
        stages[s.name] = s
    return stages


def _depths(found: dict[str, Stage]) -> dict[str, float]:
    """Each stage's distance from the stages that read nothing (a creating stage: 0); a
    ``BEFORE`` stage comes last. ValueError for an unknown input or a cycle."""
    depth: dict[str, float] = {}

    def of(name: str, path: tuple[str, ...]) -> float:
        if name in path:
            raise ValueError(f"stages read each other in a cycle: {' -> '.join((*path, name))}")
        if name not in depth:
            s = found[name]
            if s.inputs == BEFORE:
                depth[name] = float("inf")
            else:
                unknown = [i for i in s.inputs if i not in found]
                if unknown:
                    raise ValueError(f"stage {name} reads {unknown}, which no module declares")
                depth[name] = 1 + max((of(i, (*path, name)) for i in s.inputs), default=-1)
        return depth[name]

    for name in found:
        of(name, ())
    return depth


def _with_inputs(stage: Stage, inputs: tuple[str, ...]) -> Stage:
    from dataclasses import replace

    return replace(stage, inputs=inputs)


def pipeline_stages() -> list[str]:
    """The stages of `hspace run`, in order."""
    return [s.name for s in registry().values() if s.pipeline]


def creating_stage() -> Stage:
    """The pipeline stage that makes the run folder (sample)."""
    return next(s for s in registry().values() if s.pipeline and s.create is not None)


def stage_key(stage: Stage, cfg: RunConfig, stages: dict, model_fingerprint: str | None) -> str:
    """The stage's fingerprint: its sections, the recorded fingerprints of its inputs (from
    ``stages``, the run record's stage records), the model's and the code version."""
    parts = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in stage.section_values(cfg)]
    upstream = [stages.get(s, {}).get("key") for s in stage.inputs]
    return fingerprint(stage.name, parts, upstream, model_fingerprint, CODE_VERSION)


def run_stage_body(run_dir: str, stage: str, key: str, config: dict, ctx: Context) -> dict:
    """One stage as a Prefect task. Prefect records it (state, timing, logs) but caches
    nothing: run.json's stage record is the one cache decision (flows/runner.execute).
    Bad input (RunError) comes back as ``{"error": message}``, not as a failed task, so a
    refused command writes nothing and logs no traceback; the runner raises it."""
    try:
        return registry()[stage].run_body(RunFolder(run_dir), RunConfig.model_validate(config), ctx)
    except RunError as e:
        return {"error": str(e)}
    except OSError as e:  # the disk filled (another writer): one line, like bad input, not a traceback
        if e.errno not in DISK_FULL:
            raise
        return {"error": disk_full_message(e, Path(run_dir), f"the {stage} stage wrote its outputs")}


@functools.cache
def stage_task():
    """``run_stage_body`` as the Prefect task (made on first use: declaring the stages, as
    the CLI does for its help, must not import Prefect)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name="stage", cache_policy=NO_CACHE, persist_result=False)(run_stage_body)


def outputs(run: RunFolder, paths) -> list[str]:
    """Paths as a stage record lists them: relative to the run folder."""
    return [run.relative(p) for p in paths]
