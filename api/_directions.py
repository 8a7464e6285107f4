"""Direction files for Python users: ``load_direction`` reads one (a path, ``RUN/NAME`` or
``PACK/NAME``) into a ``Direction`` holding v (T, C, H, W) and its metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hspace.data import directions as dirfile


@dataclass(frozen=True)
class Direction:
    """One h-space direction: ``v`` (T, C, H, W) float32 and the metadata hspace wrote with
    it (model fingerprint, steps, scheduler, eta, clipping, h point, edit branch, method)."""

    name: str
    v: torch.Tensor
    meta: dict
    path: Path

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def h_point(self) -> str:
        return self.meta.get("h_point", "output")

    @property
    def model(self) -> str:
        """The sha256 fingerprint of the U-Net it was found on."""
        return self.meta["model"]

    @property
    def eta(self):
        return json.loads(self.meta["eta"]) if "eta" in self.meta else None

    @property
    def edit_branch(self) -> str:
        return self.meta.get("edit_branch", "both")

    def __repr__(self) -> str:
        return (
            f"Direction({self.name!r}, shape={tuple(self.v.shape)}, steps={self.steps}, "
            f"method={self.meta.get('method')!r}, model={self.model[:12]})"
        )


def load_direction(where: str | Path) -> Direction:
    """A direction file: ``path/NAME.safetensors``, a run folder's or a pack's ``.../NAME``
    (hspace.data.directions.resolve_path). RunError (one line) for anything else."""
    path = dirfile.resolve_path(where)
    v, meta = dirfile.load(path)
    return Direction(path.stem, v, meta, path)
