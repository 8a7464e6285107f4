"""DiffMorpher on toy-sd against plain latent slerp, judged by the oracle.

For pairs of toy-sd samples (guidance 4, 20 steps), `hspace morph`'s pipeline with everything on
(LoRA per image, LoRA and latent interpolation, self-attention interpolation, AdaIN,
rescheduling) and the baseline (DDIM inversion refined as the same, slerp of the noises, linear
text embeddings; no LoRA, no attention, no AdaIN, no rescheduling). Printed per method, averaged
over the pairs: monotonicity of each oracle factor that differs between the ends (|net change| /
total variation along the frames: 1 = it never turns back), the spread of the neighbouring-frame
RMS distances (std / mean: 0 = evenly spaced), the end frames' PSNR against the inputs, seconds.

    python tests/benchmarks/bench_morph.py --pairs 4 --frames 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def main() -> None:
    import torch
    from PIL import Image

    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.hcore.generator import Replay
    from hspace.hcore.sampler import to_uint8, to_unit
    from hspace.tasks.morph import MorphSettings, morph

    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--lora-steps", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(2)
    ref = models.resolve("toy-sd")
    unet, sched = models.load_checked(ref, "cpu", torch.float32, clip_sample=False)
    oracle = load_annotator("oracle", "cpu")
    text = models.text_setup(ref, ["a person"], guidance_scale=4.0, image_size=32)
    faces = to_uint8(Replay(11, 20, 1.0).with_text(text).render(unet, sched, list(range(2 * args.pairs)))).numpy()
    binary = [i for i, n in enumerate(oracle.names) if n not in getattr(oracle, "degrees", ())]
    results: dict[str, list] = {"diffmorpher": [], "slerp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            paths = []
            for j in (2 * k, 2 * k + 1):
                paths.append(Path(tmp) / f"face{j}.png")
                Image.fromarray(faces[j].transpose(1, 2, 0)).save(paths[-1])
            for name, on in (("diffmorpher", True), ("slerp", False)):
                s = MorphSettings(args.frames, 20, args.lora_steps, lora=on, attention=on)
                s.adain = s.reschedule = on
                start = time.perf_counter()
                r = morph(Path(tmp) / f"{name}{k}.png", model="toy-sd", images=paths, prompts=["a person"],
                          settings=s, log=lambda *a: None)  # fmt: skip
                seconds = time.perf_counter() - start
                frames = np.stack([np.asarray(Image.open(f)) for f in sorted(r["folder"].glob("frame_*.png"))])
                scores = oracle.score(to_unit(frames.transpose(0, 3, 1, 2))).numpy()
                mono = []
                for c in range(scores.shape[1]):
                    net = abs(scores[-1, c] - scores[0, c])
                    big = net > (0.2 if c in binary else 5.0)
                    if big:
                        mono.append(net / np.abs(np.diff(scores[:, c])).sum())
                results[name].append((np.mean(mono) if mono else np.nan, r["spacing_spread"], min(r["end_psnr_db"]),
                                      seconds))  # fmt: skip
    print(f"toy-sd, {args.pairs} pairs of samples, {args.frames} frames, 20 steps, LoRA {args.lora_steps} steps")
    print(f"{'method':<12} {'monotonicity':>12} {'spacing spread':>14} {'end PSNR dB':>11} {'s per morph':>11}")
    for name, rows in results.items():
        m = np.array(rows, dtype=float)
        print(f"{name:<12} {np.nanmean(m[:, 0]):>12.3f} {m[:, 1].mean():>14.3f} {m[:, 2].mean():>11.1f} "
              f"{m[:, 3].mean():>11.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
