"""Direction files: ``NAME.safetensors`` holding one tensor ``v`` of shape (T, C, H, W) and string
metadata: model, revision, h_point, scheduler, eta, steps, method, source, scale_unit. Never pickles.

``Direction`` is a direction file read (``read``): v, its metadata and one check,
``Direction.fits(model, scheduler, ...)``, that refuses it where it does not fit the model,
schedule, steps, h point or edit branch it is applied to, naming the field that differs: the
CLI, the stages and ``hspace.apply`` all call it. ``warn_setting`` warns when it was made under
another sampler setting (eta, clipping of P_t): it still applies, but edits another process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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


def load(path: Path, tensor: bool = True) -> tuple[torch.Tensor | None, dict]:
    """Read a direction file: (v (T, C, H, W) float32, metadata dict of strings); ``tensor``
    False: the metadata alone (v None, not read)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"direction file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        v = load_file(str(path))["v"] if tensor else None
    except (SafetensorError, KeyError, OSError) as e:
        raise RunError(f"{path} is not a readable direction file ({e}); re-create it") from None
    return v, meta


def scheduler_name(scheduler) -> str:
    """A compact id of a noise schedule: class-independent, keyed on the betas (flow matching: its shift)."""
    cfg = scheduler.config
    if "beta_schedule" not in cfg:
        return f"flow:{cfg.num_train_timesteps}:{cfg.shift}:{'dynamic' if cfg.get('use_dynamic_shifting') else 'fixed'}"
    return f"{cfg.beta_schedule}:{cfg.num_train_timesteps}:{cfg.beta_start}:{cfg.beta_end}"


def metadata_for_run(run_meta: dict, method: str, source: str, scale_unit: str, **extra) -> dict:
    """The metadata of a direction made from a run's samples (the fields ``Direction.fits`` reads)."""
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


MISFIT = {
    "model": "another model",
    "steps": "another number of steps",
    "h_point": "another h point",
    "scheduler": "another noise schedule",
}


@dataclass(frozen=True)
class Direction:
    """One direction file, read: ``v`` (T, C, H, W) float32 (an x_T direction: (1, C, R, R)) and
    the metadata hspace wrote with it (model fingerprint, steps, scheduler, eta, clipping,
    h point, edit branch, method)."""

    name: str
    v: torch.Tensor
    meta: dict
    path: Path

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def h_point(self) -> str:
        return self.meta.get("h_point", "output")

    @property
    def model(self) -> str:
        """The sha256 fingerprint of the U-Net it was found on."""
        return self.meta["model"]

    @property
    def eta(self):
        return json.loads(self.meta["eta"]) if "eta" in self.meta else None

    @property
    def edit_branch(self) -> str:
        return self.meta.get("edit_branch", "both")

    def __repr__(self) -> str:
        return (
            f"Direction({self.name!r}, shape={tuple(self.v.shape)}, steps={self.meta.get('steps')}, "
            f"method={self.meta.get('method')!r}, model={str(self.meta.get('model'))[:12]})"
        )

    @property
    def on_x_T(self) -> bool:
        """An x_T direction (eq. (10) with q = x_T): it moves the initial noise, not h."""
        return self.meta.get("h_point") == "xT"

    def fits(
        self,
        model: str | None,
        scheduler,
        *,
        steps: int | None = None,
        h_shape: tuple | None = None,
        h_point: str | None = None,
        edit_branch: str | None = None,
    ) -> None:
        """Raise RunError (one line, naming the field) unless this direction fits: ``model``
        the U-Net's fingerprint (None: not known, not judged), ``scheduler`` the sampling's
        scheduler (its betas; None: not judged), ``steps`` and ``h_point`` the sampling's
        (None: the direction's own), ``h_shape`` the U-Net's h, ``edit_branch`` the guided
        batch's half that edits go to (text-conditioned models; None: not judged). An x_T
        direction is judged on its model only."""
        if self.on_x_T:
            if model is not None and self.meta.get("model") != model:
                raise RunError(f"direction {self.path} was made for another model; use one from this model")
            return
        made = self.meta.get("edit_branch")
        if edit_branch is not None and made is not None and made != edit_branch:
            raise RunError(
                f"direction {self.path} was made with its edits on the {made!r} branch of the guided batch, this "
                f"sampling edits {edit_branch!r}; sample with --edit-branch {made} (or rebuild the direction)"
            )
        expected = {
            "model": model,
            "steps": None if steps is None else str(steps),
            "h_point": h_point,
            "scheduler": None if scheduler is None else scheduler_name(scheduler),
        }
        for key, want in expected.items():
            got = self.meta.get(key)
            if got is None:
                raise RunError(f"direction {self.path} has no {key!r} metadata; re-create it with hspace")
            if want is not None and got != want:
                raise RunError(
                    f"direction {self.path} was made for {MISFIT[key]} ({key}={got[:16]!r}, this run has "
                    f"{want[:16]!r}); use a direction from this model and schedule"
                )
        if h_shape is not None and tuple(self.v.shape) != (steps or self.steps, *h_shape):
            want_shape = (steps or self.steps, *h_shape)
            raise RunError(f"direction {self.path} has shape {tuple(self.v.shape)}, this model needs {want_shape}")


