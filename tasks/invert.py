"""Real-image supervision and editing (paper sec. 5): invert user images into a run folder
that looks like a sampled one (samples.zarr with h_{T:1} and x0, plus x_T, the noise maps
of a DDPM inversion and the reconstruction error), with the user's labels as an
annotation, so ``hspace directions`` builds eq. (10) directions from real images exactly as
from generated ones, and ``hspace edit OUT --sample I`` edits image I like a sample.

Two inversions (hcore.inversion): edit-friendly DDPM inversion (the default: the eta > 0
sampler replays the image exactly from x_T and the stored noise maps) and DDIM inversion
(eta = 0, with fixed-point refinement). A latent model (Stable Diffusion) inverts the VAE
latent of each image with the source prompt (empty by default, guidance 1); its VAE and
inversion reconstruction errors are stored apart (vae_mse, recon_mse).

Images come as a folder with ``positive/`` and ``negative/`` subfolders (one attribute,
scores 1 / 0) or as any folder plus a CSV ``file,<attribute>,...`` of labels. Every file
must be a readable image: unreadable ones are listed and nothing is written. Images are
converted to RGB, centre-cropped to a square and resized (antialiased) to the model's
size, each kind of change said in one line (data.photos).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError, RunFolder
from hspace.tasks.sample import open_shard, run_shards
from hspace.tasks.stages import Context, Stage, outputs

log = logging.getLogger(__name__)


def list_images(images: Path, labels: Path | None, attribute: str) -> tuple[list[str], dict[str, list[float]]]:
    """(relative file names, {attribute: scores}) from positive/ + negative/ or a labels CSV."""
    images = Path(images)
    if not images.is_dir():
        raise RunError(f"--images {images} is not a folder")
    if labels is None:
        pos, neg = images / "positive", images / "negative"
        if not (pos.is_dir() and neg.is_dir()):
            raise RunError(
                f"{images} needs positive/ and negative/ subfolders (or pass --labels CSV with a 'file' column)"
            )
        files = {
            sub: sorted(p.relative_to(images).as_posix() for p in (images / sub).iterdir() if p.is_file())
            for sub in ("positive", "negative")
        }
        for sub, names in files.items():
            if not names:
                raise RunError(f"{images / sub} holds no files")
        names = files["positive"] + files["negative"]
        return names, {attribute: [1.0] * len(files["positive"]) + [0.0] * len(files["negative"])}
    try:
        with open(labels, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise RunError(f"cannot read --labels {labels}: {e.strerror or e}") from None
    if not rows or "file" not in rows[0]:
        raise RunError(f"--labels {labels} needs a header with a 'file' column and one column per attribute")
    attributes = [c for c in rows[0] if c != "file"]
    if not attributes:
        raise RunError(f"--labels {labels} has no attribute columns besides 'file'")
    scores: dict[str, list[float]] = {a: [] for a in attributes}
    for line, row in enumerate(rows, start=2):
        for a in attributes:
            try:
                scores[a].append(float(row[a]))
            except (TypeError, ValueError):
                raise RunError(f"--labels {labels} line {line}: {a}={row[a]!r} is not a number") from None
    names = [row["file"] for row in rows]
    absent = [n for n in names if not (images / n).is_file()]
    if absent:
        raise RunError(f"--labels names {len(absent)} files not in {images}: {', '.join(absent[:5])}")
    return names, scores


def load_images(images: Path, names: list[str], size: int) -> tuple[np.ndarray, list[str]]:
    """(n, 3, size, size) uint8 and the notes on what was converted, upscaled or cropped
    (data.photos.read_photos); RunError listing every unreadable file (none is skipped)."""
    from hspace.data.photos import read_photos

    return read_photos([Path(images) / name for name in names], size, where=f" in {images}")


def invert_images(unet, scheduler, x_img, replay, method: str, refine: int, rows, on_step=None) -> dict:
    """Invert images (B, 3, R, R) in [-1, 1] (``method`` ddpm: edit-friendly DDPM inversion
    with the replay's eta and image i's generator for each row i of ``rows``; ddim: DDIM
    inversion with ``refine``), a latent model's through its VAE with the replay's source prompt.
    Returns x_T, the noise maps (None for ddim), the regenerated images and both errors:
    recon_mse (regenerated vs what the diffusion model was given: the photo, or for a latent
    model its VAE reconstruction) and vae_mse (VAE reconstruction vs photo; None for pixels)."""
    import torch

    from hspace.hcore.inversion import ddim_invert, ddpm_invert, reconstruct

    text = replay.text
    conditioning, x, target, vae_mse = None, x_img, x_img, None
    if text is not None:
        conditioning = text.conditioning(text.prompts_for(rows))
        x = text.encode(x_img)
        target = text.decode(x).cpu()
        vae_mse = ((target - x_img) ** 2).flatten(1).mean(1).numpy().astype(np.float32)
    steps, h_point, eta = replay.steps, replay.h_point, replay.eta
    if method == "ddpm":
        how = {"conditioning": conditioning, "on_step": on_step}
        x_T, noise = ddpm_invert(unet, scheduler, x, steps, replay.generators(rows), eta, h_point, **how)
        regenerated = reconstruct(unet, scheduler, x_T, steps, h_point, eta, noise, conditioning)
    else:
        x_T, noise = ddim_invert(unet, scheduler, x, steps, h_point, refine, on_step, conditioning), None
        regenerated = reconstruct(unet, scheduler, x_T, steps, h_point, conditioning=conditioning)
    if not torch.isfinite(x_T).all() or (noise is not None and not torch.isfinite(noise).all()):
        raise RunError("the inversion produced NaN/Inf (fp16 overflow? try --dtype float32)")
    regenerated = (text.decode(regenerated) if text is not None else regenerated).cpu()
    recon_mse = ((regenerated - target) ** 2).flatten(1).mean(1).numpy().astype(np.float32)
    return {"x_T": x_T, "noise": noise, "regenerated": regenerated, "recon_mse": recon_mse, "vae_mse": vae_mse}


def run_invert_shard(run_dir: str, shard: int) -> dict:
    """Invert the images of shard ``shard`` and write h, x0 (= the images), x_T, the noise
    maps (DDPM inversion), recon_mse (and vae_mse for a latent model)."""
    import torch

    from hspace.data import models
    from hspace.hcore.sampler import to_unit
    from hspace.tasks.sample import run_text

    opened = open_shard(run_dir, shard)
    if opened is None:
        return {"shard": shard, "recomputed": False}
    meta, store, rows, unet, scheduler = opened
    cfg, text = meta["config"], run_text(meta)
    names = cfg["images"][rows.start : rows.stop]
    images, _ = load_images(Path(cfg["images_dir"]), names, store.layout.image_shape[-1])
    h = np.empty((len(rows), cfg["steps"], *store.layout.h_shape), np.float16)

    def on_step(step: int, t: int, h_t: torch.Tensor) -> None:
        h[:, step] = h_t.detach().to("cpu", torch.float16).numpy()

    replay = models.replay_for_run(meta, text)
    how = (cfg.get("method", "ddim"), cfg.get("refine", 0))
    result = invert_images(unet, scheduler, to_unit(images), replay, *how, rows, on_step)
    if not np.isfinite(h).all():
        raise RunError(f"shard {shard}: the inversion produced NaN/Inf in h (fp16 overflow? try --dtype float32)")
    extra = {"xT": result["x_T"].cpu().numpy().astype(np.float32), "recon_mse": result["recon_mse"]}
    if result["noise"] is not None:
        extra["noise_maps"] = result["noise"].cpu().numpy()
    if text is not None:
        extra |= {"vae_mse": result["vae_mse"], "prompt_index": np.zeros(len(rows), np.int32)}
    store.write_shard(shard, h, images, extra)
    return {"shard": shard, "recomputed": True, "recon_mse": float(result["recon_mse"].mean())}


def write_labels(run: RunFolder, scores: dict[str, list[float]]) -> list[str]:
    """The user's labels as an annotator ('labels') in annotations.zarr."""
    from hspace.data.stores import AnnotationStore

    store = AnnotationStore(run.annotations)
    names = list(scores)
    n = len(next(iter(scores.values())))
    arr, done = store.annotator_array("labels", names, n, max(1, n))
    arr[:] = np.array([scores[a] for a in names], np.float32).T
    done[:] = 1
    return store.rebuild_scores()


