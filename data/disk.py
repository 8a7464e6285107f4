"""Disk space: the bytes a run's large arrays take (the plan's disk table), the free space of
a run folder's file system, and the one-line refusals before a stage starts or when a disk
fills during one (another writer took the space).

``cfg`` is a run config (tasks.config.RunConfig: its sample, pca, directions and jacobian
sections); ``run`` a data.catalog.RunFolder."""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

from hspace.data.catalog import RunError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free bytes of the file system ``path`` is (or will be) on, and the existing folder
    asked (its nearest existing ancestor)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free, where


def require_space(path: Path, needed: int, what: str) -> None:
    """RunError (one line: needed, free, where) when ``needed`` bytes do not fit on the file
    system of ``path``; called before a stage that writes large arrays starts."""
    free, where = free_bytes(path)
    if needed > free:
        raise RunError(
            f"{what} needs {human_bytes(needed)} on disk but {where} has {human_bytes(free)} free; nothing was "
            "started: free space or choose a folder on a larger disk (`hspace run --plan` lists the bytes)"
        )


def disk_full_message(e: OSError, path: Path, what: str) -> str:
    """The one line for a disk that filled during work (another writer took the space)."""
    free, where = free_bytes(path)
    return (
        f"the disk filled while {what} ({e.strerror}; {human_bytes(free)} free at {where}); everything "
        f"finished before is kept (`hspace verify {path}` lists what is not): free space and rerun to resume"
    )


def pending_sample_bytes(run) -> int | None:
    """The bytes the unfinished shards of ``run``'s sample store will write; None where it
    has no readable store yet (a new run)."""
    from hspace.data.stores import SampleStore

    if not run.samples.exists():
        return None
    try:
        return SampleStore(run.samples).pending_bytes()
    except RunError:  # incomplete: prepare_store recreates it
        return None


def sample_bytes(steps: int, h_shape, image_shape) -> tuple[int, int]:
    """What one sample takes in samples.zarr, (h_{T:1} in float16, x0 in uint8)."""
    return steps * math.prod(h_shape) * 2, math.prod(image_shape)


def disk_needs(cfg, h_shape, image_shape, latent_shape=None, point_shapes=None) -> dict[str, tuple[str, int]]:
    """The large arrays a run writes, label -> (stage, bytes), uncompressed (fp16
    activations barely compress): the plan's disk table and what `hspace run` checks
    against the free space before it starts (h: n x T x C x H x W x 2 bytes); with
    sample.store_xt and the model's ``latent_shape`` (C, R, R), x_t: n x T x C x R x R x 2;
    ``point_shapes``: {extra h point: its h shape} (sample.h_points), h and its PCA at each."""
    n, steps = cfg.sample.n, cfg.sample.steps
    d = math.prod(h_shape)
    k = cfg.pca.components
    h, x0 = sample_bytes(steps, h_shape, image_shape)
    xt = cfg.sample.store_xt and latent_shape is not None
    return (
        {
            "h (samples.zarr)": ("sample", n * h),
            "x0 (samples.zarr)": ("sample", n * x0),
            "pca.zarr + directions": ("pca", (steps * (k + 1) * d * 4 + 2 * k * steps * d * 4) * cfg.pca.enabled),
            "attribute directions": ("directions", 3 * len(cfg.directions.attributes) * steps * d * 4),
        }
        | ({"x_t (samples.zarr)": ("sample", n * steps * math.prod(latent_shape) * 2)} if xt else {})
        | {
            f"h@{point} (samples.zarr)": ("sample", n * steps * math.prod(shape) * 2)
            for point, shape in (point_shapes or {}).items()
        }
    )


def run_disk_needs(run, cfg) -> dict[str, int]:
    """stage -> bytes it will write on an existing run (shapes from its samples.zarr), for the
    check before each stage that follows sampling; sampling checks its pending shards itself."""
    from hspace.data.stores import SampleStore

    if not run.samples.exists():
        return {}
    layout = SampleStore(run.samples).layout
    d = math.prod(layout.h_shape)
    needs: dict[str, int] = {}
    for stage, b in disk_needs(cfg, layout.h_shape, layout.image_shape).values():
        needs[stage] = needs.get(stage, 0) + b
    needs.pop("sample", None)
    j = cfg.jacobian
    needs["jacobian"] = j.k * d * 4 + math.prod(layout.image_shape) * 4  # vectors + the point x_t
    return needs
