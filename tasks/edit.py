"""Edit grids (``hspace edit``): replay one sample with the same x_T and z_{T:1} and render
it under h-space edits (paper sec. 3: h^edit_{T:1} = h_{T:1} + gamma v_{T:1}).

Grid semantics:
- directions given without a strength are rows, swept over ``scales`` (columns);
- directions given as FILE:gamma are added, at that gamma, to every cell;
- if every direction has a fixed gamma, the grid is one row of sequential edits
  (Fig. 11): the original, then each direction accumulated on top of the previous ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hspace.data import directions as dirfile
from hspace.data.catalog import RunError
from hspace.hcore.generator import Replay
from hspace.tasks.edit_methods import (
    DirectionSpec,
    Trained,
    check_scales,
    parse_direction,
    parse_window,
    resolve_method,
    with_method,
    with_prompt,
)


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


def at_directions_point(replay, specs: list[DirectionSpec]):
    """``replay`` hooking h where the directions were found: a run's sample edited by
    directions of another h point (`hspace layers`' per-block files) renders the same unedited
    sample (a hook that only reads changes nothing) and edits at their point; directions of
    several points at once are refused."""
    import dataclasses

    metas = (dirfile.load(dirfile.resolve_path(s.path), tensor=False)[1] for s in specs)  # not the tensors
    points = {p for p in (m.get("h_point", "output") for m in metas) if p != "xT"}
    if len(points) > 1:
        raise RunError(f"directions of several h points ({', '.join(sorted(points))}): edit one point at a time")
    return dataclasses.replace(replay, h_point=points.pop()) if points else replay


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
        method.load(ref.fingerprint, spec.replay.steps, str(next(unet.parameters()).device))
    specs = [parse_direction(d) for d in directions]
    spec.replay = at_directions_point(spec.replay, specs)
    vectors: list = load_directions(
        specs,
        model_fingerprint=ref.fingerprint,
        steps=spec.replay.steps,
        h_shape=h_shape(unet, spec.replay.h_point),
        h_point=spec.replay.h_point,
        scheduler=scheduler,
        sampling={"clip_sample": bool(scheduler.config.get("clip_sample", False)), "eta": cfg.get("eta")},
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
