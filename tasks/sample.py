"""Sampling tasks: prepare samples.zarr, then one cached task per shard (= sampling batch).

A shard task replays its samples from their own seeds, buffers h for all timesteps and writes the
shard whole, then marks it done (data.catalog). The done marker is the truth and the only cache: a
Prefect cache hit would not know whether its files still exist, so shard tasks cache nothing.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from hspace.data import models
from hspace.data.catalog import RunError, RunFolder
from hspace.data.disk import DISK_FULL, disk_full_message, pending_sample_bytes, require_space, sample_bytes
from hspace.data.stores import XT, SampleLayout, SampleStore
from hspace.tasks.stages import Context, Stage, outputs

log = logging.getLogger(__name__)


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
def cached_model(path: str, fingerprint: str, device: str, dtype: str, clip_sample: bool | None = None):
    import torch

    ref = models.ModelRef(path, path, None, fingerprint)
    return models.load_checked(ref, device, getattr(torch, dtype), clip_sample)  # never mixes models


TEXT_KEYS = ("prompts", "negative_prompt", "guidance_scale", "edit_branch", "image_size")


@functools.lru_cache(maxsize=2)
def _cached_text(ref: models.ModelRef, settings: str, device: str):
    import json

    return models.text_for(ref, json.loads(settings), device)


def run_text(meta: dict):
    """The run's text setup (None for a pixel model), cached per process, keyed on model and text."""
    import json

    if models.model_kind(meta) == "pixel":
        return None
    settings = {k: meta["config"][k] for k in TEXT_KEYS if k in meta["config"]}
    return _cached_text(models.ref_of(meta), json.dumps(settings, sort_keys=True), _device(meta))


def run_model(meta: dict):
    """(unet, scheduler) of a run as its shards sample: cached per process (a Dask worker
    loads it once), in the run's dtype, clipping P_t as the run says."""
    cfg = meta["config"]
    return cached_model(
        meta["model"]["path"], meta["model"]["fingerprint"], _device(meta), cfg["dtype"], cfg.get("clip_sample")
    )


def _device(meta: dict) -> str:
    return meta.get("runtime", {}).get("device", "cpu")


def init_run(run: RunFolder, config: dict, ref, scheduler, device: str) -> dict:
    """Create or re-check run.json (RunFolder.init) for ``config`` and model ``ref``, and
    record the device, which may change on resume and is not part of the config."""
    from hspace.data.directions import scheduler_name
    from hspace.data.stores import package_versions

    meta = run.init(config, {**ref.to_dict(), "scheduler": scheduler_name(scheduler)}, package_versions())
    meta["runtime"] = {"device": device}
    run.write(meta)
    return meta


def prepare_store(run: RunFolder) -> SampleStore:
    """Open samples.zarr, creating it (all arrays allocated up front) on first use. An
    inverted run (config kind 'inversion') stores seeds -1 (no generator), x_T and
    recon_mse beside h and x0 (= the input images)."""
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
    unet, scheduler = run_model(meta)
    from hspace.data.points import h_array
    from hspace.hcore.hooks import h_shape
    from hspace.hcore.sampler import sample_seed, sampling_timesteps

    size = unet.config.sample_size
    latent_shape = (unet.config.in_channels, size, size)  # x_T, and an inversion's noise maps
    inverted = cfg.get("kind") == "inversion"  # x0 holds the input images
    image_shape = latent_shape if inverted else (unet.config.out_channels, size, size)
    text = models.model_kind(meta) != "pixel"
    if text:  # a latent model stores its decoded images
        image_shape = (3, cfg["image_size"], cfg["image_size"])
    layout = SampleLayout(cfg["n"], cfg["steps"], h_shape(unet, cfg["h_point"]), image_shape, cfg["batch_size"])
    extra = {"prompt_index": ((), "int32")} if text else {}  # sample i's prompt: prompts[i mod len]
    for point in cfg.get("h_points") or []:  # h at more points, side by side (data/points.py)
        extra[h_array(point)] = ((cfg["steps"], *h_shape(unet, point)), "float16")
    if cfg.get("store_xt"):  # x_t of every step, before its U-Net pass (the latent; a DDPM's pixels)
        extra[XT] = ((cfg["steps"], *latent_shape), "float16")
    seeds = np.array([sample_seed(cfg["seed"], i) for i in range(cfg["n"])], dtype=np.int64)
    if inverted:
        extra |= {"xT": (latent_shape, "float32"), "recon_mse": ((), "float32")}
        if cfg.get("method", "ddim") == "ddpm":  # the noise maps z_{T:1} every replay adds
            extra["noise_maps"] = ((cfg["steps"], *latent_shape), "float32")
        else:
            seeds = np.full(cfg["n"], -1)  # DDIM inversion draws nothing
        if text:
            extra["vae_mse"] = ((), "float32")
    timesteps = np.array(sampling_timesteps(unet, scheduler, cfg["steps"]), dtype=np.int64)
    return SampleStore.create(run.samples, layout, seeds, timesteps, extra or None)


