"""Direction files: ``NAME.safetensors`` holding one tensor ``v`` of shape (T, C, H, W)
and string metadata: model, revision, h_point, scheduler, eta, steps, method,
source, scale_unit. Never pickles.

``check`` refuses a direction that does not fit the model/schedule it is applied to,
naming the field that differs; ``warn_setting`` warns when it was made under another
sampler setting (eta, clipping of P_t): it still applies, but edits another process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from hspace.data.catalog import RunError

log = logging.getLogger(__name__)
REQUIRED_META = ("model", "revision", "h_point", "scheduler", "eta", "steps", "method", "source", "scale_unit")


def save(path: Path, v: torch.Tensor, meta: dict) -> Path:
    """Write a direction file; ``meta`` values are stored as strings (JSON for non-strings)."""
    if v.dim() != 4:
        raise ValueError(f"direction must be (T, C, H, W), got shape {tuple(v.shape)}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"direction metadata lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strings = {k: val if isinstance(val, str) else json.dumps(val) for k, val in meta.items()}
    tmp = path.with_name(path.name + ".partial")
    save_file({"v": v.detach().to(torch.float32).contiguous().cpu()}, str(tmp), metadata=strings)
    tmp.replace(path)
    return path


PACK_INDEX = "directions.json"  # a direction pack's index (hspace export)


def resolve_path(where: str | Path) -> Path:
    """A direction given as a file, or as ``DIR/NAME`` where DIR is a direction pack (its
    ``NAME.safetensors``) or a run folder (its ``directions/NAME.safetensors``)."""
    path = Path(where)
    if path.is_file():
        return path
    if path.suffix != ".safetensors":
        beside = path.parent / f"{path.name}.safetensors"  # a pack keeps its files at its top
        if beside.is_file():
            return beside
        from hspace.data.catalog import RunFolder

        run = RunFolder(path.parent)
        if run.run_json.exists() and run.direction(path.name).is_file():
            return run.direction(path.name)
    raise RunError(f"direction file {where} does not exist (give a .safetensors file, RUN/NAME or PACK/NAME)")


def load(path: Path) -> tuple[torch.Tensor, dict]:
    """Read a direction file: (v (T, C, H, W) float32, metadata dict of strings)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"direction file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        v = load_file(str(path))["v"]
    except (SafetensorError, KeyError, OSError) as e:
        raise RunError(f"{path} is not a readable direction file ({e}); re-create it") from None
    return v, meta


def scheduler_name(scheduler) -> str:
    """A compact id of a noise schedule: class-independent, keyed on the betas."""
    cfg = scheduler.config
    return f"{cfg.beta_schedule}:{cfg.num_train_timesteps}:{cfg.beta_start}:{cfg.beta_end}"


def metadata_for_run(run_meta: dict, method: str, source: str, scale_unit: str, **extra) -> dict:
    """The metadata of a direction made from a run's samples (the fields ``check`` reads)."""
    cfg, model = run_meta["config"], run_meta["model"]
    return {
        "model": model["fingerprint"],
        "model_id": model["id"],
        "revision": model.get("revision") or "",
        "h_point": cfg["h_point"],
        "scheduler": model["scheduler"],
        "eta": cfg["eta"],
        "clip_sample": cfg.get("clip_sample", "model"),  # runs from before it was recorded: the model's
        "steps": cfg["steps"],
        **({"edit_branch": cfg["edit_branch"]} if "edit_branch" in cfg else {}),  # text-conditioned runs
        "method": method,
        "source": source,
        "scale_unit": scale_unit,
        **extra,
    }


def check(
    path: Path,
    v: torch.Tensor,
    meta: dict,
    *,
    model_fingerprint: str,
    steps: int,
    h_shape: tuple[int, int, int],
    h_point: str,
    scheduler: str,
    edit_branch: str | None = None,
) -> None:
    """Raise RunError if the direction was made for another model, schedule or h point, or
    (text-conditioned models) for another edit branch under guidance."""
    expected = {"model": model_fingerprint, "steps": str(steps), "h_point": h_point, "scheduler": scheduler}
    made = meta.get("edit_branch")
    if edit_branch is not None and made is not None and made != edit_branch:
        raise RunError(
            f"direction {path} was made with its edits on the {made!r} branch of the guided batch, this sampling "
            f"edits {edit_branch!r}; sample with --edit-branch {made} (or rebuild the direction)"
        )
    for key, want in expected.items():
        got = meta.get(key)
        if got is None:
            raise RunError(f"direction {path} has no {key!r} metadata; re-create it with hspace")
        if got != want:
            what = {
                "model": "another model",
                "steps": "another number of steps",
                "h_point": "another h point",
                "scheduler": "another noise schedule",
            }[key]
            raise RunError(
                f"direction {path} was made for {what} ({key}={got[:16]!r}, this run has {want[:16]!r}); "
                "use a direction from this model and schedule"
            )
    if tuple(v.shape) != (steps, *h_shape):
        raise RunError(f"direction {path} has shape {tuple(v.shape)}, this model needs {(steps, *h_shape)}")


def warn_setting(path: Path, meta: dict, sampling: dict) -> list[str]:
    """Warn (and return the lines) where a direction was made under another eta or another
    clipping of P_t than the sampling it is applied to (``sampling``: {eta, clip_sample} as
    a run records them). Files from before these were recorded are not judged."""
    lines = []
    made, now = meta.get("clip_sample"), sampling.get("clip_sample")
    if made in ("true", "false") and now is not None and (made == "true") != bool(now):
        lines.append(
            f"direction {path} was made with P_t clipping {'on' if made == 'true' else 'off'}, "
            f"this sampling has it {'on' if now else 'off'}: its edits may differ from those it was measured with"
        )
    if "eta" in meta and sampling.get("eta") is not None and json.loads(meta["eta"]) != sampling["eta"]:
        lines.append(f"direction {path} was made at eta {meta['eta']}, this sampling uses eta {sampling['eta']}")
    for line in lines:
        log.warning(line)
    return lines


def load_run_directions(run, meta: dict, names: list[str], h_shape: tuple, scheduler) -> list[tuple]:
    """RUN/directions/NAME.safetensors for each name, refusing any that does not fit the
    run's model, schedule, steps and h point: [(v, metadata)]."""
    missing = [d for d in names if not run.direction(d).exists()]
    if missing:
        have = sorted(p.stem for p in run.directions.glob("*.safetensors")) if run.directions.exists() else []
        raise RunError(
            f"no direction file for {missing} in {run.directions}; this run has: {', '.join(have) or 'none'}"
        )
    cfg, out = meta["config"], []
    for name in names:
        v, md = load(run.direction(name))
        check(
            run.direction(name),
            v,
            md,
            model_fingerprint=meta["model"]["fingerprint"],
            steps=cfg["steps"],
            h_shape=h_shape,
            h_point=cfg["h_point"],
            scheduler=scheduler_name(scheduler),
            edit_branch=cfg.get("edit_branch"),
        )
        warn_setting(run.direction(name), md, {"clip_sample": cfg.get("clip_sample"), "eta": cfg.get("eta")})
        out.append((v, md))
    return out
