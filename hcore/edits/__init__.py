"""Editing methods: one module each in this package, one contract, one registry.

An editing method changes a generation toward an attribute. It says what it needs (a direction
file, a prompt pair, a source image, weights it trained: ``needs``), the name and unit of its
strength (``strength``, ``unit``), and where it acts (``acts_on``: the h-space activation at the
hook point, the latent x_t, the initial noise x_T, attention processors, other weights). For one
batch at given strengths it returns an :class:`Action`, which the sampler
(:func:`hspace.hcore.sampler.sample`) consults at every step:

- ``start(x_T)``: the initial noise, before the first step;
- ``x_t(step, x)``: the latent before the step's U-Net pass (``first_step``: the steps before it
  change nothing, and the sampler skips them);
- ``delta(step)``: h_t + delta at the hook point (eq. (6), in P_t and D_t; with ``asyrp`` the
  unedited eps feeds D_t, Kwon et al.'s P_t-only edit);
- ``session(unet)``: a context around the whole generation (attention processors, weights);
- ``paired(prompts)``: a method that carries a source generation in the same batch (Prompt-to-
  Prompt, Plug-and-Play; hcore/edits/attention.py) returns the edited rows' prompts, and the
  batch becomes [sources; edits] from the same generators;
- ``decodes`` / ``images()``: a method with a generator of its own (a diffusion autoencoder:
  the sample's image encoded to a semantic code, moved, decoded; ``acts_on = "code"``) gives the
  edited images itself, and the run's model is not sampled (hcore.generator.generate).

Every front takes a registered method by name: `hspace edit --edit-method NAME`,
``hspace.apply(pipe, method=NAME)``, the evaluate stage's Table 1 (``evaluate.methods``).
A new method is a module here that defines a subclass of :class:`EditMethod` decorated with
:func:`register` (modules in this package are found by themselves), its test and a docs row.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

NEEDS = ("direction", "prompt_pair", "source", "weights")
ACTS_ON = ("h", "x_t", "x_T", "attention", "weights", "code")


class Action:
    """What a method does to one generation (a batch at its strengths); the defaults do nothing.
    ``branch``: under classifier-free guidance, the half of the [uncond; cond] batch an h edit
    goes to ("both", "cond", "uncond"); ``asyrp``: the edited eps feeds P_t only."""

    asyrp: bool = False
    branch: str = "both"
    first_step: int = 0  # the steps before it change nothing: the sampler skips them (z_t still drawn)
    decodes: bool = False  # it gives the edited images itself (``images``): the model is not sampled

    def images(self) -> torch.Tensor:
        """The edited images (B, 3, R, R) in [-1, 1] of a method that ``decodes``."""
        raise NotImplementedError

    def check(self, steps: int, guided: bool) -> None:
        """ValueError where the action cannot run with ``steps`` sampling steps (or guidance)."""

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """x_T (B, C, R, R), before the first step."""
        return x

    def x_t(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, R, R) before the U-Net pass of ``step`` (0 = the first denoising step)."""
        return x

    def delta(self, step: int) -> torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None:
        """What is added to h_t at ``step`` ((B, C, H, W) or broadcastable, or a function of h_t
        that gives it: a trained Asyrp's f(h_t, t)), None: nothing."""
        return None

    def session(self, unet: torch.nn.Module) -> contextlib.AbstractContextManager:
        """A context around the generation (attention processors, swapped weights)."""
        return contextlib.nullcontext()

    def paired(self, prompts: Sequence[str]) -> list[str] | None:
        """For a method that renders a source beside each edit in one batch: given the sources'
        prompts (the samples' own), the edited rows' prompts. None: no source rows."""
        return None

    def acts_on_x(self) -> bool:
        """Whether ``start`` or ``x_t`` change the latent (a plain pipeline then needs both hooks)."""
        return type(self).start is not Action.start or type(self).x_t is not Action.x_t

    def with_branch(self, branch: str) -> Action:
        twin = copy.copy(self)
        twin.branch = branch
        return twin


