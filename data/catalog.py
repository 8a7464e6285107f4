"""The catalog: the one place that knows a run folder's layout. Every path
inside a run folder is built here (``RunFolder``'s accessors; ``ARTIFACTS`` lists them for
`inspect` and `verify`); the Zarr stores are typed in data/stores.py.

    RUN/run.json          config, package versions, model id + revision + fingerprint, and one
                          record per stage: state, fingerprint, inputs, outputs, seconds (atomic)
    RUN/run.yaml          the `hspace run` config, as given
    RUN/samples.zarr/     h_{T:1}, x0, seeds (data/stores.SampleStore)
    RUN/annotations.zarr/ scores per annotator
    RUN/pca.zarr/         per-timestep PCA
    RUN/jacobian.zarr/    Jacobian singular vectors per (sample, step)
    RUN/directions/       NAME.safetensors (data/directions.py)
    RUN/eval/             Table-1 tables, heatmaps, PC names, summary.json
    RUN/figures/          edit grids and Fig. 7/8; RUN/layers/: the layer map (data/layers.py)
    RUN/report.html       everything above, browsable offline
    RUN/.lock             one writer at a time

This module does not import torch or zarr, so read-only commands are fast. run.json is
typed by ``RunRecord`` (pydantic): ``RunFolder.record()`` reads it once per command.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from hspace.data.record import FORMAT_VERSION, RunRecord, forget, parsed

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
LOCK = ".lock"
# artifact -> (path in the run folder, what it is): the only place these names are spelled
ARTIFACTS = {
    "run_json": (RUN_JSON, "config, versions, model and stage records"),
    "run_yaml": ("run.yaml", "the `hspace run` config"),
    "samples": ("samples.zarr", "h_{T:1}, x0 and seeds of every sample"),
    "annotations": ("annotations.zarr", "annotator scores"),
    "pca": ("pca.zarr", "per-timestep principal components"),
    "jacobian": ("jacobian.zarr", "Jacobian singular vectors"),
    "directions": ("directions", "direction files"),
    "eval": ("eval", "Table-1 tables, heatmaps, PC names"),
    "figures": ("figures", "edit grids, Fig. 7, Fig. 8"),
    "compare": ("compare", "every editing method side by side: leaderboard, figure, grid"),
    "latent_svd": ("latent_svd", "the SVD of x_t per step (svd.zarr), the SVD paper's properties measured"),
    "layers": ("layers", "the layer map: h at every block (h.zarr), its table and figure"),
    "report": ("report.html", "the run's report"),
}


class RunError(Exception):
    """A problem with a run folder that the user must act on; the message says how."""


@contextmanager
def _unless_disk_full():
    """Bookkeeping after a stage stopped: on a full disk run.json keeps its previous record
    (written atomically, so whole) and the error that stopped the stage, which already says
    the disk filled, is the one reported."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise


