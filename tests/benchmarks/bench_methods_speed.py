"""Seconds per edit of every editing method on toy-sd, as a multiple of a plain render of the
same samples measured in the same run (interleaved, best of --repeats): Prompt-to-Prompt and
Plug-and-Play carry the source in the same batch (target: within 2.2x), Asyrp makes a second,
unedited pass per step, SDEdit skips the steps before its restart; singular-value scaling and
AVI make one SVD per channel at one step (AVI's x_tar render is counted apart: it is made once
per set of samples, and a front reuses it at every strength).

    python tests/benchmarks/bench_methods_speed.py --n 16 --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main() -> None:
    from hspace.data import models
    from hspace.hcore.edits import get
    from hspace.hcore.generator import Replay

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    ref = models.resolve("toy-sd")
    unet, sched = models.load_checked(ref, "cpu", torch.float32, clip_sample=False)
    text = models.text_setup(ref, ["a person"], guidance_scale=4.0, image_size=32)
    replay = Replay(0, args.steps, 1.0).with_text(text)
    idx = list(range(args.n))
    h = torch.randn(args.steps, 128, 4, 4) * 0.1
    source = replay.render(unet, sched, idx, stop_before=args.steps)
    made = {
        "plain": None,
        "h": get("h").from_direction(h),
        "asyrp": get("asyrp").from_direction(h),
        "hdae-sparse": get("hdae-sparse").from_direction(h),
        "p2p": get("p2p").from_prompt("a smiling person", text.tokenizers[0]),
        "pnp": get("pnp").from_prompt("a smiling person", text.tokenizers[0]),
        "sdedit": get("sdedit").from_source(source, sched),
        "sv-scale": get("sv-scale")(index=0, step=3),
    }
    from hspace.hcore.avi import AviSpec, Predictor

    torch.manual_seed(0)
    predictor = Predictor(AviSpec(4, 8, 4, args.steps, 3, 4, "a person", "a smiling person", 64))
    start = time.perf_counter()
    made["avi"] = get("avi").from_replay(replay, unet, sched, idx, predictor)
    x_tar_seconds = time.perf_counter() - start
    strength = {"p2p": 0.6, "pnp": 0.6, "sdedit": 0.5}
    best = dict.fromkeys(made, float("inf"))
    for _ in range(args.repeats):  # interleaved: each round times every method once
        for name, method in made.items():
            edit = None if method is None else method.action(strength.get(name, 1.0))
            start = time.perf_counter()
            replay.render(unet, sched, idx, edit=edit)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"toy-sd, {args.n} samples x {args.steps} steps, guidance 4, best of {args.repeats} (interleaved)")
    print(f"{'method':<12} {'s per edit':>10} {'x plain':>8}")
    for name, seconds in best.items():
        print(f"{name:<12} {seconds / args.n:>10.4f} {seconds / best['plain']:>8.2f}")
    print(f"avi's x_tar render (once per set of samples): {x_tar_seconds / best['plain']:.2f} x plain")


if __name__ == "__main__":
    main()
