"""Sampling throughput: (a) a bare batched scheduler + UNet loop, (b) hspace's sample flow
(capture + whole-shard Zarr writes + one Prefect task per shard), (c) a batch-1 loop like
the seed paper's code. Prints samples/s, b/a (target >= 0.95), b/c, bytes on disk per
sample and the compression ratio. All three in one process, one after the other.

    python tests/benchmarks/bench_sample.py [--model toy] [--n 128] [--batch-size 32] [--steps 20]
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

from hspace.data import models  # noqa: E402


def bare_loop(unet, scheduler, n, batch, steps) -> float:
    from hspace.hcore.sampler import ddim_scheduler

    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    size = unet.config.sample_size
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n, batch):
            x = torch.randn(min(batch, n - start), 3, size, size)
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n-batch1", type=int, default=8, help="samples for the batch-1 loop (slow)")
    args = ap.parse_args()

    ref = models.resolve(args.model)
    unet, scheduler = models.load(ref)
    print(
        f"model {args.model}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"n={args.n} batch={args.batch_size} steps={args.steps}, torch threads={torch.get_num_threads()}"
    )
    bare_loop(unet, scheduler, args.batch_size, args.batch_size, 2)  # warm-up
    a = bare_loop(unet, scheduler, args.n, args.batch_size, args.steps)
    c = bare_loop(unet, scheduler, args.n_batch1, 1, args.steps)

    from prefect.testing.utilities import prefect_test_harness

    from hspace.data.catalog import RunFolder
    from hspace.data.stores import SampleStore
    from hspace.tasks.config import SampleSection
    from hspace.tasks.sample import create_run, run_shards
    from hspace.tasks.stages import Context

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        run = RunFolder(Path(tmp) / "run")
        section = SampleSection(model=ref.path, n=args.n, steps=args.steps, batch_size=args.batch_size, dtype="float32")
        create_run(run, section, "cpu")  # as `hspace sample` makes it
        t0 = time.perf_counter()
        run_shards(run, Context(show_progress=False))
        b = args.n / (time.perf_counter() - t0)
        store = SampleStore(run.samples)
        on_disk = sum(p.stat().st_size for p in run.samples.rglob("*") if p.is_file())
        raw = store.h.nbytes + store.x0.nbytes + store.seeds.nbytes
    print(f"(a) bare batched loop      {a:8.2f} samples/s")
    print(f"(b) hspace sample flow     {b:8.2f} samples/s   (capture + Zarr + Prefect tasks; server start excluded)")
    print(f"(c) batch-1 loop           {c:8.2f} samples/s")
    print(f"b/a = {b / a:.3f}   (target >= 0.95)")
    print(f"b/c = {b / c:.2f}")
    print(
        f"bytes on disk per sample: {on_disk / args.n:,.0f}   raw: {raw / args.n:,.0f}   "
        f"compression ratio (raw/disk): {raw / on_disk:.3f}"
    )


if __name__ == "__main__":
    main()
