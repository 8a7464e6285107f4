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
import hashlib
import json
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from data.catalog import AnnotationStore, RunError, RunFolder, SampleLayout, SampleStore
from tasks.sample import _device, cached_model, open_shard

INVERT_CODE_VERSION = "invert-1"
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


def invert_fingerprint(meta: dict) -> str:
    blob = json.dumps([meta["model"]["fingerprint"], meta["config"], INVERT_CODE_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@task(name="prepare-inversion")
def prepare_inversion(run_dir: str, image_shape: tuple[int, int, int]) -> dict:
    """samples.zarr for an inverted run: seeds -1 (no generator), extra arrays x_T and
    recon_mse; x0 holds the input images themselves."""
    run = RunFolder(Path(run_dir))
    meta = run.read()
    cfg = meta["config"]
    if run.samples.exists():
        store = SampleStore(run.samples, mode="r+")
    else:
        unet, scheduler = cached_model(meta["model"]["path"], meta["model"]["fingerprint"], _device(meta), cfg["dtype"])
        from hcore.hspace import h_shape
        from hcore.sampler import ddim_scheduler

        sched = ddim_scheduler(scheduler)
        sched.set_timesteps(cfg["steps"])
        image_shape = tuple(image_shape)
        layout = SampleLayout(cfg["n"], cfg["steps"], h_shape(unet), image_shape, cfg["batch_size"])
        extra = {"xT": (image_shape, "float32"), "recon_mse": ((), "float32")}
        store = SampleStore.create(run.samples, layout, np.full(cfg["n"], -1), sched.timesteps.numpy(), extra)
    return {"n_shards": store.layout.n_shards, "pending": store.pending_shards()}


def run_invert_shard(run_dir: str, shard: int) -> dict:
    """Invert the images of shard ``shard`` and write h, x0 (= the images), x_T, recon_mse."""
    import torch

    from hcore.inversion import ddim_invert, reconstruct

    opened = open_shard(run_dir, shard)
    if opened is None:
        return {"shard": shard, "recomputed": False}
    cfg, store, rows, unet, scheduler = opened
    images = load_images(Path(cfg["images_dir"]), cfg["images"][rows.start : rows.stop], store.layout.image_shape[-1])
    x0 = torch.from_numpy(images).float() / 127.5 - 1
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


@task(name="invert-shard", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, task_run_name="invert-shard-{shard}")
def invert_shard(run_dir: str, shard: int, fingerprint: str) -> dict:
    """One inversion batch; ``fingerprint`` covers the model, the config (image list
    included) and the code version."""
    return run_invert_shard(run_dir, shard)


def write_labels(run: RunFolder, scores: dict[str, list[float]]) -> list[str]:
    """The user's labels as an annotator ('labels') in annotations.zarr."""
    store = AnnotationStore(run.annotations)
    names = list(scores)
    n = len(next(iter(scores.values())))
    arr, done = store.annotator_array("labels", names, n, max(1, n))
    arr[:] = np.array([scores[a] for a in names], np.float32).T
    done[:] = 1
    return store.rebuild_scores()