def open_shard(run_dir: str, shard: int):
    """What a shard task needs: (the run record, store, rows, unet, scheduler), or None when
    the shard is already done (its marker, not Prefect's cache, is the truth). run.json is
    read once here and handed down."""
    run = RunFolder(Path(run_dir))
    meta = run.read()
    store = SampleStore(run.samples, mode="r+")
    if store.done[shard] == 1:
        return None
    unet, scheduler = run_model(meta)
    return meta, store, store.layout.shard_rows(shard), unet, scheduler


def run_shard(run_dir: str, shard: int) -> dict:
    """Sample shard ``shard`` of a run and write it; a no-op when it is already done."""
    import torch

    from hspace.data.points import extra_points, h_array
    from hspace.hcore.hooks import capture_points
    from hspace.hcore.latent_svd import XtRecorder
    from hspace.hcore.sampler import to_uint8

    opened = open_shard(run_dir, shard)
    if opened is None:
        return {"shard": shard, "recomputed": False}
    meta, store, rows, unet, scheduler = opened
    replay = models.replay_for_run(meta, run_text(meta))
    text, steps = replay.text, replay.steps
    h = np.empty((len(rows), steps, *store.layout.h_shape), np.float16)
    bad: list[str] = []

    def on_step(step: int, t: int, h_t: torch.Tensor) -> None:
        h16 = h_t.detach().to("cpu", torch.float16).numpy()
        if not np.isfinite(h16).all():
            i = int(np.flatnonzero(~np.isfinite(h16).reshape(len(rows), -1).all(1))[0])
            bad.append(f"h of sample {rows[i]} at step {step} (t={t}) is NaN/Inf")
        h[:, step] = h16

    xt = np.empty((len(rows), steps, *store.group[XT].shape[2:]), np.float16) if XT in store.group else None
    how = {"edit": XtRecorder.into(xt)} if xt is not None else {}  # x_t of every step (sample.store_xt)
    with capture_points(unet, extra_points(meta), text is not None and text.guided) as more:  # sample.h_points
        x0 = replay.render(unet, scheduler, rows, on_step=on_step, **how)
    if not torch.isfinite(x0).all():
        i = int((~torch.isfinite(x0)).flatten(1).any(1).nonzero()[0])
        bad.append(f"x0 of sample {rows[i]} is NaN/Inf")
    if bad:
        raise RunError(f"shard {shard} not written: {bad[0]} (fp16 overflow? try --dtype float32)")
    extra = {"prompt_index": np.array([i % len(text.prompts) for i in rows], np.int32)} if text else {}
    if xt is not None:
        extra[XT] = xt
    extra |= {h_array(p): np.stack(per_step, 1) for p, per_step in more.items()}
    store.write_shard(shard, h, to_uint8(x0).cpu().numpy(), extra or None)
    return {"shard": shard, "recomputed": True, "rows": [rows.start, rows.stop]}


def _disk_safe(run_one):
    """``run_one(run_dir, shard)`` where a disk that fills while it writes comes back as
    ``{"error": one line}``, not as a failed Prefect task (whose logs would repeat the cause):
    the shard stays pending."""

    @functools.wraps(run_one)
    def one(run_dir: str, shard: int) -> dict:
        try:
            return run_one(run_dir, shard)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            return {"shard": shard, "error": disk_full_message(e, Path(run_dir), f"writing shard {shard}")}

    return one


