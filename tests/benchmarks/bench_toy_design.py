"""Cheap design metric for a toy DDPM candidate (docs/toy_v2_design).

An attribute that a linear probe cannot read from h_t cannot be edited through h. For a
training checkpoint (its EMA weights) or a model folder this samples N faces with the
`hspace run` sampler defaults (DDIM, 20 steps, eta 0), labels them with an oracle of the
same render style, and prints per binary attribute:
- the sample frequency and the oracle's mean confidence max(p, 1 - p) (a factor the model
  draws half-way reads near 0.5),
- the cross-validated accuracy of a logistic-regression probe (C = 0.01, 4 folds) that
  predicts the attribute from h_t at four steps, beside the majority rate;
- the edit itself: eq. (10) from the top/bottom 32 of the first N - 32 samples (all 20
  steps of h), applied at gamma = 1 to the last 32: mean change of the attribute, and the
  RMS pixel change (the real test; the toy world's target is >= +0.30 on the shipped model).
And once per model, how much the U-Net's output depends on h at all: the relative change
of the predicted noise when h (the mid-block output) is zeroed, on noised renders at
t = 900, 500, 100. A decoder that reads its skip connections and ignores h cannot be
edited through h, however well a probe reads h.

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

from hspace.data import models  # noqa: E402
from hspace.data.annotators import load_annotator  # noqa: E402
from hspace.data.toy import faces as toyfaces  # noqa: E402
from hspace.data.toy import recipe as toy  # noqa: E402
from hspace.hcore.sampler import Edit, make_generators, sample, to_unit  # noqa: E402
from hspace.hcore.supervised import top_bottom  # noqa: E402

HELD, TOP = 32, 32


@torch.no_grad()
def h_dependence(unet, scheduler, style: str, ts=(900, 500, 100), n: int = 32) -> list[float]:
    """||eps(x_t) - eps(x_t; h := 0)|| / ||eps(x_t)|| on noised renders, per t."""
    images, _ = toyfaces.render_batch(np.arange(10**9, 10**9 + n), size=unet.config.sample_size, style=style)
    x0 = to_unit(images.transpose(0, 3, 1, 2))
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in ts:
        tt = torch.full((n,), t)
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), tt)
        base = unet(x_t, tt).sample
        hook = unet.mid_block.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            zeroed = unet(x_t, tt).sample
        finally:
            hook.remove()
        out.append(float((zeroed - base).norm() / base.norm()))
    return out


def load_candidate(args):
    if args.checkpoint:
        _, ema, _, step, recipe = toy.load_checkpoint(Path(args.checkpoint))
        return ema.eval(), toy.build_scheduler(recipe), f"{args.checkpoint} step {step}", recipe.style
    ref = models.resolve(args.model)
    unet, scheduler = models.load(ref)
    recipe = toy.model_recipe(Path(ref.path))
    style = recipe.style if recipe is not None else "v1"
    return unet, scheduler, args.model, args.style or style


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--model")
    ap.add_argument("--style", help="render style of the candidate (default: its recipe's)")
    ap.add_argument("--oracle", default="oracle", help="annotator spec; must match the candidate's render style")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--probe-steps", default="0,5,10,19")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    unet, scheduler, what, style = load_candidate(args)
    what = f"{what} ({style} renders)"
    oracle = load_annotator(args.oracle)
    probe_steps = [int(s) for s in args.probe_steps.split(",")]
    hs: dict[int, list[np.ndarray]] = {s: [] for s in probe_steps}

    every: list[torch.Tensor] = []  # h_{T:1} of the current batch, for the eq. (10) directions

    def keep(step, t, h):
        every.append(h.float())
        if step in hs:
            hs[step].append(h.float().flatten(1).numpy())

    h_all = []

    def batch(start):
        every.clear()
        x = sample(
            unet,
            scheduler,
            make_generators(0, range(start, min(args.n, start + args.batch_size))),
            args.steps,
            on_step=keep,
        )
        h_all.append(torch.stack(every, 1))  # (B, T, C, H, W)
        return x

    t0 = time.perf_counter()
    x0 = torch.cat([batch(s) for s in range(0, args.n, args.batch_size)])
    h_all = torch.cat(h_all)
    wall = time.perf_counter() - t0
    scores = oracle.score(x0).numpy()
    nb = len(toyfaces.BINARY_ATTRIBUTES)
    print(
        f"{what}: {args.n} samples, {args.steps} DDIM steps in {wall:.0f} s; h = {hs[probe_steps[0]][0].shape[1]} dims"
    )
    dep = h_dependence(unet, scheduler, style)
    print("output change when h is zeroed, t = 900 / 500 / 100: " + " / ".join(f"{d:.4f}" for d in dep))
    held = list(range(args.n - HELD, args.n))
    print(
        f"{'attribute':<12} {'freq':>5} {'conf':>5} {'major':>6}  "
        f"edit at gamma 1 (change, RMS)  probe accuracy at steps {probe_steps}"
    )
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
        pos, neg = top_bottom(scores[: args.n - HELD, i], TOP)
        v = h_all[pos].mean(0) - h_all[neg].mean(0)
        edited = sample(unet, scheduler, make_generators(0, held), args.steps, edit=Edit([v], [1.0]))
        change = float((oracle.score(edited)[:, i] - torch.from_numpy(scores[held, i])).mean())
        rms = float(((edited - x0[held]) ** 2).mean().sqrt())
        out[name] = {
            "freq": float(y.mean()),
            "confidence": conf,
            "majority": float(major),
            "probe": accs,
            "edit_change": change,
            "edit_rms": rms,
        }
        print(
            f"{name:<12} {y.mean():5.2f} {conf:5.2f} {major:6.2f}  {change:+6.3f}, {rms:.3f}{'':>15}"
            + ", ".join(f"{a:.2f}" for a in accs)
        )
    print(f"mean binary confidence {np.maximum(scores[:, :nb], 1 - scores[:, :nb]).mean():.3f}")
    if args.json:
        result = {"what": what, "h_dependence": dep, "attributes": out}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
