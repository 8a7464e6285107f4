"""Reading users' photos for inversion and editing: every file must be a readable image;
each is converted to RGB, centre-cropped to a square and resized (Lanczos, antialiased)
to the model's size. What was changed on the way is said, one line per kind of change
(``notes``): nothing is converted, upscaled or cropped silently."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from hspace.data.catalog import RunError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def read_photos(paths: list[Path], size: int, where: str = "") -> tuple[np.ndarray, list[str]]:
    """(n, 3, size, size) uint8 and the notes about what was changed; RunError listing every
    unreadable file (none is skipped)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    out = np.empty((len(paths), 3, size, size), np.uint8)
    bad, modes, sizes, small = [], Counter(), Counter(), []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.load()
                sizes[im.size] += 1
                if im.mode not in ("RGB",):
                    modes[im.mode] += 1
                if min(im.size) < size:
                    small.append(f"{Path(path).name} ({im.size[0]}x{im.size[1]})")
                transparent = "A" in im.mode or "transparency" in im.info
                rgb = _flatten(im.convert("RGBA")) if transparent else im.convert("RGB")
                out[i] = np.asarray(ImageOps.fit(rgb, (size, size), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            bad.append(f"{Path(path).name} ({type(e).__name__})")
    if bad:
        raise RunError(
            f"{len(bad)} of {len(paths)} files{where} are not readable images: {', '.join(bad[:8])}"
            + (" ..." if len(bad) > 8 else "")
            + "; remove or fix them (nothing is skipped silently)"
        )
    notes = []
    if modes:
        kinds = ", ".join(f"{n} {_mode_name(m)}" for m, n in sorted(modes.items()))
        notes.append(f"converted to RGB: {kinds} image(s) (transparency flattened onto white)")
    if small:
        notes.append(
            f"warning: {len(small)} image(s) smaller than the model's {size}x{size} were upscaled, which blurs them: "
            + ", ".join(small[:5])
            + (" ..." if len(small) > 5 else "")
        )
    shapes = sorted(sizes)
    if len(shapes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in shapes[:4]) + (" ..." if len(shapes) > 4 else "")
        notes.append(
            f"{len(paths)} images of {len(shapes)} sizes ({listed}): each centre-cropped and resized to {size}x{size}"
        )
    elif shapes and shapes[0] != (size, size):
        w, h = shapes[0]
        how = "centre-cropped to a square and resized" if w != h else "resized"
        notes.append(f"{w}x{h} {how} to the model's {size}x{size}")
    return out, notes


def _flatten(im):
    from PIL import Image

    background = Image.new("RGB", im.size, (255, 255, 255))
    background.paste(im, mask=im.getchannel("A"))
    return background


def _mode_name(mode: str) -> str:
    return {
        "L": "grayscale",
        "LA": "grayscale+alpha",
        "RGBA": "RGBA",
        "P": "palette",
        "1": "1-bit",
        "CMYK": "CMYK",
    }.get(mode, mode)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (or batches), peak 255."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of two uint8 images (3, R, R): Gaussian window 11,
    sigma 1.5, K1 0.01, K2 0.03, per channel on the valid region, averaged."""
    from scipy.ndimage import gaussian_filter

    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for xc, yc in zip(x, y, strict=True):
        f = lambda img: gaussian_filter(img, 1.5, truncate=3.5)  # noqa: E731  (an 11-tap window)
        mx, my = f(xc), f(yc)
        sxx, syy, sxy = f(xc * xc) - mx * mx, f(yc * yc) - my * my, f(xc * yc) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        pad = 5
        values.append(m[pad:-pad, pad:-pad].mean() if min(m.shape) > 2 * pad else m.mean())
    return float(np.mean(values))
