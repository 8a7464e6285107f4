"""Toy-world numbers for the Jacobian directions (paper sec. 4.2, Fig. 7; ROI as in the
early version of the paper):

1. ROI locality: for an ROI around the mouth and one around the eyes, the top ROI
   direction found on sample I at step S is applied (gamma = +-G) to sample I; the share
   of the pixel-change energy sum((edited - original)^2) that falls inside the ROI,
   compared with the ROI's share of the image area and with the full-image direction's
   share (target >= 80% for the ROI direction). Also the localized ROI direction
   (``--localize R``: the direction of the unmasked J's top-R subspace whose change of eps
   stays most inside the ROI), applied at every step and only from step S on.
2. Transfer: the top full-image direction of sample I applied to 16 other samples; the
   oracle's mean change of every attribute (edited at +G minus -G, halved).

    python tests/benchmarks/bench_jacobian_toy.py [--run runs/pca-toy] [--sample 0] [--step 4] [--gamma 40]
        [--localize 128 --local-step 10 --local-gammas 20,40]
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
import torch  # noqa: E402

from hspace.data import directions as dirfile  # noqa: E402
from hspace.data import models  # noqa: E402
from hspace.data.annotators import load_annotator  # noqa: E402
from hspace.data.catalog import RunFolder  # noqa: E402
from hspace.data.toy import faces as toyfaces  # noqa: E402
from hspace.data.toy import recipe as toy  # noqa: E402
from hspace.hcore.jacobian import roi_mask  # noqa: E402
from hspace.hcore.sampler import Edit, make_generators, sample  # noqa: E402
from hspace.tasks.jacobian import parse_roi, run_jacobian  # noqa: E402


def feature_rois(meta: dict, size: int) -> dict[str, str]:
    """ROI boxes from the renderer of the run model's style: the smallest box holding 90% of the
    pixel change of a smile (mouth) and of eyeglasses (eyes); `--roi` strings."""
    recipe = toy.model_recipe(Path(meta["model"]["path"]))
    style = recipe.style if recipe is not None else "v1"
    return {f: ",".join(map(str, toyfaces.feature_box(f, style, size))) for f in ("mouth", "eyes")}


def edited(unet, scheduler, cfg, indices, v, gamma, window=None):
    gens = make_generators(cfg["seed"], list(indices))
    edit = None if v is None else Edit([v], [torch.full((len(indices),), float(gamma))], window=window)
    return sample(unet, scheduler, gens, cfg["steps"], cfg["eta"], edit=edit, h_point=cfg["h_point"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pca-toy")
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--step", type=int, default=4)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--gamma", type=float, default=40.0)
    ap.add_argument("--png", default=None, help="also write a Fig. 7 style grid here")
    ap.add_argument("--localize", type=int, default=128, help="R for the localized ROI directions (0: skip)")
    ap.add_argument("--local-step", type=int, default=10)
    ap.add_argument("--local-gammas", default="20,40")
    args = ap.parse_args()
    run = RunFolder(Path(args.run))
    meta = run.read()
    cfg = meta["config"]
    unet, scheduler = models.load_for_run(meta)
    size = unet.config.sample_size
    i = args.sample
    rois = feature_rois(meta, size)
    print("ROIs (x0,y0,x1,y1, 90% of the feature's pixel change): " + ", ".join(f"{k} {v}" for k, v in rois.items()))
    base = edited(unet, scheduler, cfg, [i], None, 0)[0]
    found = {}
    for label, roi in [("full image", None), *rois.items()]:
        r = run_jacobian(str(run.root), i, args.step, args.k, roi=roi)
        v, _ = dirfile.load(Path(r["directions"][0]))
        found[label] = v
        print(f"{label:<10} sigma {np.round(r['singular_values'], 3).tolist()} iterations {r['iterations']}")
    print(f"\n1. share of pixel-change energy inside the ROI (sample {i}, step {args.step}, gamma +-{args.gamma})")
    print("| ROI | area share | ROI direction | full-image direction |\n|---|---|---|---|")
    for label, roi in rois.items():
        mask = roi_mask((size, size), parse_roi(roi, size))[0, 0].bool()
        shares = []
        for v in (found[label], found["full image"]):
            energy = 0.0
            inside = 0.0
            for g in (-args.gamma, args.gamma):
                diff = ((edited(unet, scheduler, cfg, [i], v, g)[0] - base) ** 2).sum(0)
                energy += float(diff.sum())
                inside += float(diff[mask].sum())
            shares.append(inside / max(energy, 1e-12))
        area = float(mask.float().mean())
        print(f"| {label} | {area:.0%} | {shares[0]:.0%} | {shares[1]:.0%} |")
    if args.localize:
        s = args.local_step
        print(f"\n1b. localized ROI directions (--localize {args.localize}, step {s}): share inside the ROI")
        print("| ROI | share of eps's change at step S | gamma | every step | steps S.. only | RMS change (S..) |")
        print("|---|---|---|---|---|---|")
        for label, roi in rois.items():
            r = run_jacobian(str(run.root), i, s, 1, roi=roi, localize=args.localize, tol=1e-3)
            v, _ = dirfile.load(Path(r["directions"][0]))  # zero before step s
            every = v[s].unsqueeze(0).expand_as(v).contiguous()
            mask = roi_mask((size, size), parse_roi(roi, size))[0, 0].bool()
            for g in [float(x) for x in args.local_gammas.split(",")]:
                out = []
                for vec in (every, v):
                    energy = inside = 0.0
                    for sign in (-g, g):
                        diff = ((edited(unet, scheduler, cfg, [i], vec, sign)[0] - base) ** 2).sum(0)
                        energy += float(diff.sum())
                        inside += float(diff[mask].sum())
                    out.append((inside / max(energy, 1e-12), (energy / (2 * diff.numel() * 3)) ** 0.5))
                print(
                    f"| {label} | {r['share_inside'][0]:.0%} | {g:g} | {out[0][0]:.0%} | {out[1][0]:.0%} "
                    f"| {out[1][1]:.3f} |"
                )
    oracle = load_annotator("oracle")
    others = [j for j in range(cfg["n"]) if j != i][:16]
    v = found["full image"]
    plus = oracle.score(edited(unet, scheduler, cfg, others, v, args.gamma)).numpy()
    minus = oracle.score(edited(unet, scheduler, cfg, others, v, -args.gamma)).numpy()
    change = ((plus - minus) / 2).mean(0)
    own_plus = oracle.score(edited(unet, scheduler, cfg, [i], v, args.gamma)).numpy()[0]
    own_minus = oracle.score(edited(unet, scheduler, cfg, [i], v, -args.gamma)).numpy()[0]
    print(f"\n2. transfer of the top full-image direction of sample {i} (gamma +-{args.gamma})")
    print("| | " + " | ".join(oracle.names) + " |\n|---|" + "---|" * len(oracle.names))
    print(f"| sample {i} | " + " | ".join(f"{x:+.3f}" for x in (own_plus - own_minus) / 2) + " |")
    print("| 16 others (mean) | " + " | ".join(f"{x:+.3f}" for x in change) + " |")
    if args.png:
        from hspace.data.figures import grid_image, save_grid
        from hspace.hcore.sampler import to_uint8

        gammas = [-args.gamma, -args.gamma / 2, 0.0, args.gamma / 2, args.gamma]
        shown = [i, *others[:3]]
        cells = np.stack(
            [to_uint8(torch.cat([edited(unet, scheduler, cfg, [j], v, g) for g in gammas])).numpy() for j in shown]
        )
        title = f"top Jacobian direction of sample {i} (step {args.step}), transferred"
        save_grid(
            Path(args.png),
            grid_image(cells, [f"sample {j}" for j in shown], [f"γ={g:+g}" for g in gammas], title=title),
        )
        print(f"grid: {args.png}")


if __name__ == "__main__":
    main()
