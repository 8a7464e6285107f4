"""Quality of the toy DDPM, judged by the oracle (the toy world).

Generates N samples with the sampler defaults of `hspace run` (DDIM, eta = 0, 20 steps),
scores them with an oracle of the model's render style, and compares with the renderer's
own distribution in that style:
- every binary attribute's frequency (target: within +-0.08 of the renderer's),
- mean oracle confidence max(p, 1-p) on binary attributes (target >= 0.95),
- pose angle means (target: within 2 degrees) and stds (target: within 20%).
Also writes a PNG of 64 samples next to 64 renders (docs/toy_samples.png by default).

    python tests/benchmarks/bench_toy_quality.py [--model toy] [--oracle oracle] [--n 512] [--png FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hspace.data import models  # noqa: E402
from hspace.data.annotators import load_annotator  # noqa: E402
from hspace.data.toy import faces as toyfaces  # noqa: E402
from hspace.data.toy.recipe import model_recipe  # noqa: E402
from hspace.hcore.sampler import make_generators, sample, to_uint8  # noqa: E402
from hspace.tasks.config import SampleSection  # noqa: E402

DEFAULTS = SampleSection()  # the sampler of `hspace run`


def mosaic(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """(N, R, R, 3) uint8 -> one (rows*R, cols*R, 3) image."""
    n, r = images.shape[:2]
    rows = -(-n // cols)
    canvas = np.full((rows * r, cols * r, 3), 255, np.uint8)
    for i, im in enumerate(images):
        canvas[(i // cols) * r : (i // cols + 1) * r, (i % cols) * r : (i % cols + 1) * r] = im
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--oracle", default="oracle", help="oracle | oracle:PATH (of the model's render style)")
    ap.add_argument("--steps", type=int, default=DEFAULTS.steps)
    ap.add_argument("--eta", type=float, default=DEFAULTS.eta)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--png", default="docs/toy_samples.png")
    args = ap.parse_args()

    ref = models.resolve(args.model)
    recipe = model_recipe(Path(ref.path))
    if recipe is None:
        sys.exit(f"{ref.path} has no recipe.json: this benchmark needs a toy model (hspace train-toy --out)")
    style = recipe.style
    unet, scheduler = models.load(ref)
    oracle = load_annotator(args.oracle)
    t0 = time.perf_counter()
    x0 = torch.cat(
        [
            sample(
                unet,
                scheduler,
                make_generators(12345, range(s, min(args.n, s + args.batch_size))),
                args.steps,
                args.eta,
            )
            for s in range(0, args.n, args.batch_size)
        ]
    )
    wall = time.perf_counter() - t0
    scores = oracle.score(x0).numpy()
    renders, factors = toyfaces.render_batch(np.arange(10_000), style=style)
    truth = factors.labels()
    nb = len(toyfaces.BINARY_ATTRIBUTES)
    print(f"{args.model} (render style {style}), oracle {args.oracle}")
    print(f"{args.n} samples, {args.steps} DDIM steps, eta {args.eta:g}: {wall:.1f} s ({args.n / wall:.1f} samples/s)")
    print(f"{'attribute':<12} {'model':>7} {'renderer':>9} {'diff':>7}")
    worst = 0.0
    for i, name in enumerate(toyfaces.BINARY_ATTRIBUTES):
        model_freq, true_freq = (scores[:, i] > 0.5).mean(), truth[:, i].mean()
        worst = max(worst, abs(model_freq - true_freq))
        print(f"{name:<12} {model_freq:7.3f} {true_freq:9.3f} {model_freq - true_freq:+7.3f}")
    confidence = np.maximum(scores[:, :nb], 1 - scores[:, :nb]).mean()
    print(
        f"max |frequency diff| = {worst:.3f} (target <= 0.08); "
        f"mean binary confidence = {confidence:.3f} (target >= 0.95)"
    )
    met = worst <= 0.08 and confidence >= 0.95
    for j, name in enumerate(toyfaces.POSE_ATTRIBUTES):
        m, t = scores[:, nb + j], truth[:, nb + j]
        ok = abs(m.mean() - t.mean()) <= 2 and abs(m.std() / t.std() - 1) <= 0.2
        met = met and ok
        print(
            f"{name:<6} model mean {m.mean():+6.2f} std {m.std():5.2f}   "
            f"renderer mean {t.mean():+6.2f} std {t.std():5.2f}   "
            f"(mean diff {m.mean() - t.mean():+.2f}, std ratio {m.std() / t.std():.2f}: {'ok' if ok else 'MISSED'})"
        )
    print("quality targets:", "all met" if met else "MISSED")
    if args.png:
        from PIL import Image

        gen = to_uint8(x0[:64]).permute(0, 2, 3, 1).numpy()
        gap = np.full((8 * gen.shape[1], 16, 3), 255, np.uint8)
        both = np.concatenate([mosaic(gen), gap, mosaic(renders[:64])], 1)
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(both).resize((both.shape[1] * 2, both.shape[0] * 2), Image.NEAREST).save(args.png)
        print(f"left: 64 samples of the model, right: 64 renders -> {args.png}")


if __name__ == "__main__":
    main()
