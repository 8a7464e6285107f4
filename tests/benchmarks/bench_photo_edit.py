"""Editing real photos on the toy world, the numbers of README "Editing a real
photo": toy renders of neutral faces (no smile, no glasses) stand in for photos; eq. (10)
directions (Smiling, Eyeglasses) come from a sampled, oracle-annotated toy run; each photo
is edited through `hspace edit --image` with edit-friendly DDPM inversion, DDIM inversion
(refine 3) and SDEdit (half the steps). Printed per method: the reconstruction PSNR / SSIM
without edit, and at each gamma the oracle's mean change of the edited attribute and the
mean |change| of yaw, pitch and roll (degrees) against the method's own no-edit image.

    python tests/benchmarks/bench_photo_edit.py [--n 128] [--photos 8] [--figure docs/photo_edit.png]

--figure also writes the README's grid (3 photos, both directions, DDPM inversion).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def hspace(*args) -> str:
    cmd = [str(Path(sys.executable).with_name("hspace")), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> None:
    from PIL import Image

    from hspace.data.annotators import load_annotator
    from hspace.data.photos import psnr, read_photos, ssim
    from hspace.data.toy import faces as toyfaces
    from hspace.data.toy import recipe as toy
    from hspace.hcore.sampler import to_unit

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128, help="toy samples the directions are found on")
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--gammas", default="0.5,1,2")
    ap.add_argument("--figure", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-photo-"))
    run = root / "run"
    hspace("sample", "--model", "toy", "--n", args.n, "--batch-size", 64, "--device", "cpu", "--out", run)
    hspace("annotate", run, "--device", "cpu")
    hspace("directions", run, "--attribute", "Smiling,Eyeglasses", "--top", args.n // 5, "--held-out", 0)
    style = toy.model_recipe(toy.TOY_MODEL_DIR).style
    images, f = toyfaces.render_batch(range(9_100_000, 9_100_400), 32, style=style)
    picked = [i for i in range(400) if not f.Smiling[i] and not f.Eyeglasses[i]][: args.photos]
    photos_dir = root / "photos"
    photos_dir.mkdir()
    for i in picked:
        Image.fromarray(images[i]).save(photos_dir / f"face{i:03d}.png")
    paths = sorted(photos_dir.iterdir())
    photos, _ = read_photos(paths, 32)
    oracle = load_annotator("oracle")
    names = list(oracle.names)
    gammas = ["0"] + args.gammas.split(",")
    print(f"{len(paths)} neutral toy renders; directions from {args.n} samples (top/bottom {args.n // 5}), 20 steps")
    methods = {"ddpm": ("--method", "ddpm"), "ddim": ("--method", "ddim"), "sdedit": ("--sdedit", 10)}
    for method, flag in methods.items():
        for attr in ("Smiling", "Eyeglasses"):
            out = root / f"{method}-{attr}.png"
            direction = run / "directions" / f"{attr}.safetensors"
            hspace("edit", "--image", photos_dir, "--model", "toy", "--direction", direction,
                   "--scales", ",".join(gammas), *flag, "--out", out)  # fmt: skip
            folder = out.with_suffix("")

            def scores(g, folder=folder, attr=attr):
                files = [folder / f"{p.stem}__{attr}__gamma{float(g):+g}.png" for p in paths]
                got, _ = read_photos(files, 32)
                return got, oracle.score(to_unit(got)).numpy()

            kept, base = scores("0")
            if attr == "Smiling":
                p = [psnr(k, ph) for k, ph in zip(kept, photos, strict=True)]
                s = [ssim(k, ph) for k, ph in zip(kept, photos, strict=True)]
                finite = [v for v in p if np.isfinite(v)]
                shown = f"{np.mean(finite):.1f} dB" if finite else "inf (every pixel equal)"
                print(f"{method:7s} reconstruction: PSNR {shown} ({len(p) - len(finite)} of {len(p)} exact), "
                      f"SSIM {np.mean(s):.4f}")  # fmt: skip
            for g in gammas[1:]:
                _, edited = scores(g)
                d = edited - base
                pose = [float(np.abs(d[:, names.index(k)]).mean()) for k in ("yaw", "pitch", "roll")]
                print(f"{method:7s} {attr:10s} gamma {g:>4s}: {attr} {d[:, names.index(attr)].mean():+.3f}, "
                      f"|yaw| {pose[0]:.1f}, |pitch| {pose[1]:.1f}, |roll| {pose[2]:.1f} degrees")  # fmt: skip
    if args.figure:
        three = [a for p in paths[:3] for a in ("--image", p)]
        both = [
            a for name in ("Smiling", "Eyeglasses") for a in ("--direction", run / "directions" / f"{name}.safetensors")
        ]
        hspace("edit", *three, "--model", "toy", *both, "--scales", "0,1,2", "--out", args.figure)
        print("figure:", args.figure)


if __name__ == "__main__":
    main()
