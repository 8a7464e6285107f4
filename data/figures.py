"""Labelled image grids (PNG): rows x columns of uint8 images with row and column labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def grid_image(
    images: np.ndarray,
    row_labels: list[str],
    col_labels: list[str],
    cell: int = 96,
    title: str | None = None,
) -> Image.Image:
    """images: uint8 (rows, cols, 3, R, R) or (rows, cols, R, R, 3). Cells are upscaled
    to ``cell`` pixels (nearest, so small toy images stay crisp)."""
    if images.shape[2] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 1, 3, 4, 2)
    rows, cols = images.shape[:2]
    font = ImageFont.load_default()
    row_labels, col_labels = [_ascii(s) for s in row_labels], [_ascii(s) for s in col_labels]
    title = _ascii(title) if title else title
    left = 8 + max((int(font.getlength(s)) for s in row_labels), default=0)
    top = 22 + (18 if title else 0)
    canvas = Image.new("RGB", (left + cols * (cell + 2), top + rows * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text(
            (left + c * (cell + 2) + cell // 2 - int(font.getlength(label)) // 2, top - 16),
            label,
            fill="black",
            font=font,
        )
    for r in range(rows):
        draw.text((4, top + r * (cell + 2) + cell // 2 - 6), row_labels[r], fill="black", font=font)
        for c in range(cols):
            tile = Image.fromarray(np.ascontiguousarray(images[r, c])).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (left + c * (cell + 2), top + r * (cell + 2)))
    return canvas


def _ascii(text: str) -> str:
    """PIL's built-in font has no Greek or math glyphs; spell them out."""
    for a, b in (("γ", "g"), ("≈", "~"), ("σ", "sd"), ("°", " deg")):
        text = text.replace(a, b)
    return text


def save_grid(path: Path, image: Image.Image) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.png")
    image.save(tmp)
    tmp.replace(path)
    return path
