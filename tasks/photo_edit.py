"""`hspace edit --image PHOTO`: one command from photos to their edited versions.

Each photo is converted to RGB, centre-cropped and resized to the model's size (each change
said in one line, data.photos), then either inverted (hcore.inversion: edit-friendly DDPM
inversion by default, whose noise maps make the eta > 0 sampler reproduce the photo; or
DDIM inversion) and replayed under the h-space edits (paper sec. 3, h_t + gamma v_t, the
same noise maps at every step), or, with ``sdedit=K`` (SDEdit, Meng et al. 2022), noised to
the timestep K steps before the end and denoised from there with the edit applied. The
steps, h point and model come from the direction files, which are checked as for a run's
sample. The reconstruction (no edit) is scored against the photo: PSNR and SSIM, one line
per photo; a latent model's VAE round trip is scored apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data import directions as dirfile
from hspace.data.catalog import RunError
from hspace.data.photos import IMAGE_SUFFIXES, psnr, read_photos, ssim
from hspace.tasks import edit_methods as em
from hspace.tasks.edit import (
    SampleSpec,
    load_directions,
    load_edit_model,
    model_config,
    plan_grid,
    render_edits,
    save_cells,
)


def photo_paths(images: list[Path]) -> list[Path]:
    """--image values: files, or folders whose image files (by suffix) are taken in name order."""
    paths = []
    for item in map(Path, images):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise RunError(f"--image {item} is a folder with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise RunError(f"--image {item} does not exist")
    return paths


def edit_photos(
    images: list[Path],
    directions: list[str],
    scales: list[float] | None,
    out: Path,
    model: str,
    method: str = "ddpm",
    sdedit: int | None = None,
    eta: float = 1.0,
    seed: int = 0,
    refine: int = 3,
    steps: int | None = None,
    window: str | None = None,
    asyrp: bool = False,
    device: str = "cpu",
    clip_sample: str = "off",
    prompt: str | None = None,
    guidance_scale: float | None = None,
    edit_method: str | None = None,
    target_prompt: str | None = None,
) -> dict:
    """Invert (or SDEdit) every photo and render the edit grid of ``plan_grid`` for each, with
    the photo and its reconstruction as the first two columns. Writes the grid PNG ``out``
    and every edited image under ``out`` without its suffix; returns {path, folder, lines}."""
    from hspace.data import models
    from hspace.data.figures import grid_image, save_grid
    from hspace.hcore.edits import EditMethod
    from hspace.hcore.generator import Replay
    from hspace.hcore.hooks import h_shape
    from hspace.hcore.inversion import INVERSION_METHODS, noise_to_step
    from hspace.hcore.sampler import to_uint8, to_unit
    from hspace.tasks.invert import invert_images

    edit = em.resolve_method(edit_method, asyrp, directions, target_prompt)
    scales = em.check_scales(edit, scales)
    if isinstance(edit, em.Trained) and edit.acts_on == "code":  # a diffusion autoencoder's own encoder and decoder
        from hspace.tasks import code_photo

        code_photo.refuse_with(directions, sdedit, edit_method)
        return code_photo.edit_photos_in_code(photo_paths(images), edit, edit_method, scales, out, device)
    if edit is not None and "weights" in edit.needs:  # its x_tar: the photo's replay under the target prompt
        raise RunError(f"--edit-method {edit_method} on a photo is not offered yet: edit a sample of a run instead")
    if sdedit is not None and edit is not None and "source" in edit.needs:
        raise RunError(f"--sdedit K restarts every edit from the noised photo: give it or --edit-method {edit_method}")
    if directions and edit is not None and "source" in edit.needs:
        raise RunError(
            f"--edit-method {edit_method} starts from the photo, not its inversion: give it without --direction"
        )
    asyrp = asyrp or edit_method == "asyrp"
    if method not in INVERSION_METHODS:
        raise RunError(f"--method must be one of {', '.join(INVERSION_METHODS)}, got {method!r}")
    if not (0 <= eta <= 1):
        raise RunError(f"--eta must be in [0, 1], got {eta}")
    paths = photo_paths(images)
    specs = [em.parse_direction(d) for d in directions]
    h_dirs = [dirfile.load(s.path) for s in specs]
    h_dirs = [(v, meta) for v, meta in h_dirs if meta.get("h_point") != "xT"]
    if h_dirs:  # the schedule and h point the directions were found with
        steps, h_point = int(h_dirs[0][0].shape[0]), h_dirs[0][1].get("h_point", "output")
    else:
        steps, h_point = steps or 20, "output"
    if sdedit is not None and not (1 <= sdedit <= steps):
        raise RunError(f"--sdedit {sdedit}: give the number of denoising steps to run, in [1, {steps}]")
    ref = models.resolve(model)
    if ref.kind in models.FLOW_KINDS:
        raise RunError(
            f"{ref.id} is a flow-matching model ({ref.kind}): a photo is inverted with DDIM / DDPM, which it has not"
        )
    run_eta = 0.0 if method == "ddim" and sdedit is None else eta
    if ref.kind != "pixel":  # the source prompt, empty by default; no guidance unless asked for
        prompt, guidance_scale = prompt or "", 1.0 if guidance_scale is None else guidance_scale
    cfg = model_config(ref, run_eta, clip_sample, prompt, guidance_scale)
    unet, scheduler, text = load_edit_model(ref, cfg, device)
    size = models.image_size(ref, unet.config)
    vectors = load_directions(
        specs,
        model_fingerprint=ref.fingerprint,
        steps=steps,
        h_shape=h_shape(unet, h_point),
        h_point=h_point,
        scheduler=scheduler,
        sampling={"clip_sample": bool(scheduler.config.get("clip_sample", False)), "eta": run_eta},
        edit_branch=text.edit_branch if text is not None else None,
    )
    how = {"window": em.parse_window(window, steps), "asyrp": asyrp}
    replay = Replay(seed, steps, run_eta, h_point, text)
    edit = em.with_prompt(edit, text, target_prompt, ref.id)
    specs, vectors = em.with_method(edit, specs, vectors, how["window"], target_prompt)
    cells, row_names, col_names = plan_grid(specs, scales)
    photos, notes = read_photos(paths, size)
    x_img = to_unit(photos)
    sourced = edit is not None and not isinstance(edit, EditMethod) and "source" in edit.needs
    x = x_img  # the photos in the sampler's space: what SDEdit and a method needing a source start from
    if text is not None and (sdedit is not None or sourced):
        x = text.encode(x_img)
    lines = list(notes)
    if sdedit is not None:
        start = steps - sdedit
        x_start = noise_to_step(scheduler, x, steps, start, replay.generators(range(len(paths))))
        sample_specs = [SampleSpec(replay, i, x_T=x_start[i], start_at=start) for i in range(len(paths))]
        recon = np.stack([render_edits(unet, scheduler, s, [], [[[]]], **how)[0, 0] for s in sample_specs])
        what = f"SDEdit from step {start} of {steps} (t = {int(_timesteps(scheduler, steps)[start])}), eta {run_eta:g}"
        vae = [None] * len(paths)
    elif sourced:  # the method starts from the photo itself, with the photo's own seed noise: nothing inverted
        sample_specs = [SampleSpec(replay, i, source=x[i : i + 1]) for i in range(len(paths))]
        recon = to_uint8(text.decode(x) if text is not None else x).numpy()
        what = f"{edit_method} from the photo{' (the VAE round trip: no edit)' if text is not None else ''}"
        vae = [None] * len(paths)
    else:
        inv = invert_images(unet, scheduler, x_img, replay, method, refine, range(len(paths)))
        noise = inv["noise"]
        sample_specs = [
            SampleSpec(replay, i, x_T=inv["x_T"][i].cpu(), noise=None if noise is None else noise[i].cpu())
            for i in range(len(paths))
        ]
        recon = to_uint8(inv["regenerated"]).numpy()
        what = {"ddpm": f"edit-friendly DDPM inversion, eta {run_eta:g}", "ddim": f"DDIM inversion, refine {refine}"}[
            method
        ]
        vae = inv["vae_mse"] if inv["vae_mse"] is not None else [None] * len(paths)
    grid_rows, labels, folder = [], [], Path(out).with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (path, spec) in enumerate(zip(paths, sample_specs, strict=True)):
        vae_text = "" if vae[i] is None else f"; VAE alone PSNR {10 * np.log10(4 / max(float(vae[i]), 1e-20)):.1f} dB"
        lines.append(
            f"{path.name}: reconstruction without edit ({what}, {steps} steps): "
            f"PSNR {_db(psnr(recon[i], photos[i]))}, SSIM {ssim(recon[i], photos[i]):.4f}{vae_text}"
        )
        edited = render_edits(unet, scheduler, spec, vectors, cells, prompts=[s.prompt for s in specs], **how)
        save_cells(edited, row_names, col_names, folder, path.stem)
        for r, row in enumerate(edited):
            grid_rows.append(np.concatenate([photos[i][None], recon[i][None], row]))
            labels.append(f"{path.stem}: {row_names[r]}")
    title = f"{len(paths)} photo(s), {what}" + (f", window {window}" if window else "")
    grid = grid_image(np.stack(grid_rows), labels, ["photo", "no edit", *col_names], title=title)
    return {"path": save_grid(out, grid), "folder": folder, "lines": lines}


def _db(value: float) -> str:
    return "inf dB (every pixel equal)" if value == float("inf") else f"{value:.1f} dB"


def _timesteps(scheduler, steps: int):
    from hspace.hcore.sampler import ddim_scheduler

    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    return sched.timesteps
