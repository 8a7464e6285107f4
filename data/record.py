"""run.json, typed (pydantic): the run record ``RunFolder.record()`` reads once per command
and passes down. Unknown keys are kept, so a run.json written by an older or newer hspace
reads and writes back unchanged.

``parsed`` is the one place run.json is parsed: once per process and version of the file (its
inode, size and change times), every later read in the command is handed that parse (a copy: a
caller may change its dict); this process's own writes drop it (``forget``), another's or an
edit by hand give the file a new version."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

FORMAT_VERSION = 1


class ModelRecord(BaseModel):
    """The model a run was made with: the user's spec, where it resolved, its HF revision,
    the sha256 of its weights (data.models.weights_sha256) and the scheduler's class."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    path: str | None = None
    revision: str | None = None
    fingerprint: str | None = None
    scheduler: str | None = None


class StageRecord(BaseModel):
    """One stage's record: state, fingerprint, inputs, outputs, seconds, plus what the
    stage's body returned (kept as extra fields)."""

    model_config = ConfigDict(extra="allow")
    state: str = "pending"
    key: str | None = None
    inputs: list[str] = []
    outputs: list[str] = []
    seconds: float | None = None
    error: str | None = None


class RunRecord(BaseModel):
    """run.json, typed: read once per command (``RunFolder.record``) and passed down.
    Unknown keys are kept, so a run.json written by an older or newer hspace reads and
    writes back unchanged."""

    model_config = ConfigDict(extra="allow")
    format: int = FORMAT_VERSION
    created: str | None = None
    config: dict
    model: ModelRecord
    stages: dict[str, StageRecord] = {}
    versions: dict = {}
    runtime: dict = {}
    pipeline_config: dict | None = None  # the whole `hspace run` config, for a pipeline run
    pipeline_stages: list[str] | None = None  # the stages `hspace run` runs here, in order

    @property
    def kind(self) -> str:
        """'inversion' (real images, `hspace invert`) or 'sample'."""
        return self.config.get("kind", "sample")

    @property
    def is_inversion(self) -> bool:
        return self.kind == "inversion"

    @property
    def is_pipeline(self) -> bool:
        """Made by `hspace run` (every pipeline stage is expected of it)."""
        return self.pipeline_stages is not None or self.pipeline_config is not None

    def expected_stages(self) -> list[str]:
        """The stages to show for this run: a pipeline run's (recorded by `hspace run`) and
        then any other stage it has a record of; else the ones it has records of."""
        listed = list(self.pipeline_stages or [])
        return listed + [s for s in self.stages if s not in listed]

    def stage_dicts(self) -> dict[str, dict]:
        return {k: v.model_dump(exclude_none=True) for k, v in self.stages.items()}


_PARSED: dict[Path, tuple[tuple[int, ...], dict]] = {}


def forget(path: Path) -> None:
    """Drop the parse of ``path`` (this process just wrote it)."""
    _PARSED.pop(path, None)


def parsed(path: Path) -> dict:
    """run.json at ``path`` as a dict (json.JSONDecodeError where it is not JSON), parsed once
    per version of the file."""
    st = path.stat()
    version = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _PARSED.get(path)
    if known is None or known[0] != version:
        known = _PARSED[path] = (version, json.loads(path.read_text()))
    return copy.deepcopy(known[1])
