"""A run's extra h points (``sample.h_points``): h_{T:1} captured at more modules of the denoiser
in the same sampling pass, side by side in samples.zarr, each with its own PCA and directions.

    RUN/samples.zarr/h            (n, T, C, H, W) at sample.h_point (the run's point)
    RUN/samples.zarr/h@POINT      (n, T, *shape) at each extra point, sharded and chunked like h
    RUN/points/POINT/pca.zarr     the point's per-timestep PCA
    RUN/directions/points/POINT/NAME.safetensors   its pcNN, randomNN and eq. (10) directions,
                                  each recording h_point POINT (hspace edit / hspace.apply hook there)

``PointView(run, point)`` is the run seen at one point: the same folder, samples and
annotations, with the PCA, the direction files and h read at ``point``; the PCA and eq. (10)
code take it in place of the run (``read`` gives the run record with ``h_point`` = ``point``, so
every direction written through it names its point). It is read-only for the run record.
"""

from __future__ import annotations

from pathlib import Path


def h_array(point: str | None) -> str:
    """The samples.zarr array of h at an extra ``point`` (None: the run's own, "h")."""
    return "h" if point is None else f"h@{point}"


def extra_points(meta: dict) -> list[str]:
    """The extra h points a run record captures (sample.h_points)."""
    return list(meta["config"].get("h_points") or [])


class PointView:
    """The run folder ``run`` at its extra h point ``point`` (see the module doc)."""

    def __init__(self, run, point: str):
        self._run, self.point = run, point
        self.h_array = h_array(point)

    def __getattr__(self, name):
        if name in ("write", "set_stage", "init"):
            raise AttributeError(f"a run's view at h point {self.point} does not write its record")
        return getattr(self._run, name)

    @property
    def pca(self) -> Path:
        return self._run.root / "points" / self.point / "pca.zarr"

    @property
    def point_directions(self) -> Path:
        return self._run.directions / "points" / self.point

    def direction(self, name: str) -> Path:
        return self.point_directions / f"{name}.safetensors"

    def direction_files(self, pattern: str = "*") -> list[Path]:
        folder = self.point_directions
        return sorted(folder.glob(f"{pattern}.safetensors")) if folder.exists() else []

    def read(self) -> dict:
        meta = self._run.read()
        return {**meta, "config": {**meta["config"], "h_point": self.point}}


def views(run) -> list:
    """The run itself, then a view at each of its extra h points."""
    return [run, *(PointView(run, p) for p in extra_points(run.read()))]