@functools.cache
def shard_task(run_one=None):
    """One batch, ``run_one(run_dir, shard)`` (``run_shard`` by default; inversion brings its
    own), as a Prefect task: recorded (state, timing) with no cache key; made on first use so
    that declaring the stage does not import Prefect. Its done marker says whether it must run."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    named = task(name="shard", cache_policy=NO_CACHE, persist_result=False, task_run_name="shard-{shard}")
    return named(_disk_safe(run_one or run_shard))


def _on_dask(run_dir: str, pending: list[int], address: str, store, bar, job) -> list[int]:
    """Pending shards as tasks on an existing Dask cluster (the run folder must be on a
    path every worker sees); each worker loads the model once and writes whole shards,
    one file per shard, so workers never write the same file."""
    from dask.distributed import as_completed

    from hspace.tasks.pca import dask_client

    client = dask_client(0, address)
    try:
        futures = [client.submit(run_shard, run_dir, k, key=f"hspace-shard-{k}-{run_dir}", pure=False) for k in pending]
        done = []
        for future in as_completed(futures):
            try:
                result = future.result()
            except OSError as e:
                if e.errno not in DISK_FULL:
                    raise
                client.cancel(futures)
                raise RunError(disk_full_message(e, Path(run_dir), "a Dask worker wrote a shard")) from None
            done.append(result["shard"])
            bar.advance(job, len(store.layout.shard_rows(result["shard"])))
        return sorted(done)
    finally:
        client.close()


def run_shards(run: RunFolder, ctx: Context, run_one=None) -> list[int]:
    """Every pending shard of the run, one Prefect task each running ``run_one(run_dir, shard)``
    (``run_shard``: sampling; the invert stage passes its own), or on the Dask cluster at
    ``ctx.dask_address``; returns the shards computed. Only pending shards run: a shard's done
    marker says whether its files exist."""
    store = prepare_store(run)
    pending = set(store.pending_shards())
    inverting = run.read()["config"].get("kind") == "inversion"
    what = f"{'inverting' if inverting else 'sampling'} {len(pending)} pending shard(s)"
    require_space(run.samples, store.pending_bytes(), what)  # before the first one starts
    rows = lambda k: len(store.layout.shard_rows(k))  # noqa: E731
    dask_address = ctx.dask_address
    with ctx.progress() as bar:
        job = bar.add_task("inverting" if inverting else "sampling", total=store.layout.n, rate="")
        bar.advance(job, sum(rows(k) for k in range(store.layout.n_shards) if k not in pending))
        if dask_address and not inverting:
            return _on_dask(str(run.root), sorted(pending), dask_address, store, bar, job)
        done_new, computed = 0, []
        for k in sorted(pending):
            result = shard_task(run_one)(str(run.root), k)
            if "error" in result:
                raise RunError(result["error"])
            computed.append(k)
            done_new += rows(k)
            elapsed = bar.get_time() - bar.tasks[job].start_time
            bar.update(job, rate=f"{done_new / max(elapsed, 1e-9):.2f} samples/s")
            bar.advance(job, rows(k))
    return computed


def create_run(run: RunFolder, section, device: str, allow_download=False, extra=None, dry=False) -> dict | None:
    """Resolve and check the model of a sample or invert section, then create (or re-check)
    the run folder's run.json: its config is the section without the model, plus
    ``extra(unet, ref)`` (checks that need the model run there, before anything is written).
    ``dry``: the checks only (the CLI runs them before it locks or starts Prefect)."""
    from hspace.hcore.hooks import HPointError, NoMidBlockError, h_shape
    from hspace.tasks.config_fields import flow_eta_problem, resolve_clip, resolve_eta

    ref = models.resolve(section.model, allow_download=allow_download)
    unet, scheduler = models.load(ref)
    points = list(getattr(section, "h_points", None) or [])
    try:
        for point in [getattr(section, "h_point", "output"), *points]:
            h_shape(unet, point)
    except (NoMidBlockError, HPointError) as e:
        raise RunError(str(e)) from None
    if len(set(points)) != len(points) or getattr(section, "h_point", None) in points:
        raise RunError(f"--h-points {','.join(points)}: each point once, and not the run's --h-point again")
    train_steps = scheduler.config.num_train_timesteps
    if section.steps > train_steps:
        raise RunError(f"--steps {section.steps} exceeds the model's {train_steps} training timesteps")
    more = extra(unet, ref) if extra else {}
    if problem := flow_eta_problem(scheduler, getattr(section, "eta", 0), section.steps):  # SD3, FLUX
        raise RunError(f"--eta: {problem}")
    keys = ("n", "steps", "eta", "seed", "batch_size", "h_point", "h_points", "dtype")
    config = {k: getattr(section, k) for k in keys if hasattr(section, k)} | more
    config |= text_config(section, ref, unet)
    config["eta"] = resolve_eta(config["eta"], section.steps)
    config["clip_sample"] = resolve_clip(section.clip_sample, scheduler)
    if getattr(section, "store_xt", False):  # recorded only when on: older run.json files stay equal
        config["store_xt"] = True
    if dry:  # a folder holding another run is refused here too, before the lock and Prefect
        if run.exists():
            from hspace.data.directions import scheduler_name

            run.refuse_other_run(config, {**ref.to_dict(), "scheduler": scheduler_name(scheduler)})
        what = f"{'inverting' if config.get('kind') == 'inversion' else 'sampling'} {config['n']} samples"
        require_space(run.root, _bytes_to_write(run, config, unet), what)
        return None
    return init_run(run, config, ref, scheduler, device)


def _bytes_to_write(run: RunFolder, config: dict, unet) -> int:
    """The sample store's bytes still to write: its pending shards, or h and x0 of every sample
    of a new run (the plan's count; run_shards checks the exact figure again)."""
    from hspace.hcore.hooks import h_shape

    left = pending_sample_bytes(run)
    if left is not None:
        return left
    size = config.get("image_size") or unet.config.sample_size
    channels = 3 if config.get("image_size") else unet.config.out_channels
    h = h_shape(unet, config.get("h_point", "output"))
    per_sample = sum(sample_bytes(config["steps"], h, (channels, size, size)))
    if config.get("kind") == "inversion":  # x_T, and a DDPM inversion's noise maps, in float32
        latent = unet.config.in_channels * unet.config.sample_size**2 * 4
        per_sample += latent * (1 + config["steps"] * (config.get("method") == "ddpm"))
    if config.get("store_xt"):  # x_t of every step in float16
        per_sample += config["steps"] * unet.config.in_channels * unet.config.sample_size**2 * 2
    return config["n"] * per_sample


# ----------------------------------------------------------------------------- the stage


def _create(run: RunFolder, sample, ctx: Context, dry: bool = False):
    return create_run(run, sample, ctx.device, ctx.allow_download, dry=dry)


def sample_stage(run: RunFolder, sample, ctx: Context) -> dict:
    computed = run_shards(run, ctx)
    return {"outputs": outputs(run, [run.samples]), "recomputed_shards": len(computed), "n": sample.n}


STAGE = Stage(
    "sample",
    sections=("sample",),
    inputs=(),
    outputs=("samples",),
    body=sample_stage,
    summary=lambda r: f"{r['recomputed_shards']} shards computed",
    create=_create,
    out_default="runs/toy",
    runtime=("dask_address", "allow_download"),
    cost=lambda cfg: cfg.sample.n * cfg.sample.steps,
    doc="Mass-sample a model (paper sec. 3), storing h at every step, x0 and seeds in OUT/samples.zarr.",
)


def text_config(section, ref, unet) -> dict:
    """What a text-conditioned run records about its text (prompts, negative prompt,
    guidance, edit branch, image size); RunError where the prompts do not fit the model."""
    given = section.prompt_list() if hasattr(section, "prompt_list") else None
    if ref.kind == "pixel":
        if given is not None:
            raise RunError(f"--prompt/--prompts: {ref.id} takes no text (an unconditional pixel model); drop them")
        return {}
    if given is None and hasattr(section, "default_prompts"):
        given = section.default_prompts()
    if given is None:
        raise RunError(
            f"{ref.id} is text-conditioned ({ref.kind}): give --prompt TEXT or --prompts A,B,... (sample i gets "
            "prompt i mod len); --prompt '' samples the unconditional model on purpose"
        )
    return {
        "prompts": given,
        "negative_prompt": getattr(section, "negative_prompt", None),
        "guidance_scale": section.guidance_scale,
        "edit_branch": getattr(section, "edit_branch", "both"),
        "image_size": models.image_size(ref, unet.config),
    }
