"""Real-image supervision (paper sec. 5): DDIM-invert user images into a run folder that
looks like a sampled one (samples.zarr with h_{T:1} and x0, plus x_T and the
reconstruction error), with the user's labels as an annotation, so ``hspace directions``
builds eq. (10) directions from real images exactly as from generated ones.

Images come as a folder with ``positive/`` and ``negative/`` subfolders (one attribute,
scores 1 / 0) or as any folder plus a CSV ``file,<attribute>,...`` of labels. Every file
must be a readable image: unreadable ones are listed and nothing is written. Images are
centre-cropped to a square and resized (antialiased) to the model's sample size.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError, RunFolder
from hspace.tasks import views
from hspace.tasks.sample import open_shard, run_shards
from hspace.tasks.stages import Context, Stage, outputs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


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


def load_images(images: Path, names: list[str], size: int) -> np.ndarray:
    """(n, 3, size, size) uint8; RunError listing every unreadable file (none is skipped)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    out = np.empty((len(names), 3, size, size), np.uint8)
    bad = []
    for i, name in enumerate(names):
        try:
            with Image.open(Path(images) / name) as im:
                im = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
                out[i] = np.asarray(im).transpose(2, 0, 1)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            bad.append(f"{name} ({type(e).__name__})")
    if bad:
        raise RunError(
            f"{len(bad)} of {len(names)} files in {images} are not readable images: {', '.join(bad[:8])}"
            + (" ..." if len(bad) > 8 else "")
            + "; remove or fix them (nothing is skipped silently)"
        )
    return out


def run_invert_shard(run_dir: str, shard: int) -> dict:
    """Invert the images of shard ``shard`` and write h, x0 (= the images), x_T, recon_mse."""
    import torch

    from hspace.hcore.inversion import ddim_invert, reconstruct
    from hspace.hcore.sampler import to_unit

    opened = open_shard(run_dir, shard)
    if opened is None:
        return {"shard": shard, "recomputed": False}
    cfg, store, rows, unet, scheduler = opened
    images = load_images(Path(cfg["images_dir"]), cfg["images"][rows.start : rows.stop], store.layout.image_shape[-1])
    x0 = to_unit(images)
    h = np.empty((len(rows), cfg["steps"], *store.layout.h_shape), np.float16)

    def on_step(step: int, t: int, h_t: torch.Tensor) -> None:
        h[:, step] = h_t.detach().to("cpu", torch.float16).numpy()

    x_T = ddim_invert(unet, scheduler, x0, cfg["steps"], cfg["h_point"], cfg["refine"], on_step)
    if not (torch.isfinite(x_T).all() and np.isfinite(h).all()):
        raise RunError(f"shard {shard}: the inversion produced NaN/Inf (fp16 overflow? try --dtype float32)")
    rec = reconstruct(unet, scheduler, x_T, cfg["steps"], cfg["h_point"]).cpu()
    mse = ((rec - x0) ** 2).flatten(1).mean(1).numpy().astype(np.float32)
    store.write_shard(shard, h, images, {"xT": x_T.cpu().numpy().astype(np.float32), "recon_mse": mse})
    return {"shard": shard, "recomputed": True, "recon_mse": float(mse.mean())}


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

    def extra(unet) -> dict:
        load_images(section.images, names, unet.config.sample_size)
        return {
            "kind": "inversion",
            "n": len(names),
            "eta": 0.0,
            "seed": 0,  # no generator draws anything at eta = 0; kept for the run.json schema
            "refine": section.refine,
            "images_dir": str(Path(section.images).resolve()),
            "images": names,
            "labels": scores,
        }

    return create_run(run, section, device, extra=extra, dry=dry)


# ----------------------------------------------------------------------------- the stage


def _create(run: RunFolder, section, ctx: Context, dry: bool = False):
    return create_inversion_run(run, section, ctx.device, dry=dry)


def invert_stage(run: RunFolder, section, ctx: Context) -> dict:
    from hspace.data.stores import SampleStore

    config = run.read()["config"]
    computed = run_shards(run, show_progress=ctx.show_progress)
    columns = write_labels(run, config["labels"])
    mse = float(SampleStore(run.samples).group["recon_mse"][:].mean())
    return {
        "outputs": outputs(run, [run.samples, run.annotations]),
        "recomputed_shards": len(computed),
        "recon_mse": mse,
        "labels": columns,
        "n": config["n"],
    }


STAGE = Stage(
    "invert",
    order=10,
    sections=("invert",),
    inputs=(),
    outputs=("samples", "annotations"),
    body=invert_stage,
    summary=views.recon,
    create=_create,
    pipeline=False,
    doc="DDIM-invert real images (eta = 0) into a run folder, their labels as annotations, so "
    "`hspace directions OUT --attribute A` works as on samples.",
)
