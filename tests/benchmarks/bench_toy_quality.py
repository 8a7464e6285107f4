"""Quality of the toy DDPM, judged by the oracle (issue: toy world).

Generates N samples with the default sampler (DDIM, eta=0, 50 steps), scores them with
the shipped oracle, and compares with the renderer's own distribution:
- every binary attribute's frequency (target: within +-0.08 of the renderer's),
- mean oracle confidence max(p, 1-p) on binary attributes (target >= 0.9),
- pose angle means and stds.
Also writes a PNG of 64 samples next to 64 renders (docs/toy_samples.png by default).

    python tests/benchmarks/bench_toy_quality.py [--n 512] [--steps 50] [--png docs/toy_samples.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hspace.data import models, toyfaces  # noqa: E402
from hspace.data.annotators import load_annotator  # noqa: E402
from hspace.hcore.sampler import make_generators, sample, to_uint8  # noqa: E402


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
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--png", default="docs/toy_samples.png")
    args = ap.parse_args()

    unet, scheduler = models.load(models.resolve(args.model))
    oracle = load_annotator("oracle")
    t0 = time.perf_counter()
    x0 = torch.cat(
        [
            sample(unet, scheduler, make_generators(12345, range(s, min(args.n, s + args.batch_size))), args.steps)
            for s in range(0, args.n, args.batch_size)
        ]
    )
    wall = time.perf_counter() - t0
    scores = oracle.score(x0).numpy()
    renders, factors = toyfaces.render_batch(np.arange(10_000))
    truth = factors.labels()
    nb = len(toyfaces.BINARY_ATTRIBUTES)
    print(f"{args.n} samples, {args.steps} DDIM steps: {wall:.1f} s ({args.n / wall:.1f} samples/s)")
    print(f"{'attribute':<12} {'model':>7} {'renderer':>9} {'diff':>7}")
    worst = 0.0
    for i, name in enumerate(toyfaces.BINARY_ATTRIBUTES):
        model_freq, true_freq = (scores[:, i] > 0.5).mean(), truth[:, i].mean()
        worst = max(worst, abs(model_freq - true_freq))
        print(f"{name:<12} {model_freq:7.3f} {true_freq:9.3f} {model_freq - true_freq:+7.3f}")
    confidence = np.maximum(scores[:, :nb], 1 - scores[:, :nb]).mean()
    print(
        f"max |frequency diff| = {worst:.3f} (target <= 0.08); "
        f"mean binary confidence = {confidence:.3f} (target >= 0.9)"
    )
    for j, name in enumerate(toyfaces.POSE_ATTRIBUTES):
        m, t = scores[:, nb + j], truth[:, nb + j]
        print(
            f"{name:<6} model mean {m.mean():+6.2f} std {m.std():5.2f}   "
            f"renderer mean {t.mean():+6.2f} std {t.std():5.2f}"
        )
    if args.png:
        from PIL import Image

        gen = to_uint8(x0[:64]).permute(0, 2, 3, 1).numpy()
        gap = np.full((8 * 32, 16, 3), 255, np.uint8)
        both = np.concatenate([mosaic(gen), gap, mosaic(renders[:64])], 1)
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(both).resize((both.shape[1] * 2, both.shape[0] * 2), Image.NEAREST).save(args.png)
        print(f"left: 64 samples of the model, right: 64 renders -> {args.png}")


if __name__ == "__main__":
    main()