def read(where: str | Path) -> Direction:
    """A direction file (a path, ``RUN/NAME`` or ``PACK/NAME``: ``resolve_path``), read."""
    path = resolve_path(where)
    v, meta = load(path)
    return Direction(path.stem, v, meta, path)


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


def load_run_directions(run, meta: dict, names: list[str], unet, scheduler) -> list[tuple]:
    """RUN/directions/NAME.safetensors for each name, refusing any that does not fit the
    run's model (``unet``: h's shape at the run's point), schedule, steps and h point: [(v, metadata)]."""
    from hspace.hcore.hooks import h_shape

    missing = [d for d in names if not run.direction(d).exists()]
    if missing:
        have = sorted(p.stem for p in run.directions.glob("*.safetensors")) if run.directions.exists() else []
        raise RunError(
            f"no direction file for {missing} in {run.directions}; this run has: {', '.join(have) or 'none'}"
        )
    cfg, out = meta["config"], []
    shape = tuple(h_shape(unet, cfg["h_point"]))
    for name in names:
        d = read(run.direction(name))
        d.fits(
            meta["model"]["fingerprint"],
            scheduler,
            steps=cfg["steps"],
            h_shape=shape,
            h_point=cfg["h_point"],
            edit_branch=cfg.get("edit_branch"),
        )
        warn_setting(d.path, d.meta, {"clip_sample": cfg.get("clip_sample"), "eta": cfg.get("eta")})
        out.append((d.v, d.meta))
    return out


def lora_file(folder: Path, i: int) -> Path:
    """The safetensors file of the i-th LoRA of a morph (`hspace morph`: beside its output)."""
    return Path(folder) / f"lora_{i}.safetensors"


AVI_FIELDS = ("channels", "side", "k", "steps", "org_step", "tar_step", "prompt_a", "prompt_b", "hidden")


def predictor_file(run, name: str) -> Path:
    """RUN/directions/avi/NAME.safetensors: a trained AVI predictor (`hspace avi`), beside the
    run's direction files (not one of them: a network, not a vector)."""
    return run.directions / "avi" / f"{name}.safetensors"


def predictor_files(run) -> list[Path]:
    """The run's AVI predictor files (RUN/directions/avi/*.safetensors), sorted."""
    folder = predictor_file(run, "_").parent
    return sorted(folder.glob("*.safetensors")) if folder.exists() else []


def save_predictor(path: Path, f, meta: dict) -> Path:
    """The predictor's weights and its spec and provenance (model fingerprint, attribute, the
    training losses) as string metadata; written aside and moved in."""
    from dataclasses import asdict

    fields = {k: str(v) for k, v in asdict(f.spec).items()}
    return save_trained(path, f.state_dict(), {**meta, **fields})


def load_predictor(where: str | Path, model_fingerprint: str | None = None, steps: int | None = None):
    """(Predictor, metadata) from a predictor file (a path, or RUN/NAME for RUN/directions/avi/NAME),
    refused with one line where it is no predictor or was trained for another model or number
    of steps."""
    from hspace.data.catalog import RunFolder
    from hspace.hcore.avi import AviSpec, Predictor

    path = Path(where)
    if not path.is_file() and RunFolder(path.parent).run_json.exists():
        path = predictor_file(RunFolder(path.parent), path.name)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path))
        spec = AviSpec(**{k: meta[k] if k.startswith("prompt") else int(meta[k]) for k in AVI_FIELDS})
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        raise RunError(
            f"{path} is not an AVI predictor file ({type(e).__name__}: {e}); make one: `hspace avi`"
        ) from None
    if model_fingerprint is not None and meta.get("model") != model_fingerprint:
        raise RunError(
            f"AVI predictor {path} was trained on model {meta.get('model_id')} ({str(meta.get('model'))[:12]}), "
            f"not this one ({model_fingerprint[:12]}); train one for it with `hspace avi`"
        )
    if steps is not None and spec.steps != steps:
        raise RunError(f"AVI predictor {path} was trained for {spec.steps} sampling steps, not {steps}")
    f = Predictor(spec)
    f.load_state_dict(state)
    return f.eval(), meta


