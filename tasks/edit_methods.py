"""What `hspace edit` is asked for, parsed and checked before any work: the direction files
and their strengths (``DirectionSpec``), the editing method named with ``--edit-method`` (its
needs against the other options, ``resolve_method``; a method needing weights it trained,
``Trained``), the grid's strengths, steps window and rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hspace.data import directions as dirfile
from hspace.data.catalog import RunError


@dataclass(frozen=True)
class DirectionSpec:
    name: str
    path: Path | None  # None: a method row that needs no file (--edit-method)
    gamma: float | None
    prompt: str | None = None  # its cells are rendered under this prompt (a source method's --target-prompt)


def parse_direction(text: str) -> DirectionSpec:
    """'FILE' or 'FILE:gamma' (a Windows drive colon is not a gamma)."""
    path, gamma = text, None
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            gamma = float(tail)
            path = head
        except ValueError:
            pass
    if gamma is not None and not math.isfinite(gamma):
        raise RunError(f"--direction {text!r}: the strength must be a finite number")
    p = dirfile.resolve_path(path)  # a file, RUN/NAME or PACK/NAME
    return DirectionSpec(name=p.stem, path=p, gamma=gamma)


@dataclass
class Trained:
    """A method that needs weights it trained, named with its file (``avi:predictor=PATH``,
    ``diffusionclip:weights=PATH``; PATH a file, RUN/NAME or RUN/METHOD/NAME): loaded and
    checked against the model once the model is known (``load``), then made for each sample
    from its replay (``EditMethod.from_replay``)."""

    cls: type
    path: str
    predictor: object = None
    meta: dict | None = None

    def __getattr__(self, item):  # the method's declaration: name, needs, strength_problem, ...
        if item == "cls":
            raise AttributeError(item)
        return getattr(self.cls, item)

    def load(self, model_fingerprint: str, steps: int, device: str = "cpu") -> Trained:
        cls, self.predictor, self.meta = dirfile.load_trained(
            self.path, model_fingerprint, steps, device, method=self.cls.name
        )
        if cls is not self.cls:
            raise RunError(f"{self.path} holds {cls.name} weights, not {self.cls.name}'s: name it as {cls.name}")
        return self

    def made(self, replay, unet, scheduler, indices):
        return self.cls.from_replay(replay, unet, scheduler, indices, self.predictor, self.meta.get("attribute"))


def weights_path(spec: str, where: str) -> str:
    """The trained file a weights method's spec names (``weights=PATH``; AVI's ``predictor=PATH``);
    RunError where it names none."""
    from hspace.hcore.edits import get, split_spec

    name, settings = split_spec(spec)
    key = "predictor" if name == "avi" else "weights"
    if not settings.get(key):
        cls = get(spec)
        raise RunError(f"{where} {spec}: name its file, {cls.name}:{key}=PATH ({cls.trainer.split(' RUN')[0]})")
    return str(settings[key])


def acts_on_code(spec: str | None) -> bool:
    """Whether ``spec`` names a method that edits a diffusion autoencoder's code (zsem): it
    brings its own model, so a photo needs no --model."""
    from hspace.hcore.edits import get

    try:
        return spec is not None and get(spec).acts_on == "code"
    except ValueError:
        return False


def resolve_method(name: str | None, asyrp: bool, directions: list[str], target_prompt: str | None = None):
    """The editing method ``--edit-method NAME`` names (hcore.edits; None: none named),
    checked before any work: it must be registered, the grid needs a --direction unless the
    method needs none, one that edits toward a prompt (Prompt-to-Prompt, Plug-and-Play) takes
    --target-prompt, one that needs a source (SDEdit) starts from the sample's own output (a
    photo: the photo) and takes --target-prompt if it likes, and one that needs weights it
    trained is not run by `hspace edit` from direction files and --scales alone."""
    from hspace.hcore.edits import get, make, split_spec

    method = None
    if name is not None:
        try:
            method = get(name)
            if split_spec(name)[1] and not method.needs:  # settings ("sv-scale:index=1:step=2"): made here
                method = make(name)
        except ValueError as e:
            raise RunError(f"--edit-method: {e}") from None
        if asyrp and name != "asyrp":
            raise RunError(f"--asyrp is the editing method 'asyrp': give it alone, not with --edit-method {name}")
        other = [n for n in method.needs if n not in ("direction", "prompt_pair", "source", "weights")]
        if other:
            raise RunError(f"--edit-method {name} needs {', '.join(other)}, which `hspace edit` does not take yet")
        if "weights" in method.needs:  # its trained file: "avi:predictor=PATH", "diffusionclip:weights=PATH"
            path = weights_path(name, "--edit-method")
            method = Trained(method, str(path))
        if "source" in method.needs:
            pass  # --target-prompt optional: the prompt the source is denoised under
        elif ("prompt_pair" in method.needs) != (target_prompt is not None):
            need = "needs --target-prompt TEXT (the source prompt is the sample's own)"
            raise RunError(f"--edit-method {name} {need if target_prompt is None else 'takes no --target-prompt'}")
    elif target_prompt is not None:
        raise RunError("--target-prompt is for an --edit-method that edits toward a prompt (p2p, pnp, sdedit)")
    if not directions and (method is None or "direction" in method.needs):
        raise RunError("give at least one --direction FILE[:gamma] (or an --edit-method that needs none)")
    return method


def with_prompt(method, text, target_prompt: str | None, model_id: str):
    """The method made with ``--target-prompt`` where it edits toward a prompt (refused on a
    model without text), else as given."""
    from hspace.hcore.edits import EditMethod

    if method is None or isinstance(method, EditMethod) or "prompt_pair" not in method.needs:
        return method
    if text is None:
        raise RunError(f"--edit-method {method.name} edits toward a prompt: {model_id} takes no text (a pixel model)")
    return method.from_prompt(target_prompt, text.tokenizers[0])


def with_method(
    method, specs: list[DirectionSpec], vectors: list, window=None, target_prompt=None
) -> tuple[list, list]:
    """The grid's rows under ``--edit-method``: a method that needs a direction (other than
    the direction methods h, asyrp and xT, which ``render_edits`` makes from the files) acts
    with each file; one made already (toward a --target-prompt) or that needs nothing is a row
    of its own, swept over the scales; so is one needing a source, made per sample by
    ``render_edits`` and rendered under ``target_prompt`` where one is given."""
    from hspace.hcore.edits import EditMethod

    if method is None:
        return specs, vectors
    if isinstance(method, Trained):
        return [*specs, DirectionSpec(method.name, None, None)], [*vectors, method]
    if not isinstance(method, EditMethod) and "source" in method.needs:
        return [*specs, DirectionSpec(method.name, None, None, prompt=target_prompt)], [*vectors, method]
    if isinstance(method, EditMethod) or "direction" not in method.needs:
        made = method if isinstance(method, EditMethod) else method()
        return [*specs, DirectionSpec(name=method.name, path=None, gamma=None)], [*vectors, made]
    if method.name not in ("h", "asyrp", "xT"):
        return specs, [method.from_direction(v, window) for v in vectors]
    return specs, vectors


def check_scales(method, scales: list[float] | None) -> list[float]:
    """The grid's strengths: ``scales``, each a strength of the method's own row (sdedit's t0 in
    (0, 1], an injection share in [0, 1]) or refused before any work; None: -2..2 (gammas; times
    a method's first calibration strength where that is above 1: zsem's -16..16), or 0..1 by
    quarters where the method's strength is a share."""
    own = method is not None and "direction" not in method.needs
    if scales is None:  # in the method's own unit: multiples of its first calibration strength
        unit = max(1.0, float(method.strength_start)) if own else 1.0
        scales = [unit * s for s in (-2.0, -1.0, 0.0, 1.0, 2.0)]
        if own and any(map(method.strength_problem, scales)):
            scales = [s for s in (0.0, 0.25, 0.5, 0.75, 1.0) if not method.strength_problem(s)]
    problem = next((p for p in map(method.strength_problem, scales) if p), None) if own else None
    if problem:
        raise RunError(f"--scales: {problem}")
    return scales


def parse_scales(text: str) -> list[float]:
    """--scales '-2,-1,0,1,2' -> the gammas of the grid's columns."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RunError(f"--scales {text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(g) for g in values):
        raise RunError(f"--scales {text!r} holds a non-finite value")
    return values


def parse_window(text: str | None, steps: int) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(x) if x else None for x in text.split(":"))
    except ValueError:
        raise RunError(f"--window {text!r} is not S0:S1 (step indices, e.g. 0:25)") from None
    a, b = a or 0, steps if b is None else b
    if not (0 <= a < b <= steps):
        raise RunError(f"--window {text!r} must satisfy 0 <= S0 < S1 <= {steps} (steps of the schedule)")
    return a, b