def create_inversion_run(run: RunFolder, section, device: str, dry: bool = False) -> dict | None:
    """run.json of an inverted run: the image list and labels in its config; every file is
    read before anything is written (an unreadable one fails the whole command)."""
    from hspace.tasks.sample import create_run

    names, scores = list_images(section.images, section.labels, section.attribute)

    def extra(unet, ref) -> dict:
        from hspace.data import models

        if ref.kind in models.FLOW_KINDS:
            raise RunError(
                f"{ref.id} is a flow-matching model ({ref.kind}): hspace inverts with DDIM / DDPM (eq. (5)), which "
                "needs a noise schedule it has not; invert with a U-Net or PixArt model"
            )
        _, notes = load_images(section.images, names, models.image_size(ref, unet.config))
        if not dry:
            for note in notes:
                log.warning("%s", note)
        ddpm = section.method == "ddpm"
        return {
            "kind": "inversion",
            "method": section.method,
            "n": len(names),
            "eta": section.eta if ddpm else 0.0,
            "seed": section.seed if ddpm else 0,  # DDIM inversion draws nothing; kept for the schema
            "refine": section.refine if not ddpm else 0,
            "images_dir": str(Path(section.images).resolve()),
            "images": names,
            "labels": scores,
        }

    return create_run(run, section, device, extra=extra, dry=dry)


