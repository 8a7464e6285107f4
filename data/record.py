"""run.json, typed (pydantic): the run record ``RunFolder.record()`` reads once per command
and passes down. Unknown keys are kept, so a run.json written by an older or newer hspace
reads and writes back unchanged."""

from __future__ import annotations

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