def trained_file(run, method: str, name: str) -> Path:
    """RUN/directions/METHOD/NAME.safetensors: the weights a CLIP-trained editor learnt for the
    edit NAME (`hspace clip-edits`): a LoRA, Asyrp's f, DeltaEdit's mapper."""
    return run.directions / method / f"{name}.safetensors"


def code_probe_file(run, method: str = "zsem") -> Path:
    """RUN/directions/METHOD/probe.json: `hspace diffae`'s linear probes of z_sem and h (METHOD:
    zsem for a flat autoencoder, hdae for a hierarchical one)."""
    return run.directions / method / "probe.json"


def save_trained(path: Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Weights and their provenance (``method``: the registered editing method; ``model``: the
    fingerprint they were trained on; ``steps``) as string metadata; written aside, moved in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), strings)
    tmp.replace(path)
    return path


def load_trained(where: str | Path, model_fingerprint: str | None = None, steps: int | None = None, device="cpu",
                 method: str | None = None):  # fmt: skip
    """(method class, what its ``load_weights`` made, metadata) from a trained editor's file (a
    path, or RUN/METHOD/NAME), or an AVI predictor (``load_predictor``; what ``method="avi"``
    reads); refused with one line where it is none, or was trained on another model or for
    another number of steps."""
    from hspace.data.catalog import RunFolder
    from hspace.hcore.edits import get

    if method == "avi":
        f, meta = load_predictor(where, model_fingerprint, steps)
        return get("avi"), f, meta
    path = Path(where)
    if not path.is_file() and len(path.parts) >= 3 and RunFolder(path.parents[1]).run_json.exists():
        path = trained_file(RunFolder(path.parents[1]), path.parent.name, path.name)
    if not path.is_file() and path.with_suffix(".safetensors").is_file():  # RUN/directions/METHOD/NAME
        path = path.with_suffix(".safetensors")
    if not path.is_file() and (path.parent.name == "avi" or RunFolder(path.parent).run_json.exists()):
        f, meta = load_predictor(where, model_fingerprint, steps)
        return get("avi"), f, meta
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        if meta.get("method") == "AVI":
            f, meta = load_predictor(path, model_fingerprint, steps)
            return get("avi"), f, meta
        cls = get(meta["method"])
        state = load_file(str(path))
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        raise RunError(
            f"{path} is no trained editor's file ({type(e).__name__}: {e}); make one: `hspace clip-edits`, "
            "`hspace diffae` or `hspace avi`"
        ) from None
    if model_fingerprint is not None and cls.model_bound and meta.get("model") != model_fingerprint:
        raise RunError(
            f"{meta['method']} weights {path} were trained on model {meta.get('model_id')} "
            f"({str(meta.get('model'))[:12]}), not this one ({model_fingerprint[:12]}): a fine-tuned edit "
            "applies to the model it was trained on; train one for it with `hspace clip-edits`"
        )
    if steps is not None and int(meta.get("steps", steps)) != steps:
        raise RunError(f"{meta['method']} weights {path} were trained for {meta['steps']} sampling steps, not {steps}")
    loaded = {}
    if "clip" in meta:
        from hspace.data.annotators import load_clip_guide

        loaded["guide"] = load_clip_guide(meta["clip"], device)
    if "diffae" in meta:  # a semantic code's direction: its autoencoder, the very one it was found in
        from hspace.data.diffae import diffae_fingerprint, load_diffae

        if diffae_fingerprint(meta["diffae"]) != meta.get("diffae_fingerprint"):
            raise RunError(
                f"{path} is a direction in the code of another autoencoder than {meta['diffae']} now holds "
                f"({str(meta.get('diffae_fingerprint'))[:12]}): find it again with `hspace diffae`"
            )
        loaded["diffae"] = load_diffae(meta["diffae"], device)
    try:
        return cls, cls.load_weights(state, meta, **loaded), meta
    except (KeyError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: its {meta['method']} weights do not load ({type(e).__name__}: {e})") from None
