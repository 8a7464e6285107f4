"""Direction files for Python users: ``load_direction`` reads one (a path, ``RUN/NAME`` or
``PACK/NAME``) into a ``Direction`` holding v (T, C, H, W) and its metadata: the one
direction type of hspace (hspace.data.directions), whose ``fits`` check the CLI, the stages
and ``hspace.apply`` share."""

from __future__ import annotations

from pathlib import Path

from hspace.data.directions import Direction, read


def load_direction(where: str | Path) -> Direction:
    """A direction file: ``path/NAME.safetensors``, a run folder's or a pack's ``.../NAME``
    (hspace.data.directions.resolve_path). RunError (one line) for anything else."""
    return read(where)


__all__ = ["Direction", "load_direction"]
