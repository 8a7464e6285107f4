"""Typed stores of a run folder's Zarr arrays (the catalog's: see data/catalog.py).

    samples.zarr/      h (n, T, C, H, W) float16, shards (b, T, C, H, W), chunks
                       (b, 1, C, H, W); x0 (n, 3, R, R) uint8; seeds (n,) int64;
                       timesteps (T,) int64; done (n_shards,) uint8, one file per shard;
                       with sample.store_xt, xt (n, T, C, R, R) float16 (x_t before each
                       step's U-Net pass) sharded and chunked like h
    annotations.zarr/  scores per annotator
    pca.zarr/          per-timestep components
    jacobian.zarr/     sample_{I}/step_{S}/ singular vectors

Zarr rules this module keeps (measured on zarr 3.1): the whole array is allocated up front
(resize rewrites metadata); a shard is written whole by exactly one writer (partial shard
writes race and silently lose data); its ``done`` marker is written only after the shard,
so a crash mid-write leaves the shard pending and it is redone on resume; every chunk
carries a crc32c checksum; h's fill value is NaN so a hole is visible.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from hspace.data.catalog import RunError, replace_folder

log = logging.getLogger(__name__)
XT = "xt"  # samples.zarr's optional x_t (n, T, C, R, R) float16 (sample.store_xt): step 0 holds x_T

# ---------------------------------------------------------------------------- samples.zarr


@dataclass(frozen=True)
class SampleLayout:
    n: int
    steps: int
    h_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    batch_size: int

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.batch_size)

    def shard_rows(self, k: int) -> range:
        return range(k * self.batch_size, min(self.n, (k + 1) * self.batch_size))


class SampleStore:
    """samples.zarr: allocation, whole-shard writes, done markers."""

    def __init__(self, path: Path, mode: str = "r", h_array: str = "h"):  # h_array: "h" or "h@POINT"
        self.path = Path(path)
        try:
            self.group = zarr.open_group(self.path, mode=mode)
            if h_array not in self.group:
                raise RunError(f"{self.path} holds no {h_array}: sample a run with --h-points to capture more points")
            self.h = self.group[h_array]
            self.x0 = self.group["x0"]
            self.seeds = self.group["seeds"]
            self.timesteps = self.group["timesteps"]
            self.done = self.group["done"]
        except (FileNotFoundError, KeyError, ValueError) as e:  # zarr's NodeNotFoundError is a ValueError
            raise RunError(
                f"{self.path} is missing or incomplete ({type(e).__name__}: {e}); "
                "delete it and rerun `hspace sample` to recreate it"
            ) from None
        n, steps, *h_shape = self.h.shape
        self.layout = SampleLayout(n, steps, tuple(h_shape), tuple(self.x0.shape[1:]), self.h.shards[0])

    @classmethod
    def create(
        cls,
        path: Path,
        layout: SampleLayout,
        seeds: np.ndarray,
        timesteps: np.ndarray,
        extra: dict[str, tuple[tuple[int, ...], str]] | None = None,
    ) -> SampleStore:
        """Allocate every array; ``extra``: more per-sample arrays, name -> (shape of one
        sample, dtype), written by write_shard with the rest (e.g. an inversion's x_T)."""
        path = Path(path)
        final, path = path, path.with_name(path.name + ".partial")  # built aside, then swapped in
        shutil.rmtree(path, ignore_errors=True)
        group = zarr.open_group(path, mode="w-")
        n, steps, b = layout.n, layout.steps, layout.batch_size
        c, hh, ww = layout.h_shape
        group.create_array(
            "h",
            shape=(n, steps, c, hh, ww),
            dtype="float16",
            shards=(b, steps, c, hh, ww),
            chunks=(b, 1, c, hh, ww),
            compressors=[Crc32cCodec()],
            fill_value=np.nan,
            dimension_names=("sample", "step", "channel", "y", "x"),
        )
        group.create_array(
            "x0",
            shape=(n, *layout.image_shape),
            dtype="uint8",
            chunks=(b, *layout.image_shape),
            compressors=[ZstdCodec(level=3), Crc32cCodec()],
            fill_value=0,
            dimension_names=("sample", "channel", "y", "x"),
        )
        group.create_array("seeds", data=np.asarray(seeds, np.int64), chunks=(max(1, n),), compressors=[Crc32cCodec()])
        group.create_array(
            "timesteps", data=np.asarray(timesteps, np.int64), chunks=(steps,), compressors=[Crc32cCodec()]
        )
        group.create_array(
            "done", shape=(layout.n_shards,), dtype="uint8", chunks=(1,), fill_value=0, compressors=[Crc32cCodec()]
        )
        for name, (shape, dtype) in (extra or {}).items():
            per_step = name == XT or name.startswith("h@")  # x_t / h at extra points: every step, like h
            group.create_array(
                name,
                shape=(n, *shape),
                dtype=dtype,
                shards=(b, *shape) if per_step else None,
                chunks=(b, 1, *shape[1:]) if per_step else (b, *shape),
                compressors=[Crc32cCodec()],
                fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
                dimension_names=("sample", "step", "channel", "y", "x") if per_step else None,
            )
        group.attrs.update(
            {
                "batch_size": b,
                "h_layout": "(sample, step, C, H, W); step 0 = first denoising step (t = T)",
                "extra": sorted(extra or {}),
            }
        )
        os.replace(path, final)
        return cls(final, mode="r+")

    def write_shard(self, k: int, h: np.ndarray, x0: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write shard k whole (h (b, T, C, H, W) float16, x0 (b, 3, R, R) uint8, and the
        store's extra arrays), then mark it done."""
        rows = self.layout.shard_rows(k)
        arrays = {"h": h, "x0": x0, **(extra or {})}
        missing = set(self.group.attrs.get("extra", [])) - set(arrays)
        if missing:
            raise ValueError(f"shard {k}: no values given for {sorted(missing)}")
        if any(a.shape[0] != len(rows) for a in arrays.values()):
            shapes = {name: a.shape for name, a in arrays.items()}
            raise ValueError(f"shard {k} holds {len(rows)} samples, got {shapes}")
        for name in arrays:  # a damaged old shard must not be read back
            arr = self.group[name]
            key = arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
            (self.path / name / key).unlink(missing_ok=True)
        for name, values in arrays.items():
            self.group[name][rows.start : rows.stop] = values
        self.done[k] = 1

    def done_shards(self) -> np.ndarray:
        return np.flatnonzero(self.done[:] == 1)

    def bytes_per_sample(self) -> int:
        """Uncompressed bytes one sample adds to the store (h, x0, seeds and any extra
        per-sample array): what an unfinished shard still needs on disk, per row."""
        n = self.layout.n
        return sum(
            int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
            for _, a in self.group.arrays()
            if a.shape and a.shape[0] == n and a.name.rsplit("/", 1)[-1] != "done"
        )

    def pending_bytes(self) -> int:
        """Bytes the pending shards will write (uncompressed: fp16 activations barely compress)."""
        rows = sum(len(self.layout.shard_rows(k)) for k in self.pending_shards())
        return rows * self.bytes_per_sample()

    def pending_shards(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(self.done[:] != 1)]

    def complete(self) -> bool:
        return not self.pending_shards()


def package_versions(names=("hspace", "torch", "diffusers", "prefect", "zarr", "numpy")) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------- annotations.zarr


class AnnotationStore:
    """annotations.zarr: one array per annotator, ``by_annotator/<id>`` (n, A_k) float32
    with chunk-sized done markers (resumable, one writer per chunk), and the combined
    ``scores`` (n, A) whose attrs ``names`` / ``annotators`` list every column, rebuilt
    whenever an annotator completes (so several annotators append their columns)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.group = zarr.open_group(self.path, mode="a")

    def annotator_array(self, annotator: str, names: list[str], n: int, chunk: int):
        sub = self.group.require_group("by_annotator")
        if annotator in sub and f"{annotator}.done" not in sub:
            del sub[annotator]  # died between creating the two arrays: start this annotator afresh
        if annotator in sub:
            arr = sub[annotator]
            if list(arr.attrs.get("names", [])) != list(names) or arr.shape != (n, len(names)):
                raise RunError(
                    f"{self.path}/by_annotator/{annotator} holds other columns or rows than "
                    f"{annotator} gives now; delete it to annotate again"
                )
            return arr, sub[f"{annotator}.done"]
        arr = sub.create_array(
            annotator,
            shape=(n, len(names)),
            dtype="float32",
            chunks=(chunk, len(names)),
            fill_value=np.nan,
            compressors=[Crc32cCodec()],
            dimension_names=("sample", "attribute"),
        )
        arr.attrs["names"] = list(names)
        done = sub.create_array(
            f"{annotator}.done",
            shape=(-(-n // chunk),),
            dtype="uint8",
            chunks=(1,),
            fill_value=0,
            compressors=[Crc32cCodec()],
        )
        return arr, done

    def rebuild_scores(self) -> list[str]:
        """Concatenate every complete annotator's columns into ``scores``."""
        sub = self.group["by_annotator"]
        blocks, names, owners = [], [], []
        keys = set(sub.array_keys())
        for key in sorted(k for k in keys if not k.endswith(".done")):
            if f"{key}.done" in keys and (sub[f"{key}.done"][:] == 1).all():
                blocks.append(sub[key][:])
                names += list(sub[key].attrs["names"])
                owners += [key] * sub[key].shape[1]
        if len(set(names)) != len(names):
            dup = sorted({x for x in names if names.count(x) > 1})
            raise RunError(f"annotators give the same attribute names {dup}; annotate with one of them only")
        scores = np.concatenate(blocks, 1) if blocks else np.zeros((0, 0), np.float32)
        arr = self.group.create_array(
            "scores",
            data=scores,
            chunks=scores.shape or (1, 1),
            overwrite=True,
            compressors=[Crc32cCodec()],
            dimension_names=("sample", "attribute"),
        )
        arr.attrs.update({"names": names, "annotators": owners})
        return names

    def scores(self) -> tuple[np.ndarray, list[str]]:
        if "scores" not in self.group:
            raise RunError(f"{self.path} has no scores yet; run `hspace annotate RUN --annotator oracle`")
        arr = self.group["scores"]
        return arr[:], list(arr.attrs["names"])


def timestep_batches(store: SampleStore, t: int, batch: int, rows: np.ndarray | None = None):
    """A re-iterable source of (B, D) float32 batches of h_t, read chunk by chunk (the
    shard layout puts one timestep per inner chunk, so only timestep t is touched).
    ``rows``: restrict to these sample indices (sorted), e.g. the complete shards'."""
    n = store.layout.n

    def source():
        if rows is None:
            for start in range(0, n, batch):
                x = store.h[start : min(n, start + batch), t]
                yield x.reshape(x.shape[0], -1).astype(np.float32)
        else:
            for start in range(0, len(rows), batch):
                part = rows[start : start + batch]
                x = store.h.get_orthogonal_selection((part, t))  # only these rows, never the gaps
                yield x.reshape(x.shape[0], -1).astype(np.float32)

    return source


class PCAStore:
    """pca.zarr: mean (T, D), components (T, K, D), explained_variance (T, K),
    explained_variance_ratio (T, K), std (T, K), sign_flips (T, K), sign_alignment (T, K)
    (|cos| of each sign choice, hcore.pca.align_signs); attrs: method,
    n_samples, reference_step, h_shape. Written whole by one process."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(tmp, mode="w")
        for name, value in arrays.items():
            chunks = (1, *value.shape[1:]) if value.ndim > 1 else value.shape
            group.create_array(name, data=value, chunks=chunks, compressors=[Crc32cCodec()])
        group.attrs.update(attrs)
        replace_folder(tmp, self.path)  # the previous result stays until the new one is in place

    def read(self) -> tuple[dict[str, np.ndarray], dict]:
        if not self.path.exists():
            raise RunError(f"{self.path} does not exist; run `hspace pca RUN` first")
        group = zarr.open_group(self.path, mode="r")
        return {name: arr[:] for name, arr in group.arrays()}, dict(group.attrs)


class JacobianStore:
    """jacobian.zarr: group sample_{I}/step_{S}/ with x_t (3, R, R) float32 (the point of
    linearisation, timestep t in attrs), singular_values (K,), vectors (K, C, H, W)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(
        self,
        sample: int,
        step: int,
        x_t: np.ndarray,
        t: int,
        singular_values: np.ndarray,
        vectors: np.ndarray,
        attrs: dict,
    ) -> str:
        root = zarr.open_group(self.path, mode="a")
        name = f"sample_{sample}/step_{step}"
        group = root.require_group(name)
        for key, value in (("x_t", x_t), ("singular_values", singular_values), ("vectors", vectors)):
            group.create_array(key, data=np.asarray(value, np.float32), overwrite=True, compressors=[Crc32cCodec()])
        group.attrs.update({"t": int(t), **attrs})
        return name

    def read(self, sample: int, step: int) -> tuple[dict[str, np.ndarray], dict]:
        try:
            group = zarr.open_group(self.path, mode="r")[f"sample_{sample}/step_{step}"]
        except (FileNotFoundError, KeyError, ValueError):
            raise RunError(f"{self.path} has no sample_{sample}/step_{step}; run `hspace jacobian` first") from None
        return {k: a[:] for k, a in group.arrays()}, dict(group.attrs)


# ------------------------------------------------------------------------ latent_svd/


class LatentSvdStore:
    """latent_svd/ (the latent-svd stage): ``svd.zarr`` with, per variant ("channel": one H x W
    matrix per channel of x_t; "flat": one (C*H) x W matrix), ``VARIANT/S`` (n, T, M, k),
    ``VARIANT/U`` (n, T, M, H', k) and ``VARIANT/Vh`` (n, T, M, k, W) float32, one chunk per
    sample; ``properties.json`` and the figures beside it. Written whole into a ``.partial``
    folder and swapped in."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.zarr = self.folder / "svd.zarr"

    def file(self, name: str) -> Path:
        return self.folder / name

    def arrays(self, variant: str) -> tuple:
        """(S, U, Vh) of ``variant`` as zarr arrays."""
        group = zarr.open_group(self.zarr, mode="r")[variant]
        return group["S"], group["U"], group["Vh"]

    @staticmethod
    def create(folder: Path, n: int, steps: int, shapes: dict[str, tuple[int, int, int]], k: int) -> LatentSvdStore:
        """A new store in ``folder`` (emptied first); ``shapes``: variant -> (M, H', W)."""
        shutil.rmtree(folder, ignore_errors=True)
        store = LatentSvdStore(folder)
        group = zarr.open_group(store.zarr, mode="w-")
        for variant, (m, rows, cols) in shapes.items():
            sub = group.create_group(variant)
            for name, shape, dims in (
                ("S", (m, k), ("k",)),
                ("U", (m, rows, k), ("row", "k")),
                ("Vh", (m, k, cols), ("k", "col")),
            ):
                sub.create_array(
                    name,
                    shape=(n, steps, *shape),
                    dtype="float32",
                    chunks=(1, steps, *shape),
                    compressors=[Crc32cCodec()],
                    fill_value=np.nan,
                    dimension_names=("sample", "step", "matrix", *dims),
                )
        group.attrs.update({"k": k, "layout": "x_t = U diag(S) Vh per matrix; step 0 = x_T (the first denoising step)"})
        return store
