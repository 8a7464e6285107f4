"""Directions inside a plain diffusers pipeline: ``with hspace.apply(pipe, direction, gamma):``.

The edit is the paper's (sec. 3): h_t + sum_k gamma_k v_t^(k) at the U-Net bottleneck, step t
read from the timestep the pipeline passes to its U-Net. Two hooks do it, nothing of
diffusers is copied: a forward pre-hook on the U-Net that reads the timestep (and checks the
pipeline's schedule), and hcore.hooks.HSpaceHook on the mid block that adds
the delta. Both are removed on exit, also after an exception, leaving the pipeline as it was.

Refused with ``DirectionMismatch`` (one message naming the fix): another model (where the
pipeline's U-Net was loaded from a folder whose fingerprint differs), another noise schedule,
another h shape, and, at a U-Net call, a pipeline whose scheduler runs other timesteps
than DDIM at the direction's step count (PNDM, Euler, another ``num_inference_steps``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from hspace._directions import Direction, load_direction
from hspace.data.catalog import RunError

log = logging.getLogger(__name__)


class DirectionMismatch(ValueError):
    """The direction does not fit the pipeline it is applied to."""


@contextmanager
def apply(
    pipe,
    directions: Direction | str | Sequence[Direction | str],
    gamma: float | Sequence[float] = 1.0,
    window: tuple[int, int] | None = None,
    scheduler=None,
    guided: bool | None = None,
):
    """Apply one or several directions (each with its gamma) while the block runs.

    pipe: a DDPMPipeline / DDIMPipeline / StableDiffusionPipeline / StableDiffusionXLPipeline,
    or a bare U-Net (then give ``scheduler`` for the timestep check, and ``guided`` for an
    [uncond; cond] batch). window: (first, stop) step indices where the edit applies (step 0
    = the first denoising step). The pipeline must sample with a DDIMScheduler of the model's
    betas at the direction's step count; eta is yours (the direction's is in its metadata)."""
    from hspace.hcore.hooks import HSpaceHook, h_shape
    from hspace.hcore.sampler import Edit, ddim_scheduler

    items = [directions] if isinstance(directions, (Direction, str)) or hasattr(directions, "is_file") else directions
    dirs = [d if isinstance(d, Direction) else load_direction(d) for d in items]
    gammas = [float(gamma)] * len(dirs) if isinstance(gamma, (int, float)) else [float(g) for g in gamma]
    if not dirs or len(gammas) != len(dirs):
        raise DirectionMismatch(f"{len(dirs)} direction(s) and {len(gammas)} gamma(s): give one gamma per direction")
    unet = getattr(pipe, "unet", pipe)
    scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
    first = dirs[0]
    for d in dirs:
        _check_fits(d, first, unet, scheduler)
    want = (first.steps, *h_shape(unet))
    for d in dirs:
        if tuple(d.v.shape) != want:
            raise DirectionMismatch(
                f"direction {d.name} has shape {tuple(d.v.shape)}, this U-Net's h over {first.steps} steps is {want}"
            )
    if scheduler is None:
        raise DirectionMismatch("give scheduler= to hspace.apply for a bare U-Net: a timestep's step needs it")
    ddim = ddim_scheduler(scheduler)
    ddim.set_timesteps(first.steps)
    expected = [int(t) for t in ddim.timesteps]
    param = next(unet.parameters())
    edit = Edit(directions=[d.v.to(param.device) for d in dirs], gammas=gammas, window=window)
    nonzero = any(g != 0 for g in gammas)

    def before_unet(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        running = [int(x) for x in getattr(scheduler, "timesteps", [])]  # every call: a second pipe() too
        if running and running != expected:
            raise DirectionMismatch(
                f"the pipeline's scheduler ({type(scheduler).__name__}) runs {len(running)} timesteps "
                f"{running[:4]}...; direction {first.name} was found with DDIM at {first.steps} steps "
                f"{expected[:4]}...: set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config) and "
                f"num_inference_steps={first.steps}"
            )
        if t not in expected:
            raise DirectionMismatch(f"timestep {t} is not one of the direction's {first.steps} DDIM timesteps")
        step = expected.index(t)
        hs.guided = bool(getattr(pipe, "do_classifier_free_guidance", False)) if guided is None else guided
        hs.delta = edit.delta(step) if nonzero else None  # gamma 0: nothing is added, bit for bit

    with HSpaceHook(unet, point=first.h_point, edit_branch=first.edit_branch) as hs:
        handle = unet.register_forward_pre_hook(before_unet, with_kwargs=True)
        try:
            yield hs
        finally:
            handle.remove()


def _check_fits(d: Direction, first: Direction, unet, scheduler) -> None:
    from hspace.data import directions as dirfile

    for key in ("steps", "h_point", "scheduler", "model"):
        if d.meta.get(key) != first.meta.get(key):
            raise DirectionMismatch(f"directions {first.name} and {d.name} differ in {key}: apply them separately")
    if scheduler is not None and dirfile.scheduler_name(scheduler) != d.meta.get("scheduler"):
        raise DirectionMismatch(
            f"direction {d.name} was found under the noise schedule {d.meta.get('scheduler')}, the pipeline's is "
            f"{dirfile.scheduler_name(scheduler)}: use a direction of this model"
        )
    fingerprint = _fingerprint(unet)
    if fingerprint is None:
        log.warning("cannot check the model of direction %s: the U-Net was not loaded from a local folder", d.name)
    elif fingerprint != d.model:
        raise DirectionMismatch(
            f"direction {d.name} was made for another model (fingerprint {d.model[:12]}, this U-Net's folder has "
            f"{fingerprint[:12]}): use a direction of this model"
        )


def _fingerprint(unet) -> str | None:
    """The sha256 fingerprint of the folder the U-Net was loaded from (None if unknown)."""
    from hspace.data import models

    where = getattr(unet.config, "_name_or_path", None)
    if not where:
        return None
    try:
        return models.resolve(str(where)).fingerprint
    except (RunError, OSError, ValueError):
        return None
