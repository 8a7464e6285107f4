"""The single-stage commands' options, generated from the config sections (tasks/config.py):
one option per field, with its name, default, limits and help, and back from the option
values to a validated ``RunConfig``."""

from __future__ import annotations

import inspect as pyinspect
import types
import typing
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import ValidationError

from hspace.data.catalog import RunError
from hspace.tasks.config import RunConfig, section_model, validation_message


def cli_type(annotation):
    """The type typer parses an option as; pydantic validates the rest (Literal, lists, unions)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    base = args[0] if optional and len(args) == 1 else annotation
    if base in (int, float, bool, Path, str):
        return base | None if optional else base
    if typing.get_origin(base) is tuple:  # a fixed number of values after one option (--prompt-pair A B)
        return base | None if optional else base
    return str | None if optional else str


def cli_parameters(section_name: str, fields: list[str] | None) -> list[pyinspect.Parameter]:
    """typer parameters for the fields of a section (all, or ``fields``): one option each,
    named ``section__field``, with the field's default, help and CLI hints."""
    import typer

    params = []
    for name, info in section_model(section_name).model_fields.items():
        extra = info.json_schema_extra or {}
        if extra.get("hidden") or (fields is not None and name not in fields):
            continue
        flag = extra.get("cli") or "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        kind = Path | None if extra.get("yaml_file") else cli_type(info.annotation)
        if isinstance(default, list):
            default = ",".join(str(x) for x in default)
        required = default is None and not isinstance(kind, types.UnionType)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        params.append(
            pyinspect.Parameter(
                f"{section_name}__{name}",
                pyinspect.Parameter.KEYWORD_ONLY,
                default=... if required else default,
                annotation=Annotated[kind, typer.Option(*decls, help=info.description)],
            )
        )
    return params


def config_from_options(values: dict, data: dict) -> RunConfig:
    """RunConfig from generated option values ({section__field: value}) on top of ``data``;
    RunError naming the option for a bad value."""
    for key, value in values.items():
        section, field = key.split("__")
        if value is not None and (section_model(section).model_fields[field].json_schema_extra or {}).get("yaml_file"):
            try:
                value = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError) as e:
                raise RunError(f"cannot read --{field} {value}: {str(e).splitlines()[0]}") from None
        data.setdefault(section, {})[field] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise RunError(validation_message(e, "", options=True)) from None
