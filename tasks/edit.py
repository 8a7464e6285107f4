"""Edit grids (``hspace edit``): replay one sample with the same x_T and z_{T:1} and render
it under h-space edits (paper sec. 3: h^edit_{T:1} = h_{T:1} + gamma v_{T:1}).

Grid semantics:
- directions given without a strength are rows, swept over ``scales`` (columns);
- directions given as FILE:gamma are added, at that gamma, to every cell;
- if every direction has a fixed gamma, the grid is one row of sequential edits
  (Fig. 11): the original, then each direction accumulated on top of the previous ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hspace.data import directions as dirfile
from hspace.data.catalog import RunError
from hspace.hcore.generator import Replay


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
class SampleSpec:
    """Which sample to replay: how its run renders samples (hcore.generator.Replay: seed,
    steps, eta, h point, text setup) and its index; where it does not start from its seed's
    noise, what it starts from."""

    replay: Replay
    index: int
    x_T: object = None  # (C, R, R) tensor: start here (an inverted real image) instead of the seed's noise
    noise: object = None  # (S, C, R, R) tensor: a DDPM-inverted image's noise maps, replayed at every step
    start_at: int = 0  # SDEdit: x_T is the photo noised to this step; the steps before it are skipped
    source: object = None  # (1, C, R, R): what a source method (sdedit) starts from (``own_output``; a photo)


def own_output(unet, scheduler, sample: SampleSpec) -> torch.Tensor:
    """The sample's own unedited output (1, C, R, R) in the sampler's space (a latent model's
    final latent, undecoded): what a method needing a source starts from."""
    x_T = None if sample.x_T is None else sample.x_T[None]
    noise = None if sample.noise is None else sample.noise[None]
    stop = {"stop_before": sample.replay.steps} if sample.replay.text is not None else {}
    how = {"x_T": x_T, "noise": noise, "start_at": sample.start_at, **stop}
    return sample.replay.render(unet, scheduler, [sample.index], **how)


@dataclass
class Trained:
    """A method that needs weights it trained, named with its file (``avi:predictor=PATH``, PATH a
    file or RUN/NAME): loaded and checked against the model once the model is known (``load``),
    then made for each sample from its replay (``EditMethod.from_replay``)."""

    cls: type
    path: str
    predictor: object = None
    meta: dict | None = None

    def __getattr__(self, item):  # the method's declaration: name, needs, strength_problem, ...
        if item == "cls":
            raise AttributeError(item)
        return getattr(self.cls, item)

    def load(self, model_fingerprint: str, steps: int) -> Trained:
        self.predictor, self.meta = dirfile.load_predictor(self.path, model_fingerprint, steps)
        return self

    def made(self, replay, unet, scheduler, indices):
        return self.cls.from_replay(replay, unet, scheduler, indices, self.predictor, self.meta.get("attribute"))


def plan_grid(
    specs: list[DirectionSpec], scales: list[float]
) -> tuple[list[list[list[tuple[int, float]]]], list[str], list[str]]:
    """For every cell, the list of (direction index, gamma) to apply; plus labels."""
    fixed = [(i, s.gamma) for i, s in enumerate(specs) if s.gamma is not None]
    sweep = [i for i, s in enumerate(specs) if s.gamma is None]
    if sweep and not scales:
        raise RunError("--scales is empty but some --direction has no fixed gamma; give e.g. --scales -2,-1,0,1,2")
    if not sweep:
        cells = [[fixed[:k] for k in range(len(fixed) + 1)]]
        cols = ["original"] + [f"+{specs[i].name} ({g:+g})" for i, g in fixed]
        return cells, ["sequential"], cols
    cells = [[fixed + [(i, float(g))] for g in scales] for i in sweep]
    rows = [specs[i].name + (" +fixed" if fixed else "") for i in sweep]
    return cells, rows, [f"γ={g:+g}" for g in scales]


def render_edits(
    unet,
    scheduler,
    sample: SampleSpec,
    vectors: list,
    cells: list[list[list[tuple[int, float]]]],
    window: tuple[int, int] | None = None,
    asyrp: bool = False,
    prompts: list[str | None] | None = None,
) -> np.ndarray:
    """Render every cell in one batch; returns uint8 (rows, cols, C, R, R).

    ``vectors``: editing methods (hcore.edits) or direction tensors, each made into its
    method: a (T, C, H, W) h direction acts on h (``asyrp``: Kwon et al.'s P_t-only edit;
    ``window``: its steps), a (1, C, R, R) one on the initial noise (``--latent xT``, eq. (10)
    with q = x_T: x_T + gamma v); a method class needing a source is made from the sample's
    ``source``. A cell's (index, gamma) pairs set each method's strength. A text-conditioned
    sample is rendered with its own prompt (its replay's text setup), or where a cell uses a
    vector with one of ``prompts`` (aligned with ``vectors``), under that prompt."""
    from hspace.hcore.edits import compose
    from hspace.hcore.sampler import to_uint8

    rows, cols = len(cells), len(cells[0])
    flat = [cell for row in cells for cell in row]
    gammas = torch.zeros(len(vectors), len(flat))
    for b, cell in enumerate(flat):
        for i, g in cell:
            gammas[i, b] += g
    image_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    methods = [edit_method(v, image_shape, window, asyrp, sample, scheduler, unet) for v in vectors]
    edit = compose([m.action(gammas[i]) for i, m in enumerate(methods)])
    x_T = None if sample.x_T is None else sample.x_T[None].repeat(len(flat), 1, 1, 1)
    noise = None if sample.noise is None else sample.noise[None].repeat(len(flat), *(1,) * sample.noise.dim())
    at = [sample.index] * len(flat)
    how = {"edit": edit, "x_T": x_T, "noise": noise, "start_at": sample.start_at}
    if prompts and any(prompts):
        own = sample.replay.text.prompts_for([sample.index])[0]
        how["prompts"] = [next((prompts[i] for i, _ in cell if prompts[i] is not None), own) for cell in flat]
    x0 = sample.replay.render(unet, scheduler, at, **how)
    images = to_uint8(x0).cpu().numpy()
    return images.reshape(rows, cols, *images.shape[1:])


def edit_method(v, image_shape, window=None, asyrp=False, sample: SampleSpec | None = None, scheduler=None, unet=None):
    """An editing method as given, one needing a source made from the ``sample``'s, or the
    direction method a tensor is: x_T-shaped (1, C, R, R) -> ``xT``, else an h direction -> ``h``
    (``asyrp``) with its ``window``."""
    from hspace.hcore.edits import EditMethod, get

    if isinstance(v, EditMethod):
        return v
    if isinstance(v, Trained):
        return v.made(sample.replay, unet, scheduler, [sample.index])
    if isinstance(v, type):
        if sample is None or sample.source is None:
            raise ValueError(f"editing method {v.name!r} needs the sample's source (SampleSpec.source)")
        return v.from_source(sample.source, scheduler)
    if tuple(v.shape) == (1, *image_shape):
        return get("xT").from_direction(v)
    return get("asyrp" if asyrp else "h").from_direction(v, window)


def load_directions(
    specs: list[DirectionSpec],
    *,
    model_fingerprint: str,
    steps: int,
    h_shape,
    h_point: str,
    scheduler,
    sampling: dict | None = None,
    edit_branch: str | None = None,
) -> list[torch.Tensor]:
    """The direction files of ``specs``, refused where they do not fit the model, steps and
    h point; ``sampling`` ({clip_sample, eta} of the edit) warns about other settings."""
    vectors = []
    for spec in specs:
        d = dirfile.read(spec.path)
        fit = {"steps": steps, "h_shape": tuple(h_shape), "h_point": h_point, "edit_branch": edit_branch}
        d.fits(model_fingerprint, scheduler, **fit)
        if not d.on_x_T:
            dirfile.warn_setting(spec.path, d.meta, sampling or {})
        vectors.append(d.v)
    return vectors


def model_config(ref, eta, clip_sample: str, prompt: str | None, guidance_scale: float) -> dict:
    """The sampling settings of an edit outside a run (a fresh sample of ``--model``, or a
    photo): float32, ``eta``, P_t clipping off | on | model, and for a text-conditioned model
    its one prompt (required: None is refused), guidance scale and edit branch."""
    if clip_sample not in ("off", "on", "model"):
        raise RunError(f"--clip-sample must be off, on or model, got {clip_sample!r}")
    # "model": no override, load_for_run keeps the scheduler's own setting (one load, not two)
    cfg = {"dtype": "float32", "clip_sample": None if clip_sample == "model" else clip_sample == "on", "eta": eta}
    if ref.kind == "pixel":
        if prompt is not None:
            raise RunError(f"--prompt: {ref.id} takes no text (an unconditional pixel model)")
        return cfg
    if prompt is None:
        raise RunError(f"{ref.id} is text-conditioned: give --prompt TEXT ('' on purpose: unconditional)")
    return cfg | {"prompts": [prompt], "guidance_scale": guidance_scale, "edit_branch": "both"}


def load_edit_model(ref, cfg: dict, device: str):
    """(unet, scheduler, text setup or None) for ``ref`` sampled as ``cfg`` says (a run's
    config or ``model_config``); the text setup knows the model's image size."""
    from hspace.data import models

    unet, scheduler = models.model_for(ref, cfg, device=device)
    text = models.text_for(ref, cfg, device=device)
    if text is not None and text.image_size is None:
        text.image_size = models.image_size(ref, unet.config)
    return unet, scheduler, text


def save_cells(images: np.ndarray, rows: list[str], cols: list[str], folder: Path, stem: str) -> None:
    """Every cell of a grid (rows, cols, 3, R, R) as its own PNG, STEM__ROW__COLUMN.png."""
    import re

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            name = re.sub(r"[^A-Za-z0-9._+=-]+", "_", f"{stem}__{rows[r]}__{cols[c].replace('γ=', 'gamma')}").strip("_")
            Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(folder / f"{name}.png")


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
            if split_spec(name)[1] and not method.needs:  # settings ("sv-scale:index=1,step=2"): made here
                method = make(name)
        except ValueError as e:
            raise RunError(f"--edit-method: {e}") from None
        if asyrp and name != "asyrp":
            raise RunError(f"--asyrp is the editing method 'asyrp': give it alone, not with --edit-method {name}")
        other = [n for n in method.needs if n not in ("direction", "prompt_pair", "source", "weights")]
        if other:
            raise RunError(f"--edit-method {name} needs {', '.join(other)}, which `hspace edit` does not take yet")
        if "weights" in method.needs:  # its trained file: "avi:predictor=PATH"
            path = split_spec(name)[1].get("predictor")
            if not path:
                raise RunError(f"--edit-method {name}: name its file, {method.name}:predictor=PATH (hspace avi)")
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
    (0, 1], an injection share in [0, 1]) or refused before any work; None: -2..2 (gammas), or
    0..1 by quarters where the method's strength is a share."""
    own = method is not None and "direction" not in method.needs
    if scales is None:
        scales = [-2.0, -1.0, 0.0, 1.0, 2.0]
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


