"""Cheap design metric for a toy DDPM candidate (issue 15; ../shared/TOY_V2_NOTES.md).

An attribute that a linear probe cannot read from h_t cannot be edited through h. For a
training checkpoint (its EMA weights) or a model folder this samples N faces with the
`hspace run` sampler defaults (DDIM, 20 steps, eta 0), labels them with an oracle of the
same render style, and prints per binary attribute:
- the sample frequency and the oracle's mean confidence max(p, 1 - p) (a factor the model
  draws half-way reads near 0.5),
- the cross-validated accuracy of a logistic-regression probe (C = 0.01, 4 folds) that
  predicts the attribute from h_t at four steps, beside the majority rate.

    python tests/benchmarks/bench_toy_design.py --checkpoint runs/toy-train/checkpoint --oracle ORACLE [--n 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hspace.data import models, toy, toyfaces  # noqa: E402
from hspace.data.annotators import load_annotator  # noqa: E402
from hspace.hcore.sampler import make_generators, sample  # noqa: E402


def load_candidate(args):
    if args.checkpoint:
        _, ema, _, step, recipe = toy.load_checkpoint(Path(args.checkpoint))
        return ema.eval(), toy.build_scheduler(recipe), f"{args.checkpoint} step {step} ({recipe.style} renders)"
    unet, scheduler = models.load(models.resolve(args.model))
    return unet, scheduler, args.model


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--model")
    ap.add_argument("--oracle", default="oracle", help="annotator spec; must match the candidate's render style")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--probe-steps", default="0,5,10,19")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    unet, scheduler, what = load_candidate(args)
    oracle = load_annotator(args.oracle)
    probe_steps = [int(s) for s in args.probe_steps.split(",")]
    hs: dict[int, list[np.ndarray]] = {s: [] for s in probe_steps}

    def keep(step, t, h):
        if step in hs:
            hs[step].append(h.float().flatten(1).numpy())

    t0 = time.perf_counter()
    x0 = torch.cat(
        [
            sample(
                unet,
                scheduler,
                make_generators(0, range(s, min(args.n, s + args.batch_size))),
                args.steps,
                on_step=keep,
            )
            for s in range(0, args.n, args.batch_size)
        ]
    )
    wall = time.perf_counter() - t0
    scores = oracle.score(x0).numpy()
    nb = len(toyfaces.BINARY_ATTRIBUTES)
    print(
        f"{what}: {args.n} samples, {args.steps} DDIM steps in {wall:.0f} s; h = {hs[probe_steps[0]][0].shape[1]} dims"
    )
    print(f"{'attribute':<12} {'freq':>5} {'conf':>5} {'major':>6}  probe accuracy at steps {probe_steps}")
    out = {}
    for i, name in enumerate(toyfaces.BINARY_ATTRIBUTES):
        y = scores[:, i] > 0.5
        conf = float(np.maximum(scores[:, i], 1 - scores[:, i]).mean())
        major = max(y.mean(), 1 - y.mean())
        accs = []
        for s in probe_steps:
            h = np.concatenate(hs[s])
            h = (h - h.mean(0)) / (h.std(0) + 1e-6)
            if min(y.sum(), (~y).sum()) < 4:
                accs.append(float("nan"))
                continue
            clf = LogisticRegression(C=0.01, max_iter=2000)
            accs.append(float(cross_val_score(clf, h, y, cv=4).mean()))
        out[name] = {"freq": float(y.mean()), "confidence": conf, "majority": float(major), "probe": accs}
        print(f"{name:<12} {y.mean():5.2f} {conf:5.2f} {major:6.2f}  " + ", ".join(f"{a:.2f}" for a in accs))
    print(f"mean binary confidence {np.maximum(scores[:, :nb], 1 - scores[:, :nb]).mean():.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"what": what, "attributes": out}, indent=1))


if __name__ == "__main__":
    main()
