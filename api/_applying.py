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

Any registered editing method (hcore.edits) that needs no direction is applied the same way,
``with hspace.apply(pipe, method="NAME", gamma=...)``: its h delta through the same hooks, a
change of x_t (or x_T) at a step through the U-Net's pre-hook and a wrapper around the
pipeline scheduler's ``step`` (so both the U-Net and the update see the changed latent), and
its session (attention processors, weights) around the block.
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
    directions: Direction | str | Sequence[Direction | str] | None = None,
    gamma: float | Sequence[float] = 1.0,
    window: tuple[int, int] | None = None,
    scheduler=None,
    guided: bool | None = None,
    method=None,
):
    """Apply one or several directions (each with its gamma), or an editing method, while the
    block runs.

    pipe: a DDPMPipeline / DDIMPipeline / StableDiffusionPipeline / StableDiffusionXLPipeline,
    or a bare U-Net (then give ``scheduler`` for the timestep check, and ``guided`` for an
    [uncond; cond] batch). window: (first, stop) step indices where the edit applies (step 0
    = the first denoising step). The pipeline must sample with a DDIMScheduler of the model's
    betas at the direction's step count; eta is yours (the direction's is in its metadata).
    method: a registered editing method (its name, or an hcore.edits.EditMethod) that needs
    no direction, at strength ``gamma``; its steps are the pipeline scheduler's."""
    from hspace.hcore.hooks import h_shape
    from hspace.hcore.sampler import Edit

    unet = _denoiser(pipe)
    scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise DirectionMismatch("give scheduler= to hspace.apply for a bare U-Net: a timestep's step needs it")
    if directions is None:
        if method is None:
            raise DirectionMismatch("give directions, or method= (an editing method that needs none)")
        action = _method(method).action(float(gamma))
        with _attached(pipe, unet, scheduler, action, None, "output", "both", guided) as hs:
            yield hs
        return
    name = getattr(method, "name", method)
    if name not in (None, "h", "asyrp"):
        raise DirectionMismatch(
            f"method={method!r} with directions: the h and asyrp methods apply direction files here"
        )
    items = [directions] if isinstance(directions, (Direction, str)) or hasattr(directions, "is_file") else directions
    dirs = [d if isinstance(d, Direction) else load_direction(d) for d in items]
    gammas = [float(gamma)] * len(dirs) if isinstance(gamma, (int, float)) else [float(g) for g in gamma]
    if not dirs or len(gammas) != len(dirs):
        raise DirectionMismatch(f"{len(dirs)} direction(s) and {len(gammas)} gamma(s): give one gamma per direction")
    first = dirs[0]
    fingerprint = _fingerprint(unet)  # a sha256 of the U-Net's weights: once, not per direction
    for d in dirs:
        _check_fits(d, first, fingerprint, scheduler, tuple(h_shape(unet, first.h_point)))
    expected = (_timesteps(unet, scheduler, first.steps), first)
    param = next(unet.parameters())
    edit = Edit(directions=[d.v.to(param.device) for d in dirs], gammas=gammas, window=window, asyrp=name == "asyrp")
    action = edit if any(g != 0 for g in gammas) else None  # gamma 0: nothing is added, bit for bit
    with _attached(pipe, unet, scheduler, action, expected, first.h_point, first.edit_branch, guided) as hs:
        yield hs


def _denoiser(pipe):
    """The denoiser whose h the hooks edit: a U-Net, or a pipeline's transformer (PixArt, SD3,
    FLUX) seen through hcore.transformer's adapter (its blocks are the pipeline's own)."""
    from hspace.hcore.transformer import FAMILIES, TransformerDenoiser

    inner = getattr(pipe, "transformer", None)
    if type(inner).__name__ in FAMILIES:
        return TransformerDenoiser(inner)
    if type(pipe).__name__ in FAMILIES:
        return TransformerDenoiser(pipe)
    return getattr(pipe, "unet", pipe)


def _timesteps(unet, scheduler, steps: int) -> list[float]:
    """The timesteps a direction's sampling ran: DDIM's at its step count, or a flow model's
    (sigma * 1000, as its pipeline spaces them)."""
    from hspace.hcore.flow import is_flow
    from hspace.hcore.sampler import ddim_scheduler

    if is_flow(scheduler):
        if not hasattr(unet, "flow_sigmas"):
            raise DirectionMismatch(f"{type(scheduler).__name__} drives a flow-matching transformer, not a U-Net")
        return [float(t) for t in unet.flow_sigmas(scheduler, steps).timesteps]
    ddim = ddim_scheduler(scheduler)
    ddim.set_timesteps(steps)
    return [int(t) for t in ddim.timesteps]


