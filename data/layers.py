"""The layer map's files (tasks/layers.py): h_{T:1} of a run's samples at several points of the
denoiser, side by side in one Zarr group, and the per-point eq. (10) direction files.

    RUN/layers/h.zarr/POINT   (n, T, *shape) float16, one chunk per sample and step; the array's
                              attrs name the point; the group's attrs list the points
    RUN/layers/table.json, table.csv, layers.png
    RUN/directions/layers/POINT/ATTR.safetensors
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def layer_file(run, point: str, attribute: str) -> Path:
    """RUN/directions/layers/POINT/ATTR.safetensors: eq. (10)'s direction at ``point``."""
    return run.directions / "layers" / point / f"{attribute}.safetensors"


class LayerStore:
    """RUN/layers/h.zarr: one array per h point (its name the point)."""

    def __init__(self, path: Path):
        import zarr

        self.path = Path(path)
        self.group = zarr.open_group(self.path, mode="a")

    @classmethod
    def create(cls, path: Path, n: int, steps: int, points: dict[str, tuple[int, ...]]) -> LayerStore:
        """A fresh group (one written before is replaced) with an array per point of ``points``
        ({point: shape of one sample's h})."""
        import zarr
        from zarr.codecs import Crc32cCodec

        path = Path(path)
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(path, mode="w-")
        for point, shape in points.items():
            arr = group.create_array(
                point, shape=(n, steps, *shape), dtype="float16", chunks=(1, 1, *shape),
                compressors=[Crc32cCodec()], fill_value=np.nan,
            )  # fmt: skip
            arr.attrs["h_point"] = point
        group.attrs["points"] = list(points)
        return cls(path)

    @property
    def points(self) -> list[str]:
        return list(self.group.attrs["points"])

    def write(self, point: str, first: int, h: np.ndarray) -> None:
        """Samples first .. first + len(h) - 1 of ``point``: h (B, T, *shape)."""
        self.group[point][first : first + len(h)] = h.astype(np.float16)

    def read(self, point: str) -> np.ndarray:
        """All samples' h at ``point`` as float32 (n, T, *shape)."""
        return np.asarray(self.group[point][:], dtype=np.float32)

    def read_step(self, point: str, t: int) -> np.ndarray:
        """All samples' h_t at ``point`` as float32 (n, *shape): one step in memory."""
        return np.asarray(self.group[point][:, t], dtype=np.float32)


def layer_bytes(n: int, steps: int, points: dict[str, tuple[int, ...]], attributes: int) -> int:
    """What the layer map writes: h of ``n`` samples at every point (float16) and an eq. (10)
    direction per attribute and point (float32)."""
    import math

    per_step = sum(math.prod(shape) for shape in points.values())
    return n * steps * per_step * 2 + attributes * steps * per_step * 4
