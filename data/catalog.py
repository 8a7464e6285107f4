"""The catalog: the one place that knows a run folder's layout (../DESIGN.md).

    RUN/run.json          config, package versions, model id + revision + fingerprint,
                          stage states (written atomically)
    RUN/samples.zarr/     h (n, T, C, H, W) float16, shards (b, T, C, H, W), chunks
                          (b, 1, C, H, W); x0 (n, 3, R, R) uint8; seeds (n,) int64;
                          timesteps (T,) int64; done (n_shards,) uint8, one file per shard
    RUN/.lock             one writer at a time

Zarr rules this module keeps (STACK_NOTES.md): the whole array is allocated up front
(resize rewrites metadata); a shard is written whole by exactly one writer (partial shard
writes race and silently lose data); its ``done`` marker is written only after the shard,
so a crash mid-write leaves the shard pending and it is redone on resume; every chunk
carries a crc32c checksum; h's fill value is NaN so a hole is visible.

This module does not import torch, so read-only commands (``hspace inspect``) are fast.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
SAMPLES = "samples.zarr"
ANNOTATIONS = "annotations.zarr"
DIRECTIONS = "directions"
FIGURES = "figures"
LOCK = ".lock"
PREFECT_RESULTS = ".prefect-results"
FORMAT_VERSION = 1
# the stages of `hspace run`, in order (flows.pipeline runs them; inspect and list show them)
PIPELINE_STAGES = ["sample", "annotate", "pca", "directions", "disentangle", "evaluate", "figures", "report"]


class RunError(Exception):
    """A problem with a run folder that the user must act on; the message says how."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- run folder