def _index(t: float, timesteps: list[float]) -> int | None:
    """Where ``t`` is in ``timesteps`` (within a bfloat16 timestep's rounding), or None."""
    i = min(range(len(timesteps)), key=lambda k: abs(timesteps[k] - t))
    return i if abs(timesteps[i] - t) <= 1e-3 + 5e-3 * abs(timesteps[i]) else None


def _method(method):
    from hspace.hcore.edits import standalone

    try:
        return standalone(method)
    except ValueError as e:
        raise DirectionMismatch(str(e)) from None


@contextmanager
def _attached(pipe, unet, scheduler, action, expected, h_point: str, edit_branch: str, guided):
    """The action's hooks on a pipeline while the block runs: the step of each U-Net call from
    its timestep (``expected``: (the direction's DDIM timesteps, the direction) checked at every
    call; None: the pipeline scheduler's own), h deltas at the hook point, x_t changes in the
    U-Net's input and in the scheduler step's latent, the action's session."""
    import contextlib

    from hspace.hcore.hooks import HSpaceHook

    asyrp = action is not None and action.asyrp
    if asyrp:
        _check_asyrp(pipe, scheduler)
    if action is not None and action.decodes:
        raise DirectionMismatch(
            "this method decodes with a model of its own (a diffusion autoencoder's code), not inside a pipeline: "
            "make it from images (ZSem.from_images) and take action(gamma).images()"
        )

    def step_of(t) -> int:
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        t = t * 1000 if getattr(unet, "family", None) == "flux" else t  # FLUX's pipeline passes sigma
        running = [float(x) for x in getattr(scheduler, "timesteps", [])]  # every call: a second pipe() too
        if expected is not None:
            timesteps, first = expected
            if running and (len(running) != len(timesteps) or any(_index(r, timesteps) is None for r in running)):
                flow = hasattr(unet, "flow_sigmas") and "FlowMatch" in type(scheduler).__name__
                fix = (
                    "call it at the same height and width with"
                    if flow
                    else ("set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config) and")
                )
                raise DirectionMismatch(
                    f"the pipeline's scheduler ({type(scheduler).__name__}) runs {len(running)} timesteps "
                    f"{running[:4]}...; direction {first.name} was found at {first.steps} steps "
                    f"{timesteps[:4]}...: {fix} num_inference_steps={first.steps}"
                )
            if _index(t, timesteps) is None:
                raise DirectionMismatch(f"timestep {t:g} is not one of the direction's {first.steps} timesteps")
            return _index(t, timesteps)
        if not running or _index(t, running) is None:
            raise DirectionMismatch(f"timestep {t:g} is not one of the pipeline scheduler's timesteps {running[:4]}...")
        if action is not None:
            action.check(len(running), bool(is_guided()))
        return _index(t, running)

    def is_guided() -> bool:
        return bool(getattr(pipe, "do_classifier_free_guidance", False)) if guided is None else guided

    def moved(step: int, x: torch.Tensor, halves: bool) -> torch.Tensor:
        """x at ``step`` as the action changes it (x_T first, at step 0), per half of a guided batch."""
        if halves:
            return torch.cat([moved(step, h, False) for h in x.chunk(2)])
        if step == 0:
            x = action.start(x)
        return action.x_t(step, x)

    acts_on_x = action is not None and action.acts_on_x()
    unedited = {"running": False}  # Asyrp's second pass of a step, and what it gave

    def before_unet(module, args, kwargs):
        if unedited["running"]:  # Asyrp's unedited pass: the same input, nothing added to h
            hs.delta = None
            return None
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        step = step_of(t)
        if hasattr(unet, "note_call"):
            unet.note_call(args, kwargs)  # a transformer's token grid, for h's (D, rows, cols) view
        hs.guided = is_guided()
        hs.delta = None if action is None else action.delta(step)
        if not acts_on_x:
            return None
        if "sample" in kwargs:
            kwargs = {**kwargs, "sample": moved(step, kwargs["sample"], hs.guided)}
        else:
            args = (moved(step, args[0], hs.guided), *args[1:])
        return args, kwargs

    def after_unet(module, args, kwargs, output):
        """Asyrp (Kwon et al.): where h was edited, the same call once more unedited; the
        difference of the two outputs goes to the step, for D_t."""
        unedited.pop("difference", None)
        if unedited["running"] or hs.delta is None:
            return None
        guided = hs.guided
        unedited["running"] = True
        try:
            plain = module(*args, **kwargs)
        finally:
            unedited["running"] = False
        unedited["difference"] = (_first(plain) - _first(output), guided)
        return None

    original_step = scheduler.step

    def step_with_action(model_output, timestep, sample, *args, **kwargs):
        if acts_on_x:
            sample = moved(step_of(timestep), sample, False)
        out = original_step(model_output, timestep, sample, *args, **kwargs)
        if asyrp and "difference" in unedited:
            fix = _asyrp_fix(pipe, scheduler, int(timestep), *unedited.pop("difference"), args, kwargs)
            out = (out[0] + fix, *out[1:]) if isinstance(out, tuple) else _replace_prev(out, out.prev_sample + fix)
        return out

    session = action.session(unet) if action is not None else contextlib.nullcontext()
    wrap_step = acts_on_x or asyrp
    called = unet.transformer if hasattr(unet, "note_call") else unet  # what the pipeline calls
    with HSpaceHook(unet, point=h_point, edit_branch=edit_branch) as hs, session:
        handles = [called.register_forward_pre_hook(before_unet, with_kwargs=True)]
        if asyrp:
            handles.append(called.register_forward_hook(after_unet, with_kwargs=True))
        if wrap_step:
            scheduler.step = step_with_action  # an instance attribute over the class's method
        try:
            yield hs
        finally:
            for handle in handles:
                handle.remove()
            if wrap_step:
                del scheduler.step