def edit_sample(
    directions: list[str],
    scales: list[float] | None,
    out: Path,
    run_dir: Path | None = None,
    sample_index: int | None = None,
    model: str | None = None,
    seed: int = 0,
    steps: int = 20,
    eta: float = 1.0,
    window: str | None = None,
    asyrp: bool = False,
    device: str = "cpu",
    clip_sample: str = "off",
    prompt: str | None = None,
    guidance_scale: float = 7.5,
    edit_method: str | None = None,
    target_prompt: str | None = None,
) -> Path:
    """`hspace edit`: sample ``sample_index`` of a run (an inverted run's starts from its
    stored x_T), or sample 0 of ``model`` at ``seed``, rendered under the edits of
    ``plan_grid`` into the PNG ``out``. ``edit_method``: a registered editing method
    (hcore.edits) by name: one that needs a direction acts with the given files, one that
    needs nothing is a row of its own, swept over ``scales``."""
    from hspace.data import models
    from hspace.data.catalog import RunFolder
    from hspace.data.figures import grid_image, save_grid
    from hspace.data.stores import SampleStore
    from hspace.hcore.hooks import h_shape

    method = resolve_method(edit_method, asyrp, directions, target_prompt)
    scales = check_scales(method, scales)
    if not (0 <= eta <= 1):
        raise RunError(f"--eta must be in [0, 1], got {eta}")
    if (run_dir is None) == (model is None):
        raise RunError("give either RUN --sample I or --model M --seed S")
    if run_dir is not None:
        meta = RunFolder(run_dir).read()
        cfg = meta["config"]
        if sample_index is None or not (0 <= sample_index < cfg["n"]):
            raise RunError(f"--sample must be an index in [0, {cfg['n']}) for this run")
        if prompt is not None:
            raise RunError("--prompt is for a fresh sample of --model; a run's sample replays its own prompt")
        ref = models.ref_of(meta)
        spec = SampleSpec(models.replay_for_run(meta), sample_index)
        if cfg.get("kind") == "inversion":  # a real image: its inverted x_T (and noise maps, DDPM inversion)
            group = SampleStore(RunFolder(run_dir).samples).group
            spec.x_T = torch.from_numpy(np.asarray(group["xT"][sample_index]))
            if "noise_maps" in group:
                spec.noise = torch.from_numpy(np.asarray(group["noise_maps"][sample_index]))
    else:
        ref = models.resolve(model)
        spec = SampleSpec(Replay(seed, steps, eta), 0)
        cfg = model_config(ref, eta, clip_sample, prompt, guidance_scale)
    unet, scheduler, text = load_edit_model(ref, cfg, device)
    spec.replay = spec.replay.with_text(text)
    method = with_prompt(method, text, target_prompt, ref.id)
    if isinstance(method, Trained):
        method.load(ref.fingerprint, spec.replay.steps)
    specs = [parse_direction(d) for d in directions]
    vectors: list = load_directions(
        specs,
        model_fingerprint=ref.fingerprint,
        steps=spec.replay.steps,
        h_shape=h_shape(unet),
        h_point=spec.replay.h_point,
        scheduler=scheduler,
        sampling={"clip_sample": bool(scheduler.config.clip_sample), "eta": cfg.get("eta")},
        edit_branch=text.edit_branch if text is not None else None,
    )
    how = {"window": parse_window(window, spec.replay.steps), "asyrp": asyrp or edit_method == "asyrp"}
    specs, vectors = with_method(method, specs, vectors, how["window"], target_prompt)
    cells, rows, cols = plan_grid(specs, scales)
    if method is not None and "source" in method.needs:
        spec.source = own_output(unet, scheduler, spec)
    images = render_edits(unet, scheduler, spec, vectors, cells, prompts=[s.prompt for s in specs], **how)
    save_cells(images, rows, cols, Path(out).with_suffix(""), f"sample{spec.index}")
    title = f"sample {spec.index} (seed {spec.replay.seed})" + (", Asyrp" if asyrp else "")
    return save_grid(out, grid_image(images, rows, cols, title=title + (f", window {window}" if window else "")))
