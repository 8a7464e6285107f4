"""Crash-and-resume torture test for `hspace sample` and `hspace run` (reliability).

Runs an uninterrupted reference, then TRIALS times: start `hspace sample` as a subprocess
(its own process group, so its ephemeral Prefect server dies with it), SIGKILL it at a
random moment between start and the reference's wall time, check that no shard marked
done is incomplete, resume with the same command (it takes over the dead lock), and compare the final
arrays with the reference bit for bit. Prints one line per trial: when it was killed,
how many shards were done, how many the resume recomputed.

    python tests/benchmarks/torture_sample.py [--trials 20] [--model toy] [--n 48] [--steps 10]
    python tests/benchmarks/torture_sample.py --command run --trials 5   # the whole pipeline

With --command run the final samples, annotations, PCA, eval summary and direction files
are compared with the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hspace.data.stores import SampleStore  # noqa: E402


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finish(cmd: list[str], env: dict, log: Path, timeout: float = 900) -> int:
    proc = start(cmd, env, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_group(proc)  # a lingering server child


def extra_outputs(run: Path, command: str) -> dict:
    """What `hspace run` makes besides samples: scores, PCA, eval summary, directions."""
    if command != "run":
        return {}
    import zarr
    from safetensors.numpy import load_file

    out = {"scores": zarr.open_group(run / "annotations.zarr", mode="r")["scores"][:]}
    pca = zarr.open_group(run / "pca.zarr", mode="r")
    for name in sorted(pca.array_keys()):
        out[f"pca/{name}"] = pca[name][:]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    out["eval"] = np.array([summary["original"]["mean_diagonal"], summary["original"]["mean_offdiagonal"]])
    for path in sorted((run / "directions").glob("*.safetensors")):
        out[f"directions/{path.stem}"] = load_file(str(path))["v"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--command", choices=["sample", "run"], default="sample")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="torture-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(work / "prefect")}
    env.pop("PREFECT_API_URL", None)
    sample_args = ["--model", args.model, "--n", str(args.n), "--steps", str(args.steps)]
    sample_args += ["--batch-size", str(args.batch_size), "--eta", "1.0", "--device", "cpu"]
    base = [sys.executable, "-m", "hspace.flows.cli", "sample", *sample_args]
    if args.command == "run":
        import yaml

        config = work / "run.yaml"
        sample_cfg = {"model": args.model, "n": args.n, "steps": args.steps, "batch_size": args.batch_size, "eta": 1.0}
        config.write_text(
            yaml.safe_dump(
                {
                    "device": "cpu",
                    "sample": sample_cfg,
                    "pca": {"components": 4},
                    "directions": {"top": 4, "held_out": 16},
                    "figures": {"pcs": 2, "name_samples": 4, "scales": [-2, 0, 2]},
                }
            )
        )
        base = [sys.executable, "-m", "hspace.flows.cli", "run", "--config", str(config)]

    t0 = time.perf_counter()
    assert finish([*base, "--out", str(work / "reference")], env, work / "reference.log") == 0
    wall = time.perf_counter() - t0
    ref = SampleStore(work / "reference" / "samples.zarr")
    reference = {name: getattr(ref, name)[:] for name in ("h", "x0", "seeds", "timesteps")}
    reference.update(extra_outputs(work / "reference", args.command))
    n_shards = ref.layout.n_shards
    print(f"reference: {wall:.1f} s, {n_shards} shards; killing at uniform random times in [0, {wall:.0f}] s")

    rng = random.Random(args.seed)
    results = []
    for trial in range(args.trials):
        run = work / f"trial{trial:02d}"
        cmd = [*base, "--out", str(run)]
        delay = rng.uniform(0, wall)
        victim = start(cmd, env, work / f"trial{trial:02d}.log")
        time.sleep(delay)
        finished_first = victim.poll() is not None
        kill_group(victim)
        done_at_kill, bad = 0, []
        if (run / "samples.zarr").exists():
            store = SampleStore(run / "samples.zarr")
            done = store.done_shards()
            done_at_kill = len(done)
            h = store.h[:]
            for k in done:  # a shard marked done is complete
                rows = store.layout.shard_rows(int(k))
                if np.isnan(h[rows.start : rows.stop].astype(np.float32)).any():
                    bad.append(int(k))
        code = finish(cmd, env, work / f"trial{trial:02d}-resume.log")
        meta = json.loads((run / "run.json").read_text())
        got = SampleStore(run / "samples.zarr")
        now = {name: getattr(got, name)[:] for name in ("h", "x0", "seeds", "timesteps")}
        now.update(extra_outputs(run, args.command))
        equal = code == 0 and all(np.array_equal(now[k], v) for k, v in reference.items())
        recomputed = meta["stages"].get("sample", {}).get("recomputed_shards")
        where = "after it finished" if finished_first else f"{delay:5.1f} s"
        results.append(equal and not bad)
        print(
            f"trial {trial:2d}: killed {where}, {done_at_kill:2d}/{n_shards} shards done, "
            f"resume exit {code}, recomputed {recomputed} shards, incomplete-but-done {bad}, "
            f"identical to reference: {equal}"
        )
    print(f"{sum(results)}/{len(results)} trials identical with no incomplete shard marked done ({work})")


if __name__ == "__main__":
    main()