def _first(output) -> torch.Tensor:
    """The U-Net's prediction, whether it returned an output object or a tuple."""
    return output.sample if hasattr(output, "sample") else output[0]


def _check_asyrp(pipe, scheduler) -> None:
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        raise DirectionMismatch(
            "asyrp splits the DDIM step (P_t edited, D_t not); the pipeline's scheduler is "
            f"{type(scheduler).__name__}: set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise DirectionMismatch(f"asyrp: a model predicting {scheduler.config.prediction_type!r} is not supported")
    if float(getattr(pipe, "guidance_rescale", 0.0) or 0.0) > 0:
        raise DirectionMismatch("asyrp with guidance_rescale > 0: the rescaled guidance is not linear; leave it at 0")


def _asyrp_fix(pipe, scheduler, t: int, difference: torch.Tensor, guided: bool, args, kwargs) -> torch.Tensor:
    """Kwon et al.'s P_t-only edit in a plain pipeline: the scheduler stepped with the edited
    prediction in P_t and in D_t; D_t(eps) = sqrt(1 - a_(t-1) - sigma_t^2) eps (eq. (4)) is
    linear, so adding that coefficient times (eps_unedited - eps_edited) gives D_t of the
    unedited eps, as hcore.sampler.ddim_step does with its two passes. Under guidance the
    difference is guided like the prediction (linear: u + s (c - u))."""
    from hspace.hcore.sampler import step_alphas, step_sigma

    if kwargs.get("use_clipped_model_output") or (len(args) > 1 and args[1]):
        raise DirectionMismatch(
            "asyrp with use_clipped_model_output: D_t would come from the clipped x_0; leave it off"
        )
    if guided:
        scale = getattr(pipe, "guidance_scale", None)
        if scale is None:
            raise DirectionMismatch("asyrp on a guided batch needs the pipeline (its guidance scale), not a bare U-Net")
        uncond, cond = difference.chunk(2)
        difference = uncond + float(scale) * (cond - uncond)
    eta = float(kwargs.get("eta", args[0] if args else 0.0))
    alpha_t, alpha_prev = step_alphas(scheduler, t)
    sigma = step_sigma(scheduler, t, eta)
    if scheduler.config.prediction_type == "v_prediction":
        difference = alpha_t.sqrt() * difference  # eps = sqrt(a_t) v + sqrt(1 - a_t) x_t
    coefficient = (1 - alpha_prev - sigma**2).sqrt()
    return (coefficient.to(difference.device) * difference).to(difference.dtype)


def _replace_prev(out, prev_sample: torch.Tensor):
    from dataclasses import replace

    return replace(out, prev_sample=prev_sample)


def _check_fits(d: Direction, first: Direction, fingerprint: str | None, scheduler, h_shape: tuple) -> None:
    """The directions applied together share their schedule, h point and model; each fits the
    U-Net of ``fingerprint`` (None: not known) and the scheduler (Direction.fits, the check of
    the CLI and the stages too)."""
    for key in ("steps", "h_point", "scheduler", "model"):
        if d.meta.get(key) != first.meta.get(key):
            raise DirectionMismatch(f"directions {first.name} and {d.name} differ in {key}: apply them separately")
    if fingerprint is None:
        log.warning("cannot check the model of direction %s: the U-Net was not loaded from a local folder", d.name)
    try:
        d.fits(fingerprint, scheduler, h_shape=h_shape)
    except RunError as e:
        raise DirectionMismatch(str(e)) from None


def _fingerprint(unet) -> str | None:
    """The sha256 fingerprint of the folder the U-Net was loaded from (None if unknown)."""
    from hspace.data import models

    where = getattr(getattr(unet, "transformer", unet).config, "_name_or_path", None)
    if not where:
        return None
    try:
        return models.resolve(str(where)).fingerprint
    except (RunError, OSError, ValueError):
        return None
