"""GPU benchmark on the real model's architecture: google/ddpm-ema-celebahq-256's UNet (six
levels, attention at 16x16 and in the mid block, h = 512x8x8, D = 32,768, 114 M parameters)
with random weights, in float16, 50 DDIM steps. Prints, in one run:

- samples/s of (a) a bare batched scheduler + UNet loop, (b) `hspace sample` (the sample
  flow: h capture + whole-shard Zarr writes + one Prefect task per shard; server start-up
  excluded), (c) a batch-1 loop like the paper's official code; b/a (target >= 0.95) and
  b/c (target >= 10);
- peak GPU memory of each, bytes per sample on disk;
- the PCA stage (randomized engine) on what (b) sampled, D = 32,768;
- one Jacobian iteration (Alg. 1: K JVPs + K VJPs + SVD) for K = 1 and K = 8.

Sized to finish within 8 minutes on one H100 (defaults). Needs a CUDA GPU and says so
otherwise; ``--small`` runs the same code on a channel-cut model on the CPU, to check the
script, not to measure anything.

    python tests/benchmarks/bench_gpu.py [--n 256] [--batch-size 64] [--steps 50] [--n-batch1 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

from hspace.data.models import CELEBAHQ_256_UNET  # noqa: E402


def save_model(folder: Path, small: bool) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    config = dict(CELEBAHQ_256_UNET)
    if small:  # the CPU dry run: same layout, channels / 32, 64x64
        config.update(sample_size=64, block_out_channels=(4, 4, 8, 8, 16, 16), norm_num_groups=4)
    torch.manual_seed(0)
    UNet2DModel(**config).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(
        folder / "scheduler"
    )
    return folder


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def bare_loop(unet, scheduler, n: int, batch: int, steps: int, device: str) -> float:
    """(a)/(c): diffusers' DDIM step on the UNet, nothing stored."""
    from hspace.hcore.sampler import ddim_scheduler

    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    size, dtype = unet.config.sample_size, next(unet.parameters()).dtype
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n, batch):
            x = torch.randn(min(batch, n - start), 3, size, size, device=device)
            for t in sched.timesteps:
                x = sched.step(unet(x.to(dtype), t).sample.float(), t, x).prev_sample
    sync(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--n-batch1", type=int, default=8, help="samples for the batch-1 loop")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--small", action="store_true", help="CPU dry run on a channel-cut model (checks the script)")
    args = ap.parse_args()
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA GPU; this benchmark measures one (use --small for a CPU dry run)")

    from prefect.testing.utilities import prefect_test_harness

    from hspace.data import models
    from hspace.data.catalog import RunFolder
    from hspace.data.stores import SampleStore
    from hspace.hcore import jacobian as jac
    from hspace.hcore.sampler import ddim_scheduler, make_generators, sample
    from hspace.tasks.config import SampleSection
    from hspace.tasks.pca import run_pca
    from hspace.tasks.sample import create_run, run_shards
    from hspace.tasks.stages import Context

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (--small dry run: not a measurement)"
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        tmp = Path(tmp)
        ref = models.resolve(str(save_model(tmp / "model", args.small)))
        unet, scheduler = models.load(ref, device=device, dtype=getattr(torch, args.dtype))
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        print(f"device: {name}; UNet {params:.1f} M parameters, {args.dtype}, {args.steps} steps, n={args.n}")

        bare_loop(unet, scheduler, args.batch_size, args.batch_size, 2, device)  # warm-up (cudnn autotune)
        peak_reset(device)
        a = bare_loop(unet, scheduler, args.n, args.batch_size, args.steps, device)
        peak_a = peak_gib(device)
        c = bare_loop(unet, scheduler, args.n_batch1, 1, args.steps, device)

        run = RunFolder(tmp / "run")
        section = SampleSection(
            model=ref.path, n=args.n, steps=args.steps, batch_size=args.batch_size, dtype=args.dtype
        )
        create_run(run, section, device)  # as `hspace sample` makes it
        del unet
        peak_reset(device)
        t0 = time.perf_counter()
        run_shards(run, Context(show_progress=False))
        b = args.n / (time.perf_counter() - t0)
        peak_b = peak_gib(device)
        store = SampleStore(run.samples)
        on_disk = sum(p.stat().st_size for p in run.samples.rglob("*") if p.is_file())

        print(f"(a) bare batched loop   {a:8.2f} samples/s   peak GPU memory {peak_a:.2f} GiB")
        print(f"(b) hspace sample       {b:8.2f} samples/s   peak GPU memory {peak_b:.2f} GiB (model load included)")
        print(f"(c) batch-1 loop        {c:8.2f} samples/s")
        print(f"b/a = {b / a:.3f} (target >= 0.95)   b/c = {b / c:.1f} (target >= 10)")
        print(f"on disk: {on_disk / args.n / 2**20:.2f} MiB per sample (h {tuple(store.h.shape[1:])} float16 + x0)")

        k = min(10, args.n - 1)
        t0 = time.perf_counter()
        run_pca(str(run.root), k, method="randomized", workers=1)
        print(
            f"PCA stage (randomized, D = {store.h.shape[2] * store.h.shape[3] * store.h.shape[4]:,}, "
            f"{args.steps} timesteps, n = {args.n}, K = {k}): {time.perf_counter() - t0:.1f} s"
        )

        unet, scheduler = models.load_for_run(run.read(), device=device)
        step = args.steps // 2
        x_t = sample(unet, scheduler, make_generators(0, [0]), args.steps, stop_before=step)[0]
        sched = ddim_scheduler(scheduler)
        sched.set_timesteps(args.steps)
        t = int(sched.timesteps[step])
        h0 = jac.h_at(unet, x_t, t)
        f = jac.eps_of_h(unet, x_t, t)
        import warnings

        for k in (1, 8):
            warnings.simplefilter("ignore", RuntimeWarning)  # max_iters is the point here
            jac.subspace_iteration(f, h0, k, tol=0, max_iters=1)  # warm-up
            peak_reset(device)
            sync(device)
            t0 = time.perf_counter()
            jac.subspace_iteration(f, h0, k, tol=0, max_iters=3)
            sync(device)
            per_iter = (time.perf_counter() - t0) / 3
            print(
                f"Jacobian Alg. 1, K = {k}: {per_iter:.3f} s per iteration (3 iterations + the final J V), "
                f"peak GPU memory {peak_gib(device):.2f} GiB"
            )


if __name__ == "__main__":
    main()
