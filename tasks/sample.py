"""Sampling tasks: prepare samples.zarr, then one cached task per shard (= sampling batch).

A shard task replays its samples from their own seeds, buffers h for all timesteps and
writes the shard whole, then marks it done (data.catalog). The done marker is the truth:
the flow re-runs every pending shard with ``refresh_cache=True``, because a Prefect cache
hit does not know whether the files it stands for still exist (STACK_NOTES.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from data import models
from data.catalog import RunError, RunFolder, SampleLayout, SampleStore

log = logging.getLogger(__name__)

# Bump when the sampling maths or the stored layout changes: it is part of the cache key.
SAMPLE_CODE_VERSION = "sample-1"
SAMPLE_CONFIG_KEYS = ("n", "steps", "eta", "seed", "batch_size", "h_point", "dtype")


def shard_fingerprint(meta: dict) -> str:
    """Cache key of a run's shards: model fingerprint + sampling config + code version."""
    cfg = {k: meta["config"][k] for k in SAMPLE_CONFIG_KEYS}
    blob = json.dumps([meta["model"]["fingerprint"], cfg, SAMPLE_CODE_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RunError(f"--device {device!r} is not a device torch knows (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunError(f"--device {device}: torch sees only {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise RunError(f"--device {device!r}: hspace runs on cpu or cuda")
    return device


@functools.lru_cache(maxsize=2)
def cached_model(path: str, fingerprint: str, device: str, dtype: str):
    import torch

    model = {"id": path, "path": path, "revision": None, "fingerprint": fingerprint}
    return models.load_for_run({"model": model}, device=device, dtype=getattr(torch, dtype))  # never mixes models


def _device(meta: dict) -> str:
    return meta.get("runtime", {}).get("device", "cpu")


def init_run(run: RunFolder, config: dict, ref, scheduler, device: str) -> dict:
    """Create or re-check run.json (RunFolder.init) for ``config`` and model ``ref``, and
    record the device, which may change on resume and is not part of the config."""
    from data.catalog import package_versions
    from data.directions import scheduler_name

    meta = run.init(config, {**ref.to_dict(), "scheduler": scheduler_name(scheduler)}, package_versions())
    meta["runtime"] = {"device": device}
    run.write(meta)
    return meta


def prepare_store(run: RunFolder) -> SampleStore:
    """Open samples.zarr, creating it (all arrays allocated up front) on first use."""
    meta = run.read()
    cfg = meta["config"]
    if run.samples.exists():
        store = SampleStore(run.samples, mode="r+")
        have = {"n": store.layout.n, "steps": store.layout.steps, "batch_size": store.layout.batch_size}
        diffs = [f"{k}: run.json {cfg[k]} != samples.zarr {v}" for k, v in have.items() if cfg[k] != v]
        if diffs:
            raise RunError(
                f"{run.run_json} does not match {run.samples} ({'; '.join(diffs)}): run.json was edited by hand? "
                "restore it, or sample into a new --out"
            )
        return store
    unet, scheduler = cached_model(meta["model"]["path"], meta["model"]["fingerprint"], _device(meta), cfg["dtype"])
    from hcore.hspace import h_shape
    from hcore.sampler import ddim_scheduler, sample_seed

    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(cfg["steps"])
    size = unet.config.sample_size
    layout = SampleLayout(
        n=cfg["n"],
        steps=cfg["steps"],
        h_shape=h_shape(unet),  # a mid block keeps its input's shape
        image_shape=(unet.config.out_channels, size, size),
        batch_size=cfg["batch_size"],
    )
    seeds = np.array([sample_seed(cfg["seed"], i) for i in range(cfg["n"])], dtype=np.int64)
    return SampleStore.create(run.samples, layout, seeds, sched.timesteps.numpy())


def open_shard(run_dir: str, shard: int):
    """What a shard task needs: (cfg, store, rows, unet, scheduler), or None when the
    shard is already done (its marker, not Prefect's cache, is the truth)."""
    run = RunFolder(Path(run_dir))
    meta = run.read()
    cfg = meta["config"]
    store = SampleStore(run.samples, mode="r+")
    if store.done[shard] == 1:
        return None
    unet, scheduler = cached_model(meta["model"]["path"], meta["model"]["fingerprint"], _device(meta), cfg["dtype"])
    return cfg, store, store.layout.shard_rows(shard), unet, scheduler


def run_shard(run_dir: str, shard: int) -> dict:
    """Sample shard ``shard`` of a run and write it; a no-op when it is already done."""
    import torch

    from hcore.sampler import make_generators, sample, to_uint8

    opened = open_shard(run_dir, shard)
    if opened is None:
        return {"shard": shard, "recomputed": False}
    cfg, store, rows, unet, scheduler = opened
    steps = cfg["steps"]
    h = np.empty((len(rows), steps, *store.layout.h_shape), np.float16)
    bad: list[str] = []

    def on_step(step: int, t: int, h_t: torch.Tensor) -> None:
        h16 = h_t.detach().to("cpu", torch.float16).numpy()
        if not np.isfinite(h16).all():
            i = int(np.flatnonzero(~np.isfinite(h16).reshape(len(rows), -1).all(1))[0])
            bad.append(f"h of sample {rows[i]} at step {step} (t={t}) is NaN/Inf")
        h[:, step] = h16

    x0 = sample(
        unet, scheduler, make_generators(cfg["seed"], rows), steps, cfg["eta"], on_step=on_step, h_point=cfg["h_point"]
    )
    if not torch.isfinite(x0).all():
        i = int((~torch.isfinite(x0)).flatten(1).any(1).nonzero()[0])
        bad.append(f"x0 of sample {rows[i]} is NaN/Inf")
    if bad:
        raise RunError(f"shard {shard} not written: {bad[0]} (fp16 overflow? try --dtype float32)")
    store.write_shard(shard, h, to_uint8(x0).cpu().numpy())
    return {"shard": shard, "recomputed": True, "rows": [rows.start, rows.stop]}


@task(name="sample-shard", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, task_run_name="sample-shard-{shard}")
def sample_shard(run_dir: str, shard: int, fingerprint: str) -> dict:
    """One sampling batch. ``fingerprint`` (shard_fingerprint) makes the cache key cover
    the model, the sampling config and the code version."""
    return run_shard(run_dir, shard)


@task(name="prepare-samples")
def prepare_samples(run_dir: str) -> dict:
    store = prepare_store(RunFolder(Path(run_dir)))
    return {"n_shards": store.layout.n_shards, "pending": store.pending_shards()}
