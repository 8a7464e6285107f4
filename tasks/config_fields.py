"""The field types and the base of every config section (tasks/config.py): command-line lists,
eta, prompts, clip_sample, and ``option`` (a field with its help text, limits and CLI hints)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat

BINARY = ["Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Young"]


def _split(value):
    """'a,b' -> ['a', 'b'] (a command-line list); lists pass through."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


Names = Annotated[list[str], BeforeValidator(_split)]
Floats = Annotated[list[FiniteFloat], BeforeValidator(_split)]
Ints = Annotated[list[int], BeforeValidator(_split)]
# a name that may be switched off: "none" (or empty) on the command line, null in YAML
MaybeName = Annotated[
    str | None, BeforeValidator(lambda v: None if isinstance(v, str) and v.lower() in ("", "none") else v)
]


def _eta(value):
    """--eta: '1' -> 1.0, '1,1,0' -> [1.0, 1.0, 0.0]; a window rule 'V@S0:S1' stays a string."""
    if isinstance(value, str) and "@" not in value:
        parts = _split(value)
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ValueError("must be a number, a comma-separated list (one per step) or V@S0:S1") from None
        return numbers[0] if len(numbers) == 1 and "," not in value else numbers
    return value


def _prompts(value):
    """--prompts as typed: 'a,b' -> ['a', 'b']; '@FILE' -> one prompt per non-empty line of FILE."""
    if isinstance(value, str) and value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
        value = [line.strip() for line in lines if line.strip()]
        if not value:
            raise ValueError(f"the prompt file {path} holds no prompt")
        return value
    return _split(value)


Prompts = Annotated[list[str], BeforeValidator(_prompts)]

# The paper's eta_t (eq. (5)): one number, one per step, or a window rule "V@S0:S1"
Eta = Annotated[FiniteFloat | list[FiniteFloat] | str, BeforeValidator(_eta)]
# Clamping P_t to [-1, 1]: eq. (3) has none and the paper authors' code turns the model's off
# (YAML reads a bare off/on as false/true: both spellings mean the same here)
ClipSample = Annotated[
    Literal["off", "on", "model"],
    BeforeValidator(lambda v: {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v),
]
CLIP_HELP = "clamp P_t to [-1, 1]: off (eq. (3), the paper), on, or model (its scheduler's)"


def _h_point(value):
    """'output' / 'input' (the mid block's) or 'MODULE[:output|:input]': its syntax here, the
    module against the model when the model is loaded (hcore.hooks.point_module)."""
    from hspace.hcore.hooks import split_point

    split_point(value)  # ValueError: one line naming the forms
    return value


# Where h is read: the mid block (the paper's) or any named module of the denoiser
HPoint = Annotated[str, BeforeValidator(_h_point)]
HPoints = Annotated[list[HPoint], BeforeValidator(_split)]
H_POINT_HELP = (
    "where h is read: 'output' or 'input' of the U-Net mid block (the paper's), or any module of the denoiser "
    "('down_blocks.2', 'up_blocks.1.resnets.0'; ':input' for its input)"
)


def option(default, description: str, **extra):
    """A section field: default, help text, limits (gt, ge, ...) and CLI hints."""
    limits = {k: extra.pop(k) for k in ("gt", "ge", "le", "lt", "min_length") if k in extra}
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return Field(**kw, description=description, json_schema_extra=extra or None, **limits)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def flow_eta_problem(scheduler, eta, steps: int) -> str | None:
    """What is wrong with an eta for a flow-matching model (SD3, FLUX: it has none), or None."""
    from hspace.hcore.flow import check_flow, is_flow

    if is_flow(scheduler):
        try:
            check_flow(scheduler, eta, steps)
        except ValueError as e:
            return str(e)
    return None


def resolve_eta(eta, steps: int) -> float | list[float]:
    """The eta a run records: one number where every step has the same, else one per step
    (hcore.sampler.eta_schedule); RunError naming --eta for a bad value."""
    from hspace.data.catalog import RunError
    from hspace.hcore.sampler import eta_schedule

    try:
        etas = eta_schedule(eta, steps)
    except ValueError as e:
        raise RunError(f"--{e}") from None  # every message of eta_schedule starts with "eta"
    return etas[0] if len(set(etas)) == 1 else etas


def resolve_clip(setting: str, scheduler) -> bool:
    """--clip-sample off | on | model (the model's scheduler config) -> the bool a run records."""
    return bool(scheduler.config.get("clip_sample", False)) if setting == "model" else setting == "on"