# ----------------------------------------------------------------------------- the stage


def _create(run: RunFolder, invert, ctx: Context, dry: bool = False):
    return create_inversion_run(run, invert, ctx.device, dry=dry)


def invert_stage(run: RunFolder, invert, ctx: Context) -> dict:
    from hspace.data.stores import SampleStore

    config = run.read()["config"]
    computed = run_shards(run, ctx, run_one=run_invert_shard)
    columns = write_labels(run, config["labels"])
    group = SampleStore(run.samples).group
    summary = {
        "outputs": outputs(run, [run.samples, run.annotations]),
        "recomputed_shards": len(computed),
        "method": config.get("method", "ddim"),
        "recon_mse": float(group["recon_mse"][:].mean()),
        "labels": columns,
        "n": config["n"],
    }
    if "vae_mse" in group:
        summary["vae_mse"] = float(group["vae_mse"][:].mean())
    return summary


def psnr_of_mse(mse: float) -> str:
    """PSNR of an MSE of images in [-1, 1] (peak-to-peak 2), as text."""
    return "inf dB (exact)" if mse <= 1e-20 else f"{10 * math.log10(4 / mse):.1f} dB"


def recon_line(r: dict) -> str:
    how = {"ddpm": "edit-friendly DDPM inversion", "ddim": "DDIM inversion"}.get(r.get("method", "ddim"))
    vae = f"; VAE alone: PSNR {psnr_of_mse(r['vae_mse'])}" if "vae_mse" in r else ""
    return (
        f"{r['n']} images inverted ({how}); regenerated vs input: MSE {r['recon_mse']:.3g}, PSNR "
        f"{psnr_of_mse(r['recon_mse'])} (images in [-1, 1]){vae}; labels: {', '.join(r['labels'])}"
    )


STAGE = Stage(
    "invert",
    sections=("invert",),
    inputs=(),
    outputs=("samples", "annotations"),
    body=invert_stage,
    summary=recon_line,
    create=_create,
    pipeline=False,
    doc="Invert real images into a run folder (edit-friendly DDPM inversion, or DDIM with --method ddim), "
    "their labels as annotations, so `hspace directions OUT --attribute A` and `hspace edit OUT --sample I` "
    "work as on samples.",
)