class Compose(Action):
    """Several actions in one generation: x modifications in order, h deltas summed (several
    directions at once, eq. (6) with a sum over k), sessions nested."""

    def __init__(self, actions: Sequence[Action]):
        self.actions = list(actions)
        if any(type(a).paired is not Action.paired for a in self.actions):
            raise ValueError("a method with a source batch (Prompt-to-Prompt, Plug-and-Play) edits alone")
        asyrp = {a.asyrp for a in self.actions if type(a).delta is not Action.delta}
        if len(asyrp) > 1:
            raise ValueError("h edits with and without Asyrp cannot share one generation: render them apart")
        self.asyrp = asyrp.pop() if asyrp else False
        if any(a.decodes for a in self.actions):
            raise ValueError("a method that decodes with a model of its own (a semantic code) edits alone")
        branches = {a.branch for a in self.actions}
        if len(branches) > 1:
            raise ValueError(f"actions edit different guidance branches {sorted(branches)}")
        self.branch = branches.pop() if branches else "both"

    def check(self, steps: int, guided: bool) -> None:
        for a in self.actions:
            a.check(steps, guided)

    @property
    def first_step(self) -> int:
        return max((a.first_step for a in self.actions), default=0)

    def start(self, x):
        for a in self.actions:
            x = a.start(x)
        return x

    def x_t(self, step, x):
        for a in self.actions:
            x = a.x_t(step, x)
        return x

    def delta(self, step):
        deltas = [d for d in (a.delta(step) for a in self.actions) if d is not None]
        if not any(callable(d) for d in deltas):
            return sum(deltas) if deltas else None
        return lambda h: sum(d(h) if callable(d) else d.to(h.device, h.dtype) for d in deltas)

    @contextlib.contextmanager
    def session(self, unet):
        with contextlib.ExitStack() as stack:
            for a in self.actions:
                stack.enter_context(a.session(unet))
            yield

    def acts_on_x(self) -> bool:
        return any(a.acts_on_x() for a in self.actions)

    def with_branch(self, branch: str) -> Compose:
        return Compose([a.with_branch(branch) for a in self.actions])


def compose(actions: Sequence[Action]) -> Action | None:
    """None for no action, the action itself for one, else their :class:`Compose`."""
    actions = [a for a in actions if a is not None]
    if not actions:
        return None
    return actions[0] if len(actions) == 1 else Compose(actions)


class EditMethod:
    """The contract of an editing method (one per module of this package).

    Class attributes: ``name`` (what every front calls it), ``needs`` (of NEEDS: what a user
    must give it), ``strength`` and ``unit`` (the name and unit of the number that sets how
    far it edits), ``acts_on`` (of ACTS_ON), ``reference`` (the paper equation or section it
    implements). ``attribute``: the attribute it edits, where known (Table 1's diagonal).
    A method needing a direction is made from one with ``from_direction``; one needing
    nothing is made with no arguments."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    strength: ClassVar[str] = "gamma"
    unit: ClassVar[str] = ""
    acts_on: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    # the strengths a calibration searches (hspace compare): (0, strength_max], from
    # strength_start; ``weakens``: a higher strength edits less (an injection share, where
    # strength_max - s is searched instead)
    strength_start: ClassVar[float] = 1.0
    strength_max: ClassVar[float] = 64.0
    weakens: ClassVar[bool] = False
    # a method that needs weights: the command that trains them, and whether they apply only to
    # the model they were trained on (a fine-tuned LoRA) or to any model's images (a semantic code)
    trainer: ClassVar[str] = ""
    model_bound: ClassVar[bool] = True
    attribute: str | None = None

    @classmethod
    def from_direction(cls, v: torch.Tensor, window: tuple[int, int] | None = None) -> EditMethod:
        """The method acting with direction ``v`` (its steps limited to ``window``)."""
        if "direction" not in cls.needs:
            raise TypeError(f"editing method {cls.name!r} takes no direction")
        return cls(v, window)

    @classmethod
    def from_prompt(cls, target: str, tokenizer) -> EditMethod:
        """The method editing each sample toward the prompt ``target`` (the source prompt: the
        sample's own); ``tokenizer``: the model's first."""
        if "prompt_pair" not in cls.needs:
            raise TypeError(f"editing method {cls.name!r} takes no prompt")
        return cls(target)

    @classmethod
    def from_source(cls, source: torch.Tensor, scheduler) -> EditMethod:
        """The method starting from ``source`` (B, C, R, R) in the sampler's space (a pixel
        model's images, a latent model's latents); ``scheduler``: the model's."""
        if "source" not in cls.needs:
            raise TypeError(f"editing method {cls.name!r} takes no source")
        return cls(source, scheduler)

    def action(self, strength: float | torch.Tensor) -> Action:
        """The action at ``strength`` (a number, or a (B,) tensor: one per sample of the batch)."""
        raise NotImplementedError

    @classmethod
    def strength_problem(cls, value: float) -> str | None:
        """Why ``value`` is no strength of this method (checked before any work), None if it is."""
        return None


