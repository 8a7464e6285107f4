"""`hspace edit --image PHOTO --edit-method zsem:weights=FILE`: a photo edited in a diffusion
autoencoder's semantic code (hcore/edits/zsem.py): encoded to z_sem, its stochastic code x_T by
DDIM inversion conditioned on z_sem (eq. (14)), z_sem moved, decoded. No diffusion model of a
run is involved: the direction's file names its autoencoder (refused where that folder now
holds another one). Columns: the photo, the reconstruction (gamma 0), each strength."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError
from hspace.data.photos import psnr, read_photos, ssim


def edit_photos_in_code(paths: list[Path], method, spec: str, scales: list[float], out: Path, device: str) -> dict:
    """``method``: the ``tasks.edit_methods.Trained`` of a method acting on a code (zsem,
    zsem-sparse); ``scales``: its gammas. Writes the grid ``out`` and each cell under ``out``
    without its suffix; returns {path, folder, lines}."""
    import torch

    from hspace.data.figures import grid_image, save_grid
    from hspace.hcore.sampler import to_uint8, to_unit
    from hspace.tasks.edit import save_cells

    method.load(None, None, device)
    trained = method.predictor
    side = int(trained.model.unet.config.sample_size)
    photos, lines = read_photos(paths, side)
    made = method.cls.from_images(to_unit(photos), trained, method.meta.get("attribute"))
    strengths = [0.0, *[float(s) for s in scales]]
    with torch.no_grad():
        shown = [to_uint8(made.action(torch.full((len(paths),), s)).images()).cpu().numpy() for s in strengths]
    recon, cells = shown[0], np.stack(shown[1:], 1)  # (n, scales, 3, R, R)
    name = method.cls.name
    cols = [f"γ={s:+g}" for s in scales]
    folder = Path(out).with_suffix("")
    rows = []
    for i, path in enumerate(paths):
        lines.append(
            f"{path.name}: reconstruction without edit ({method.meta['diffae']}: encoded, DDIM-inverted, "
            f"{trained.steps} steps): PSNR {psnr(recon[i], photos[i]):.1f} dB, SSIM {ssim(recon[i], photos[i]):.4f}"
        )
        save_cells(cells[i][None], [name], cols, folder, path.stem)
        rows.append(np.concatenate([photos[i][None], recon[i][None], cells[i]]))
    title = f"{len(paths)} photo(s) in {method.meta['diffae']}'s z_sem: {spec}"
    grid = grid_image(np.stack(rows), [p.stem for p in paths], ["photo", "no edit", *cols], title=title)
    return {"path": save_grid(out, grid), "folder": folder, "lines": lines}


def refuse_with(directions: list[str], sdedit, spec: str) -> None:
    """A code method edits alone: no --direction, no --sdedit."""
    if directions or sdedit is not None:
        raise RunError(f"--edit-method {spec} edits the photo's z_sem alone: give it without --direction or --sdedit")
