"""Run folders seen from outside: listing (`hspace list`), one-word states, pruning
(`hspace schedule --keep`), and verification (`hspace verify`). Reads run.json, locks and
summaries through the catalog; no torch, no Prefect."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from hspace.data.catalog import ARTIFACTS, RUN_JSON, RunError, RunFolder, _is_stale
from hspace.data.eval_folder import TABLES, EvalFolder, leakage_change
from hspace.data.stores import SampleStore


def run_state(root: Path) -> str:
    """What a run folder is now, in one word: 'running' (its lock is held by a live process
    or by another host, whose liveness cannot be checked), 'complete' (every stage done),
    'failed' (a stage failed, or its writer died in it) or 'incomplete' (not started,
    stopped between stages, or unreadable). ``run_summary`` has the details."""
    state = run_summary(Path(root))["state"]
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


def run_summary(path: Path) -> dict:
    """One line of `hspace list`: name, model, created, n, steps, every stage's state
    (done, failed, running with its lock owner, pending) and the headline leakage numbers
    of eval/summary.json. Reads run.json, the lock and summary.json only: no Zarr, no Prefect."""
    run = RunFolder(Path(path))
    entry: dict = {"path": str(run.root), "name": run.root.name}
    try:
        record = run.record()
    except RunError as e:
        return {**entry, "state": "unreadable", "error": str(e), "stages": {}}
    cfg, model = record.config, record.model
    entry.update(
        model=model.id,
        fingerprint=(model.fingerprint or "")[:12],
        created=record.created,
        n=cfg.get("n"),
        steps=cfg.get("steps"),
        dtype=cfg.get("dtype"),
    )
    holder = run.lock_holder()
    live = holder is not None and not _is_stale(holder)  # another host's lock counts as live
    owner = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else None
    records, pipeline = record.stages, record.is_pipeline
    stages = {}
    for name in record.expected_stages():
        state = records[name].state if name in records else "pending"
        if state == "running":
            state = f"running ({owner})" if live else "failed (its process died)"
        stages[name] = state
    entry["stages"] = stages
    if live:
        entry["state"] = f"running ({owner})"
    elif any(v.startswith("failed") for v in stages.values()):
        entry["state"] = "failed"
    elif stages and all(v == "done" for v in stages.values()) and (not pipeline or run.report.exists()):
        entry["state"] = "complete"
    else:
        entry["state"] = "incomplete"
    try:
        summary = EvalFolder(run.eval).summary() or {}
        entry["leakage"] = {
            "offdiagonal": summary["original"].get("mean_offdiagonal"),
            "diagonal": summary["original"].get("mean_diagonal"),
        } | {label: leakage_change(summary, label) for label in TABLES[1:]}
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


def verify_run(run: RunFolder, fix: bool = False, declared: dict[str, list[str]] | None = None) -> list[dict]:
    """Read every chunk of a run back (crc32c checks each one) and check the markers.
    Returns problems as {what, detail, remedy}. fix=True marks damaged sample shards as
    pending, so that `hspace sample` recomputes exactly those."""
    problems = []
    try:
        record = run.record()
    except RunError as e:
        return [{"what": "run.json", "detail": str(e), "remedy": "restore run.json or start a new run folder"}]
    for stage, paths in declared_outputs(run, declared or {}).items():  # a done stage whose output is gone
        rec = record.stages.get(stage)
        for path, exists in paths.items():
            if rec is not None and rec.state == "done" and not (rec.model_extra or {}).get("skipped") and not exists:
                problems.append(
                    {
                        "what": path,
                        "detail": f"missing, though stage {stage} is recorded done",
                        "remedy": f"rerun `hspace {stage} {run.root}` (or `hspace run`, which redoes it)",
                    }
                )
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
    for artifact, remedy in (
        ("annotations", "delete it and rerun hspace annotate"),
        ("pca", "rerun hspace pca"),
        ("jacobian", "rerun hspace jacobian"),
    ):
        path, name = run.path(artifact), run.path(artifact).name
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


def _du(path: Path) -> int | None:
    if not path.exists():
        return None
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def declared_outputs(run: RunFolder, declared: dict[str, list[str]]) -> dict[str, dict[str, bool]]:
    """Each stage's declared outputs (catalog artifacts) -> whether that path exists."""
    return {stage: {ARTIFACTS[a][0]: run.path(a).exists() for a in arts} for stage, arts in declared.items()}


def inspect_run(run: RunFolder, declared: dict[str, list[str]] | None = None) -> dict:
    """What `hspace inspect` shows: config, model, stage records (each output with its size
    on disk), each stage's declared outputs (``declared``: stage -> catalog artifacts, from
    the stage registry) and whether they exist, every Zarr array of the catalog's stores
    (shape, dtype, chunks, shards, bytes) and the sample shards' states. Reads metadata
    only: no torch, no Prefect."""
    meta = run.read()
    report = {
        "run": str(run.root),
        "config": meta["config"],
        "model": meta["model"],
        "stages": meta["stages"],
        "versions": meta.get("versions", {}),
        "arrays": [],
        "lock": run.lock_holder(),
        "errors": [],
        "declared": declared_outputs(run, declared or {}),
    }
    for record in report["stages"].values():
        record["output_bytes"] = {o: _du(run.root / o) for o in record.get("outputs", [])}
    for artifact in ("samples", "annotations", "pca", "jacobian"):
        path = run.path(artifact)
        if not path.exists():
            continue
        try:
            arrays = sorted(_walk_arrays(zarr.open_group(path, mode="r")))
        except (ValueError, KeyError, OSError) as e:
            report["errors"].append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
            continue
        for name, arr in arrays:
            report["arrays"].append(
                {
                    "store": path.name,
                    "name": name,
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "chunks": list(arr.chunks),
                    "shards": list(arr.shards) if arr.shards else None,
                    "bytes_on_disk": _du(path / name),
                    "bytes_raw": int(arr.nbytes),
                }
            )
    if run.samples.exists():
        try:
            store = SampleStore(run.samples)
            pending = store.pending_shards()
            n_shards = store.layout.n_shards
            report["shards"] = {"total": n_shards, "done": n_shards - len(pending), "pending": pending}
        except RunError as e:
            report["shards"] = {"error": str(e)}
    return report
