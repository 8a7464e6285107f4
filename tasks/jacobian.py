"""Jacobian stage (paper sec. 4.2): replay sample I to x_t at step S, find the top-K right
singular vectors of J_t (Alg. 1, or SM Alg. 2 in blocks), store them in jacobian.zarr and
as direction files.

Direction files apply the unit vector found at step S at every timestep, unscaled: the
paper finds that directions found at one timestep are most telling when applied across
all timesteps (sec. 4.2), and a constant unit vector keeps gamma a plain length in
h-space, the same at every step, which is how Fig. 7's transfer to other samples reads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hspace.data import models
from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.data.stores import JacobianStore, SampleStore
from hspace.tasks.stages import Context, Stage, outputs

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def parse_roi(text: str, size: int) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise RunError(f"--roi {text!r} is not x0,y0,x1,y1 (pixels)") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise RunError(f"--roi {text!r} must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}")
    return x0, y0, x1, y1


def load_mask(path: Path, size: int) -> torch.Tensor:
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("L")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise RunError(f"--mask {path}: cannot read it as an image ({e})") from None
    if image.size != (size, size):
        raise RunError(f"--mask {path} is {image.size[0]}x{image.size[1]}, the model's images are {size}x{size}")
    mask = torch.from_numpy(np.asarray(image, np.float32) / 255.0)
    if mask.max() <= 0:
        raise RunError(f"--mask {path} is empty (all black); white marks the region of interest")
    return mask[None, None]


def run_jacobian(
    run_dir: str,
    sample: int,
    step: int,
    k: int,
    block: int | None = None,
    roi: str | None = None,
    mask_path: str | None = None,
    tol: float = 1e-4,
    max_iters: int = 100,
    device: str = "cpu",
    localize: int | None = None,
    progress=None,
) -> dict:
    """Alg. 1 (or Alg. 2 with ``block``, optionally --localize) at sample ``sample``, step
    ``step``; progress(iteration, change, tol) reports each iteration."""
    import torch

    from hspace.data import directions as dirfile
    from hspace.hcore import jacobian as jac
    from hspace.hcore.sampler import step_timestep

    run = RunFolder(Path(run_dir))
    meta = run.read()
    require_sampled(meta, "hspace jacobian")
    cfg = meta["config"]
    if not (0 <= sample < cfg["n"]):
        raise RunError(f"--sample {sample} must be in [0, {cfg['n']})")
    if not (0 <= step < cfg["steps"]):
        raise RunError(f"--step {step} must be in [0, {cfg['steps']}) (0 = first denoising step)")
    if roi and mask_path:
        raise RunError("give --roi or --mask, not both")
    if localize is not None and not (roi or mask_path):
        raise RunError("--localize needs a region: give --roi or --mask")
    unet, scheduler = models.load_for_run(meta, device=device)
    replay = models.replay_for_run(meta, device=device)  # SD: the guided prediction of this sample's prompt
    text = replay.text
    conditioning = None if text is None else text.conditioning(text.prompts_for([sample]))
    d = int(np.prod(SampleStore(run.samples).layout.h_shape))
    if not (1 <= k <= d):
        raise RunError(f"--k {k} must be between 1 and {d} (the size of h)")
    if block is not None and not (1 <= block <= k):
        raise RunError(f"--block {block} must be between 1 and --k {k}")
    if localize is not None and not (k <= localize <= d):
        raise RunError(f"--localize {localize} must be between --k {k} and {d} (the size of h)")
    size = unet.config.sample_size
    mask = None
    if roi:
        mask = jac.roi_mask((size, size), parse_roi(roi, size))
    elif mask_path:
        mask = load_mask(Path(mask_path), size)
    x_t = replay.render(unet, scheduler, [sample], stop_before=step)[0]  # a latent for SD: ROI in latent cells
    t = step_timestep(unet, scheduler, cfg["steps"], step)  # a flow model: f(h) = v(x_t, h) at sigma * 1000
    h0 = jac.h_at(unet, x_t, t, h_point=cfg["h_point"], conditioning=conditioning)  # float32, any dtype
    if mask is not None:
        mask = mask.to(x_t.device)
    f = jac.eps_of_h(
        unet, x_t, t, mask=None if localize else mask, h_point=cfg["h_point"], conditioning=conditioning, h0=h0
    )
    reachable = jac.precision_tol(tol, next(unet.parameters()).dtype)
    if reachable > tol:
        log.warning(
            "--tol %g is below what a %s U-Net's J v resolves; iterating to %g instead", tol, cfg["dtype"], reachable
        )
        tol = reachable
    gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + sample * 1009 + step)
    k_iter = localize or k  # --localize: the top-r subspace of the unmasked J, then the ROI share inside it
    report = None if progress is None else (lambda it, change: progress(it, change, tol))
    if block is None:
        result = jac.subspace_iteration(f, h0, k_iter, tol=tol, max_iters=max_iters, generator=gen, on_iteration=report)
    else:
        result = jac.sequential_subspace_iteration(
            f, h0, k_iter, block=block, tol=tol, max_iters=max_iters, generator=gen, on_iteration=report
        )
    share = None
    if localize:
        local = jac.localize(f, h0, result.vectors, mask, k)
        result.vectors, result.singular_values, share = local.vectors, local.gain, local.share.tolist()
    attrs = {
        "k": k,
        "block": block,
        "roi": roi,
        "mask": mask_path,
        "iterations": result.iterations,
        "converged": result.converged,
        "tol": tol,
        "localize": localize,
        "share_inside": share,
        "values": "gain |J v| of the localized directions" if localize else "singular values",
    }
    name = JacobianStore(run.jacobian).write(
        sample, step, x_t.cpu().numpy(), t, result.singular_values.cpu().numpy(), result.vectors.cpu().numpy(), attrs
    )
    steps = cfg["steps"]
    for stale in run.direction_files(f"jac_s{sample}_t{step}_[0-9][0-9]"):
        if int(stale.stem.rsplit("_", 1)[1]) >= k:  # from an earlier call with a larger --k
            stale.unlink()
    files = []
    for j in range(k):
        v = result.vectors[j].cpu().float()
        md = dirfile.metadata_for_run(
            meta,
            method=("jacobian (Alg. 1)" if block is None else f"jacobian (Alg. 2, b={block})")
            + (f", localized in the top {localize}" if localize else ""),
            source=f"{run.root}: jacobian.zarr/{name} vector {j}",
            scale_unit=(
                f"unit vector from step {step} on, zero before (applied earlier it spreads outside the region)"
                if localize
                else "unit vector at every timestep (gamma = length in h-space)"
            ),
        )
        per_step = v.unsqueeze(0).expand(steps, *v.shape).clone()
        if localize:
            per_step[:step] = 0
        path = dirfile.save(run.direction(f"jac_s{sample}_t{step}_{j:02d}"), per_step, md)
        files.append(str(path))
    return {
        "group": name,
        "t": t,
        "singular_values": result.singular_values.tolist(),
        "converged": result.converged,
        "iterations": result.iterations,
        "directions": files,
        "share_inside": share,
    }


# ----------------------------------------------------------------------------- the stage


def jacobian_stage(run: RunFolder, jacobian, ctx: Context) -> dict:
    with ctx.progress() as bar:
        job = bar.add_task("jacobian (subspace iterations)", total=jacobian.max_iters, rate="")
        status = lambda it, change, tol: bar.update(job, completed=it, rate=f"residual {change:.1e} (tol {tol:.0e})")  # noqa: E731
        r = run_jacobian(
            str(run.root),
            jacobian.sample,
            jacobian.step,
            jacobian.k,
            jacobian.block,
            jacobian.roi,
            str(jacobian.mask) if jacobian.mask else None,
            jacobian.tol,
            jacobian.max_iters,
            ctx.device,
            localize=jacobian.localize,
            progress=status,
        )
    return {"outputs": outputs(run, [run.jacobian, *r.pop("directions")]), **r}


def jacobian_line(r: dict) -> str:
    values = ", ".join(f"{s:.3g}" for s in r["singular_values"])
    inside = "; inside the region: " + ", ".join(f"{x:.0%}" for x in r["share_inside"]) if r.get("share_inside") else ""
    return (
        f"t={r['t']}, {r['iterations']} iterations{'' if r['converged'] else ', NOT converged'}; "
        f"{'gains |J v|' if r.get('share_inside') else 'singular values'} {values}{inside}"
    )


STAGE = Stage(
    "jacobian",
    sections=("jacobian",),
    inputs=("sample",),
    outputs=("jacobian", "directions"),
    body=jacobian_stage,
    summary=jacobian_line,
    pipeline=False,
    doc="Image-specific directions (paper sec. 4.2, Alg. 1 and 2): top-K right singular vectors of d eps/d h.",
)