@dataclass
class Bound:
    """A method bound to the samples it edits, as the fronts that render many samples take it
    (Table 1, ``hspace compare``, an edit grid): ``make(indices)`` gives the made method (a
    source method needs those samples' own outputs); ``prompt``: the samples are rendered under
    this prompt instead of their own (a source method's target prompt)."""

    label: str
    cls: type[EditMethod]
    make: Callable[[list[int]], EditMethod]
    prompt: str | None = None


def once_per_indices(build: Callable[[list[int]], EditMethod]) -> Callable[[list[int]], EditMethod]:
    """``build(indices)`` made once per set of indices (a method whose making renders, e.g. AVI's
    target latents, is asked for again at every strength a calibration tries)."""
    made: dict[tuple, EditMethod] = {}

    def once(indices):
        key = tuple(int(i) for i in indices)
        if key not in made:
            made[key] = build(list(indices))
        return made[key]

    return once


_METHODS: dict[str, type[EditMethod]] = {}
_found = False


def register(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator: make ``cls`` available to every front by ``cls.name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} has no name")
    bad = [n for n in cls.needs if n not in NEEDS]
    if bad or cls.acts_on not in ACTS_ON:
        raise ValueError(f"editing method {cls.name!r}: needs {bad} not in {NEEDS} or acts_on {cls.acts_on!r}")
    _METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type[EditMethod]]:
    """Every registered method by name: this package's modules, and any registered since."""
    global _found
    if not _found:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _found = True
    return dict(_METHODS)


def split_spec(spec: str) -> tuple[str, dict]:
    """'NAME' or 'NAME:key=value:key=value' -> (NAME, settings), each value an int, a float or
    text: how every front names a method with its settings (``"sv-scale:index=1:step=2"``; colons,
    not commas, so that a spec stays one item of a comma-separated list option). A setting starts
    only at a colon followed by ``key=``, so that a value (a path) may hold colons of its own."""
    import re

    name, _, rest = spec.partition(":")
    settings: dict = {}
    for item in filter(None, (p.strip() for p in re.split(r":(?=\s*[A-Za-z_]\w*\s*=)", rest))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"editing method {spec!r}: settings are key=value, colon-separated; got {item!r}")
        for kind in (int, float):
            try:
                settings[key.strip()] = kind(value)
                break
            except ValueError:
                continue
        else:
            settings[key.strip()] = value.strip()
    return name.strip(), settings


def get(spec: str) -> type[EditMethod]:
    """The method registered under ``spec``'s name (settings after a colon are not read here);
    ValueError naming the registered ones."""
    name, _ = split_spec(spec)
    known = methods()
    if name not in known:
        raise ValueError(f"no editing method {name!r}; registered: {', '.join(sorted(known))}")
    return known[name]


def make(spec: str) -> EditMethod:
    """A method that needs nothing, made from ``spec`` with its settings; ValueError for a method
    that needs something or a setting it does not take."""
    cls, (_, settings) = get(spec), split_spec(spec)
    if cls.needs:
        raise ValueError(
            f"editing method {cls.name!r} needs {', '.join(cls.needs)}: make it with what it needs "
            f"(hspace.hcore.edits.get({cls.name!r})(...)) and pass it made"
        )
    try:
        return cls(**settings)
    except TypeError as e:
        raise ValueError(f"editing method {spec!r}: {e}") from None


def standalone(method: str | EditMethod) -> EditMethod:
    """A method ready to run without a direction file: given made (what it needs was given when
    it was made, e.g. ``SDEdit(source, scheduler)``), or made from its spec (``make``) when it
    needs nothing. What Table 1 and a plain pipeline take. ValueError otherwise."""
    if isinstance(method, EditMethod):
        return method
    return make(method)