def require_sampled(meta: dict, what: str) -> None:
    """Refuse commands that replay samples from their seeds on a run of inverted images."""
    if meta.get("config", {}).get("kind") == "inversion":
        raise RunError(
            f"{what} replays generated samples from their seeds, and this run holds inverted real images; "
            "run it on a sampled run (`hspace sample`), using the directions built here"
        )


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def annotations(self) -> Path:
        return self.root / ANNOTATIONS

    @property
    def directions(self) -> Path:
        return self.root / DIRECTIONS

    @property
    def figures(self) -> Path:
        return self.root / FIGURES

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK

    @property
    def prefect_results(self) -> Path:
        return self.root / PREFECT_RESULTS

    def exists(self) -> bool:
        return self.run_json.exists()

    def read(self) -> dict:
        if not self.run_json.exists():
            raise RunError(
                f"{self.root} is not an hspace run (no {RUN_JSON}); create one with `hspace sample --out {self.root}`"
            )
        try:
            meta = json.loads(self.run_json.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{self.run_json} is not valid JSON ({e}); restore it or start a new run folder") from None
        for key in ("format", "config", "model", "stages"):
            if key not in meta:
                raise RunError(
                    f"{self.run_json} lacks the key {key!r} (edited by hand?); restore it or start a new run folder"
                )
        return meta

    def write(self, meta: dict) -> None:
        _write_json_atomic(self.run_json, meta)

    def init(self, config: dict, model: dict, versions: dict) -> dict:
        """Create run.json for a new run, or check that an existing one matches ``config``
        and ``model``. Refuses (RunError) to reuse a folder holding another run."""
        if self.exists():
            meta = self.read()
            diffs = [
                f"{k}: stored {meta['config'].get(k)!r} != requested {config.get(k)!r}"
                for k in sorted(set(meta["config"]) | set(config))
                if meta["config"].get(k) != config.get(k)
            ]
            if meta["model"].get("fingerprint") != model.get("fingerprint"):
                diffs.append(
                    f"model: stored {meta['model'].get('id')} ({meta['model'].get('fingerprint', '')[:12]}) "
                    f"!= requested {model.get('id')} ({model.get('fingerprint', '')[:12]})"
                )
            if diffs:
                raise RunError(
                    f"{self.root} already holds a run with a different config ({'; '.join(diffs)}); "
                    "refusing to overwrite it: pick another --out or repeat the original command"
                )
            meta["model"]["path"] = model["path"]  # same weights (fingerprint), maybe a new place
            return meta
        if self.root.exists() and any(p.name != LOCK for p in self.root.iterdir()):
            raise RunError(
                f"{self.root} exists, is not empty and holds no {RUN_JSON}; pick an empty or new --out folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "created": _now(),
            "config": config,
            "model": model,
            "versions": versions,
            "stages": {},
        }
        self.write(meta)
        return meta

    def set_stage(self, stage: str, **fields) -> None:
        meta = self.read()
        meta["stages"].setdefault(stage, {}).update(fields, updated=_now())
        self.write(meta)

    @contextmanager
    def stage(self, stage: str, **fields):
        """Mark a stage running; failed (with the error) if the body raises. A RunError
        (bad input, refused before any work) puts the stage back as it was."""
        before = self.read()["stages"].get(stage)
        self.set_stage(stage, state="running", **fields)
        try:
            yield
        except RunError:
            meta = self.read()
            if before is None:
                meta["stages"].pop(stage, None)
            else:
                meta["stages"][stage] = before
            self.write(meta)
            raise
        except BaseException as e:
            self.set_stage(stage, state="failed", error=f"{type(e).__name__}: {e}"[:500])
            raise

    # ------------------------------------------------------------------------- locking

    @contextmanager
    def lock(self, command: str, break_stale: bool = False):
        """Hold RUN/.lock for the duration; refuse a second writer (RunError naming the
        holder). A lock whose pid is provably dead (same host, no such process: a crash or a
        kill -9) is taken over with a one-line warning naming the old pid, so rerunning the
        same command resumes. A lock from another host (a shared filesystem) cannot be
        checked from here: it is taken over only with ``break_stale`` (--break-lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise RunError(
                f"{self.root} is not writable (read-only folder or file system); fix its permissions, copy the run "
                "somewhere writable, or pick another --out"
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": command}
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except (PermissionError, OSError) as e:
                if isinstance(e, FileExistsError):
                    holder = self.lock_holder()
                else:
                    raise RunError(
                        f"cannot create the lock {self.lock_path} ({e.strerror or e}): a read-only folder or a "
                        "full disk? copy the run somewhere writable (inspect and verify work as is: they take no lock)"
                    ) from None
                if holder is not None and (_is_stale(holder) or (break_stale and not _same_host(holder))):
                    # rename, then check that what we moved aside is the stale lock we read:
                    # two breakers racing cannot both remove a fresh lock
                    aside = self.lock_path.with_name(f"{LOCK}.stale-{os.getpid()}")
                    try:
                        os.replace(self.lock_path, aside)
                    except FileNotFoundError:
                        continue
                    moved = _read_lock(aside)
                    if moved != holder:
                        os.replace(aside, self.lock_path)
                        raise RunError(_lock_message(self.lock_path, moved)) from None
                    aside.unlink(missing_ok=True)
                    log.warning(
                        "took over the lock of pid %s on %s (%s, since %s), %s",
                        holder.get("pid"),
                        holder.get("host"),
                        holder.get("command"),
                        holder.get("started"),
                        "which is no longer running" if _is_stale(holder) else "as --break-lock asked",
                    )
                    continue
                raise RunError(_lock_message(self.lock_path, holder)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            break
        else:
            raise RunError(_lock_message(self.lock_path, self.lock_holder()))
        try:
            yield
        finally:
            self.lock_path.unlink(missing_ok=True)

    def lock_holder(self) -> dict | None:
        return _read_lock(self.lock_path)


def _read_lock(path: Path) -> dict | None:
    """The lock's content, or None if it is missing or not a lock hspace wrote."""
    try:
        holder = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_host(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname()


def _is_stale(holder: dict) -> bool:
    """Provably dead: written on this host by a process that no longer exists."""
    return _same_host(holder) and not _pid_alive(int(holder.get("pid", -1)))


def _lock_message(path: Path, holder: dict | None) -> str:
    if holder is None:
        return f"{path} exists but is unreadable; if no hspace process uses this run, delete it"
    who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} ({holder.get('command')})"
    if not _same_host(holder):
        return (
            f"run is locked by {who}, another host, whose process cannot be checked from here; wait for it to "
            "finish, or if it is gone (crashed on a shared filesystem), rerun with --break-lock to take it over"
        )
    return f"run is locked by {who}; wait for it to finish (read-only commands such as `hspace inspect` work meanwhile)"


def run_state(root: Path) -> str:
    """What a run folder is now, in one word: 'running' (its lock is held by a live process
    or by another host, whose liveness cannot be checked), 'complete' (every stage done),
    'failed' (a stage failed, or its writer died in it) or 'incomplete' (not started,
    stopped between stages, or unreadable). ``run_summary`` has the details."""
    state = run_summary(Path(root), PIPELINE_STAGES)["state"]
    if state.startswith("running"):
        return "running"
    return state if state in ("complete", "failed") else "incomplete"


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """Run folders (holding run.json) under ``root``, not descending into a run folder, at
    most ``depth`` levels down (scheduled runs live in runs/scheduled/<time>-<name>/)."""
    root = Path(root)
    if (root / RUN_JSON).exists():
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found += find_runs(child, depth - 1)
    return found


def run_summary(path: Path, pipeline_stages: list[str]) -> dict:
    """One line of `hspace list`: name, model, created, n, steps, every stage's state
    (done, failed, running with its lock owner, pending) and the headline leakage numbers
    of eval/summary.json. Reads run.json, the lock and summary.json only: no Zarr, no Prefect."""
    run = RunFolder(Path(path))
    entry: dict = {"path": str(run.root), "name": run.root.name}
    try:
        meta = run.read()
    except RunError as e:
        return {**entry, "state": "unreadable", "error": str(e), "stages": {}}
    cfg, model = meta.get("config", {}), meta.get("model", {})
    entry.update(
        model=model.get("id"),
        fingerprint=(model.get("fingerprint") or "")[:12],
        created=meta.get("created"),
        n=cfg.get("n"),
        steps=cfg.get("steps"),
        dtype=cfg.get("dtype"),
    )
    holder = run.lock_holder()
    live = holder is not None and not _is_stale(holder)  # another host's lock counts as live
    owner = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else None
    records = meta.get("pipeline") or meta.get("stages") or {}
    names = list(pipeline_stages) if meta.get("pipeline") else list(records)
    stages = {}
    for name in names:
        state = records.get(name, {}).get("state", "pending")
        if state == "running":
            state = f"running ({owner})" if live else "failed (its process died)"
        stages[name] = state
    entry["stages"] = stages
    if live:
        entry["state"] = f"running ({owner})"
    elif any(v.startswith("failed") for v in stages.values()):
        entry["state"] = "failed"
    elif (
        stages
        and all(v == "done" for v in stages.values())
        and (not meta.get("pipeline") or (run.root / "report.html").exists())
    ):
        entry["state"] = "complete"
    else:
        entry["state"] = "incomplete"
    try:
        summary = json.loads((run.root / "eval" / "summary.json").read_text())
        before, after = summary["original"], summary.get("disentangled", {})
        entry["leakage"] = {
            "offdiagonal": before.get("mean_offdiagonal"),
            "offdiagonal_disentangled": after.get("mean_offdiagonal"),
            "diagonal": before.get("mean_diagonal"),
            "diagonal_disentangled": after.get("mean_diagonal"),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        entry["leakage"] = None
    return entry


def prune_runs(root: Path, keep: int) -> list[Path]:
    """Delete the oldest complete run folders under ``root`` beyond the newest ``keep``
    complete ones (`hspace schedule --keep N`). A failed, running or incomplete folder is
    never deleted, nor the only complete one. Returns the deleted folders, oldest first."""
    if keep < 1:
        raise RunError(f"--keep must be at least 1, got {keep}")
    complete = [p for p in sorted(Path(root).iterdir()) if p.is_dir() and run_state(p) == "complete"]
    complete.sort(key=lambda p: (RunFolder(p).read().get("created", ""), p.name))
    doomed = complete[: max(0, len(complete) - keep)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


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

    def __init__(self, path: Path, mode: str = "r"):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(self.path, mode=mode)
            self.h = self.group["h"]
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
            group.create_array(
                name,
                shape=(n, *shape),
                dtype=dtype,
                chunks=(b, *shape),
                compressors=[Crc32cCodec()],
                fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
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
    """pca.zarr (DESIGN.md): mean (T, D), components (T, K, D), explained_variance (T, K),
    explained_variance_ratio (T, K), std (T, K), sign_flips (T, K); attrs: method,
    n_samples, reference_step, h_shape. Written whole by one process."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".partial")
        old = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(tmp, mode="w")
        for name, value in arrays.items():
            chunks = (1, *value.shape[1:]) if value.ndim > 1 else value.shape
            group.create_array(name, data=value, chunks=chunks, compressors=[Crc32cCodec()])
        group.attrs.update(attrs)
        if self.path.exists():  # keep the previous result until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
        os.replace(tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

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


def verify_run(run: RunFolder, fix: bool = False) -> list[dict]:
    """Read every chunk of a run back (crc32c checks each one) and check the markers.
    Returns problems as {what, detail, remedy}. fix=True marks damaged sample shards as
    pending, so that `hspace sample` recomputes exactly those."""
    problems = []
    try:
        run.read()
    except RunError as e:
        return [{"what": "run.json", "detail": str(e), "remedy": "restore run.json or start a new run folder"}]
    if run.samples.exists():
        try:
            store = SampleStore(run.samples, mode="r+" if fix else "r")
        except RunError as e:
            problems.append({"what": "samples.zarr", "detail": str(e), "remedy": "delete it and rerun hspace sample"})
            store = None
        if store is not None:
            for name in ("seeds", "timesteps"):
                try:
                    getattr(store, name)[:]
                except Exception as e:  # crc32c mismatch, truncated chunk
                    problems.append(
                        {
                            "what": f"samples.zarr/{name}",
                            "detail": f"unreadable ({e})"[:200],
                            "remedy": "delete samples.zarr and rerun `hspace sample`",
                        }
                    )
            for k in range(store.layout.n_shards):
                rows = store.layout.shard_rows(k)
                try:
                    marker = int(store.done[k])
                except Exception as e:  # a damaged marker: the shard cannot be trusted
                    if fix:
                        store.done[k] = 0
                    problems.append(
                        {
                            "what": f"samples shard {k} marker",
                            "detail": f"unreadable ({e})"[:200],
                            "remedy": "marked pending: rerun `hspace sample`"
                            if fix
                            else "run `hspace verify RUN --fix`, then rerun `hspace sample`",
                        }
                    )
                    continue
                if marker != 1:
                    problems.append(
                        {
                            "what": f"samples shard {k}",
                            "detail": "pending (never completed)",
                            "remedy": "rerun the same `hspace sample` command",
                        }
                    )
                    continue
                try:
                    h = store.h[rows.start : rows.stop]
                    store.x0[rows.start : rows.stop]
                    bad = "h holds NaN/Inf" if not np.isfinite(h.astype(np.float32)).all() else None
                except Exception as e:  # crc32c mismatch, truncated shard: zarr/numcodecs raise various types
                    bad = f"unreadable ({type(e).__name__}: {str(e)[:120]})"
                if bad:
                    if fix:
                        store.done[k] = 0
                    problems.append(
                        {
                            "what": f"samples shard {k} (samples {rows.start}-{rows.stop - 1})",
                            "detail": bad,
                            "remedy": "marked pending: rerun `hspace sample`"
                            if fix
                            else "run `hspace verify RUN --fix`, then rerun `hspace sample`",
                        }
                    )
    for name, remedy in (
        ("annotations.zarr", "delete it and rerun hspace annotate"),
        ("pca.zarr", "rerun hspace pca"),
        ("jacobian.zarr", "rerun hspace jacobian"),
    ):
        path = run.root / name
        if not path.exists():
            continue
        try:
            arrays = list(_walk_arrays(zarr.open_group(path, mode="r")))
        except Exception as e:  # corrupted metadata
            problems.append({"what": name, "detail": f"unreadable ({type(e).__name__}: {e})"[:200], "remedy": remedy})
            continue
        for arr_path, arr in arrays:
            try:
                arr[...]
            except Exception as e:  # crc32c mismatch, truncated chunk
                problems.append(
                    {
                        "what": f"{name}/{arr_path}",
                        "detail": f"unreadable ({type(e).__name__}: {e})"[:200],
                        "remedy": remedy,
                    }
                )
    for path in sorted(run.directions.glob("*.safetensors")) if run.directions.exists() else []:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                f.get_tensor("v")
        except Exception as e:
            problems.append(
                {
                    "what": f"directions/{path.name}",
                    "detail": f"unreadable ({str(e)[:120]})",
                    "remedy": "re-create it with the command named in its metadata (source)",
                }
            )
    return problems


def _walk_arrays(group, prefix: str = ""):
    for name, arr in group.arrays():
        yield prefix + name, arr
    for name, sub in group.groups():
        yield from _walk_arrays(sub, prefix + name + "/")
