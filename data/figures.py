"""All drawing (PIL, no plotting library): labelled image grids of edits, Table-1
heatmaps, and the two panels of Fig. 8."""

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


def heatmap(matrix: np.ndarray, rows: list[str], columns: list[str], title: str, degrees: tuple = ()):
    """A labelled diverging heatmap (blue negative, red positive), values written in cells;
    the columns in ``degrees`` share one colour scale, the probability columns another."""
    font = ImageFont.load_default()
    cell, left, top = 64, 8 + max(int(font.getlength(r)) for r in rows), 40
    img = Image.new("RGB", (left + cell * len(columns) + 8, top + cell * len(rows) + 8), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), title, fill="black", font=font)
    # colour scale per unit: degrees would otherwise wash out the probabilities
    deg = np.array([c in degrees for c in columns])
    scales = np.ones(len(columns))
    for group in (deg, ~deg):
        if group.any():
            scales[group] = max(float(np.abs(matrix[:, group]).max()), 1e-9)
    for j, c in enumerate(columns):
        d.text((left + j * cell + 2, top - 14), c[:10], fill="black", font=font)
    for i, r in enumerate(rows):
        d.text((4, top + i * cell + cell // 2 - 6), r, fill="black", font=font)
        for j in range(len(columns)):
            a = float(matrix[i, j]) / scales[j]
            colour = (
                (255, int(255 * (1 - a)), int(255 * (1 - a)))
                if a >= 0
                else (int(255 * (1 + a)), int(255 * (1 + a)), 255)
            )
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2)
            d.rectangle(box, fill=colour)
            d.text((box[0] + 4, box[1] + cell // 2 - 6), f"{matrix[i, j]:+.2f}", fill="black", font=font)
    return img


def efficiency_plot(result: dict, path: Path) -> Path:
    """Fig. 8 as a PNG of two log-x panels side by side, h in blue and x_T in red: left the
    mean change of the attribute per n pairs, right the RMS pixel change of the edit (how
    much of the image the "edit" replaces). An x_T direction that wins on the left only by
    replacing the face shows up on the right."""
    panels = [
        _panel(result, "change", f"mean change of {result['attribute']} (gamma={result['gamma']:g})"),
        _panel(result, "moved", "RMS pixel change of the edit"),
    ]
    img = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    x = 0
    for panel in panels:
        img.paste(panel, (x, 0))
        x += panel.width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _panel(result: dict, key: str, title: str):
    w, h = 440, 270
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 5), f"{title} vs n pairs (log)", fill="black")
    values = list(result[key].values()) + [0.0]
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1e-6)
    x_of = lambda n: 40 + (w - 70) * np.log10(n) / 2  # noqa: E731
    y_of = lambda c: h - 35 - (h - 70) * (c - lo) / span  # noqa: E731
    d.line([(40, y_of(0)), (w - 20, y_of(0))], fill="grey")
    for v in sorted({0.0, lo, hi}):
        d.text((2, y_of(v) - 6), f"{v:+.2f}", fill="grey")
    for latent, colour in (("h", "blue"), ("xT", "red")):
        pts = [(x_of(n), y_of(result[key][f"{latent}:{n}"])) for n in result["ns"]]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.text((pts[-1][0] + 6, pts[-1][1] - 6), latent, fill=colour)
    for n in result["ns"]:
        d.text((x_of(n) - 5, h - 24), str(n), fill="black")
    return img
