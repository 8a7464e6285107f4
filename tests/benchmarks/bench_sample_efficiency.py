"""Sample efficiency of eq. (10) in h vs x_T (paper Fig. 8), on the toy world.

Uses an annotated toy run with DDIM eta = 0 (default runs/pca-toy from bench_pca_toy.py;
annotates it if needed). Directions for Smiling from n = 1, 3, 10, 30, 100 top/bottom
pairs among the first N - 64 samples, in h and in x_T, applied at gamma = 1 to the 64
held-out samples; prints the oracle's mean change of Smiling per n (table) and writes a
PNG plot.

    python tests/benchmarks/bench_sample_efficiency.py [--run runs/pca-toy] [--png docs/sample_efficiency.png]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from data import directions as dirfile  # noqa: E402
from data import models  # noqa: E402
from data.annotators import load_annotator  # noqa: E402
from data.catalog import RunFolder  # noqa: E402
from flows.cli import app  # noqa: E402
from hcore.sampler import Edit, draw_noise, make_generators, sample  # noqa: E402
from tasks.supervised import build_direction  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pca-toy")
    ap.add_argument("--attribute", default="Smiling")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--png", default="docs/sample_efficiency.png")
    args = ap.parse_args()
    run = RunFolder(Path(args.run))
    meta = run.read()
    cfg = meta["config"]
    assert cfg["eta"] == 0, "Fig. 8 uses DDIM (eta = 0)"
    if not run.annotations.exists():
        r = CliRunner().invoke(app, ["annotate", args.run])
        assert r.exit_code == 0, r.output
    first = cfg["n"] - args.held_out
    held = list(range(first, cfg["n"]))
    unet, scheduler = models.load_for_run(meta)  # refuses weights that changed since sampling
    oracle = load_annotator("oracle")
    col = list(oracle.names).index(args.attribute)
    base_x0 = sample(unet, scheduler, make_generators(cfg["seed"], held), cfg["steps"], 0.0)
    base = oracle.score(base_x0)[:, col]
    moved = {}  # RMS pixel change of the edit: how much of the image it replaces
    ns = [n for n in (1, 3, 10, 30, 100) if n <= first // 2]
    table = {}
    for latent in ("h", "xT"):
        for n in ns:
            name = f"_eff_{latent}_{n}"
            build_direction(args.run, args.attribute, n, latent, name, first=first)
            v, _ = dirfile.load(run.directions / f"{name}.safetensors")
            gens = make_generators(cfg["seed"], held)
            if latent == "h":
                x0 = sample(unet, scheduler, gens, cfg["steps"], 0.0, edit=Edit([v], [args.gamma]))
            else:
                x_T = draw_noise(make_generators(cfg["seed"], held), v.shape[1:]) + args.gamma * v
                x0 = sample(unet, scheduler, gens, cfg["steps"], 0.0, x_T=x_T)
            table[(latent, n)] = float((oracle.score(x0)[:, col] - base).mean())
            moved[(latent, n)] = float(((x0 - base_x0) ** 2).mean().sqrt())
            (run.directions / f"{name}.safetensors").unlink()
    print(f"mean change of P({args.attribute}) on {len(held)} held-out samples at gamma = {args.gamma:g}")
    print("| n pairs | h: change | h: RMS pixel change | x_T: change | x_T: RMS pixel change |\n|---|---|---|---|---|")
    for n in ns:
        print(
            f"| {n} | {table[('h', n)]:+.3f} | {moved[('h', n)]:.3f} | {table[('xT', n)]:+.3f} | "
            f"{moved[('xT', n)]:.3f} |"
        )
    if args.png:
        from PIL import Image, ImageDraw

        w, h = 420, 260
        img = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(img)
        d.text((10, 5), f"mean change of P({args.attribute}) vs n pairs (log), gamma={args.gamma:g}", fill="black")
        x_of = lambda n: 40 + (w - 60) * np.log10(n) / 2  # noqa: E731
        y_of = lambda c: h - 30 - (h - 60) * (c + 0.1) / 1.2  # noqa: E731
        d.line([(40, y_of(0)), (w - 20, y_of(0))], fill="grey")
        for latent, colour in (("h", "blue"), ("xT", "red")):
            pts = [(x_of(n), y_of(table[(latent, n)])) for n in ns]
            d.line(pts, fill=colour, width=2)
            d.text((pts[-1][0] - 30, pts[-1][1] - 14), latent, fill=colour)
        for n in ns:
            d.text((x_of(n) - 5, h - 22), str(n), fill="black")
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        img.save(args.png)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