def fingerprint(*parts) -> str:
    """The one fingerprint of hspace: sha256 of the parts as canonical JSON, 16 hex digits.
    A stage's fingerprint is its Prefect cache key and its run.json record; a shard's the
    cache key of its task."""
    import hashlib

    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def example_path(name: str) -> Path:
    """A shipped example config (data/examples/)."""
    return Path(__file__).resolve().parent / "examples" / name


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def replace_folder(tmp: Path, path: Path) -> None:
    """Swap a finished folder ``tmp`` in at ``path``: the previous one is moved aside to
    ``path.old`` and removed only once the new one is in place, so a kill leaves one of them."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- run folder


def require_sampled(meta: dict | RunRecord, what: str) -> None:
    """Refuse commands that replay samples from their seeds on a run of inverted images."""
    record = meta if isinstance(meta, RunRecord) else None
    if record.is_inversion if record else meta.get("config", {}).get("kind") == "inversion":
        raise RunError(
            f"{what} replays generated samples from their seeds, and this run holds inverted real images; "
            "run it on a sampled run (`hspace sample`), using the directions built here"
        )


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def path(self, artifact: str) -> Path:
        """Where ``artifact`` (a key of ARTIFACTS) lives in this run folder."""
        return self.root / ARTIFACTS[artifact][0]

    run_json = property(lambda self: self.path("run_json"))
    run_yaml = property(lambda self: self.path("run_yaml"))
    samples = property(lambda self: self.path("samples"))
    annotations = property(lambda self: self.path("annotations"))
    pca = property(lambda self: self.path("pca"))
    jacobian = property(lambda self: self.path("jacobian"))
    directions = property(lambda self: self.path("directions"))
    eval = property(lambda self: self.path("eval"))
    figures = property(lambda self: self.path("figures"))
    compare = property(lambda self: self.path("compare"))
    latent_svd = property(lambda self: self.path("latent_svd"))
    layers = property(lambda self: self.path("layers"))
    report = property(lambda self: self.path("report"))
    lock_path = property(lambda self: self.root / LOCK)

    def direction(self, name: str) -> Path:
        return self.directions / f"{name}.safetensors"

    def compare_file(self, name: str) -> Path:  # RUN/compare/NAME: the leaderboard, figure and grid
        return self.compare / name

    def figure(self, name: str) -> Path:  # RUN/figures/NAME
        return self.figures / name

    def figure_files(self, pattern: str = "*.png") -> list[Path]:
        return sorted(self.figures.glob(pattern)) if self.figures.exists() else []

    def direction_files(self, pattern: str = "*") -> list[Path]:
        """The direction files whose name matches the glob ``pattern``, sorted."""
        return sorted(self.directions.glob(f"{pattern}.safetensors")) if self.directions.exists() else []

    def relative(self, path: Path | str) -> str:
        """``path`` relative to the run folder, as stage records list outputs."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def exists(self) -> bool:
        return self.run_json.exists()

    def read(self) -> dict:
        """run.json as a dict, parsed once per command (data.record.parsed); RunError where it is missing or damaged."""
        if not self.run_json.exists():
            raise RunError(
                f"{self.root} is not an hspace run (no {RUN_JSON}); create one with `hspace sample --out {self.root}`"
            )
        try:
            meta = parsed(self.run_json.resolve())
        except json.JSONDecodeError as e:
            raise RunError(f"{self.run_json} is not valid JSON ({e}); restore it or start a new run folder") from None
        for key in ("format", "config", "model", "stages"):
            if key not in meta:
                raise RunError(f"{self.run_json} lacks the key {key!r} (edited by hand?); restore it or start anew")
        # run folders written before the stage records were unified kept `hspace run`'s under "pipeline"
        for stage, record in meta.pop("pipeline", {}).items():
            meta["stages"][stage] = {**meta["stages"].get(stage, {}), **record}
        return meta

    def record(self) -> RunRecord:
        """run.json as a typed ``RunRecord`` (RunError, as ``read``, for a missing or damaged one)."""
        meta = self.read()
        try:
            return RunRecord.model_validate(meta)
        except ValidationError as e:
            where = ".".join(str(x) for x in e.errors()[0]["loc"])
            problem = e.errors()[0]["msg"]
            raise RunError(
                f"{self.run_json}: {where}: {problem} (edited by hand?); restore it or start a new run folder"
            ) from None

    def write(self, meta: dict | RunRecord) -> None:
        if isinstance(meta, RunRecord):
            meta = meta.model_dump(mode="json", exclude_unset=True)
        _write_json_atomic(self.run_json, meta)
        forget(self.run_json.resolve())

    def refuse_other_run(self, config: dict, model: dict) -> dict:
        """The run.json of this (existing) folder; RunError if it holds a run with another
        config or other weights than ``config`` and ``model`` (nothing is written)."""
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
        return meta

    def init(self, config: dict, model: dict, versions: dict) -> dict:
        """Create run.json for a new run, or check that an existing one matches ``config``
        and ``model``. Refuses (RunError) to reuse a folder holding another run."""
        if self.exists():
            meta = self.refuse_other_run(config, model)
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

    def has(self, outputs: list[str] | None) -> bool:
        """Whether every output of a stage record (paths relative to the run) exists."""
        return all((self.root / o).exists() for o in outputs or [])

    def set_stage(self, stage: str, **fields) -> None:
        meta = self.read()
        meta["stages"].setdefault(stage, {}).update(fields, updated=_now())
        self.write(meta)

    @contextmanager
    def stage(self, stage: str, restore_on_refusal: bool = True, **fields):
        """Mark a stage running; failed (with the error) if the body raises. A RunError
        (bad input of a single command, refused before any work) puts the stage back as it
        was, unless ``restore_on_refusal`` is off (`hspace run`: a stage that stops midway
        may have rewritten outputs, so it is recorded failed whatever stopped it)."""
        meta = self.read()
        before = meta["stages"].get(stage)
        meta["stages"][stage] = {"state": "running", **fields, "updated": _now()}  # a fresh record
        self.write(meta)
        try:
            yield
        except RunError as e:
            with _unless_disk_full():
                if not restore_on_refusal:
                    self.set_stage(stage, state="failed", error=str(e)[:500])
                    raise
                meta = self.read()
                if before is None:
                    meta["stages"].pop(stage, None)
                else:
                    meta["stages"][stage] = before
                self.write(meta)
            raise
        except BaseException as e:
            with _unless_disk_full():
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
        created = not self.root.exists()
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
            if created and not any(self.root.iterdir()):  # refused before writing anything: leave no trace
                self.root.rmdir()

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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts)."""
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
    return _same_host(holder) and not pid_alive(int(holder.get("pid", -1)))


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
