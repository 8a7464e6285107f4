"""A run folder read from Python, lazily and without Prefect: ``open_run(path)``."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from hspace._directions import Direction, load_direction
from hspace.data.catalog import RunError, RunFolder


def open_run(path: str | Path) -> Run:
    """The run folder at ``path`` (RunError, one line, if it is not one)."""
    return Run(Path(path))


class Run:
    """A run folder: its record (config, model, stages), its arrays as zarr arrays (nothing is
    read until indexed), annotations, PCA, Jacobian results, Table 1 and directions."""

    def __init__(self, path: Path):
        self.folder = RunFolder(Path(path))
        self.record = self.folder.record()  # RunError for a folder that is not a run

    def __repr__(self) -> str:
        done = [s for s, r in self.stages.items() if r.get("state") == "done"]
        return f"Run({str(self.path)!r}, n={self.config.get('n')}, steps={self.config.get('steps')}, done={done})"

    @property
    def path(self) -> Path:
        return self.folder.root

    @property
    def config(self) -> dict:
        return self.record.config

    @property
    def model(self) -> dict:
        return self.record.model.model_dump()

    @property
    def stages(self) -> dict[str, dict]:
        """Every stage's record: state, fingerprint, inputs, outputs, seconds, summary."""
        return self.record.stage_dicts()

    # ----------------------------------------------------------------- samples.zarr
    @cached_property
    def samples(self):
        """samples.zarr as a zarr group (h, x0, seeds, timesteps, done, and extras)."""
        return self._group(self.folder.samples, "sample")

    @property
    def h(self):
        """h_{T:1} of every sample: zarr array (n, T, C, H, W) float16."""
        return self.samples["h"]

    @property
    def x0(self):
        """The images: zarr array (n, 3, R, R) uint8."""
        return self.samples["x0"]

    @property
    def timesteps(self) -> np.ndarray:
        return np.asarray(self.samples["timesteps"][:])

    def images(self, indices) -> list:
        """Samples as PIL images."""
        from PIL import Image

        return [Image.fromarray(np.asarray(self.x0[int(i)]).transpose(1, 2, 0)) for i in np.atleast_1d(indices)]

    # ------------------------------------------------------------- annotations, PCA, Jacobian
    def scores(self) -> dict[str, np.ndarray]:
        """Annotated scores per attribute: {name: (n,) float32}."""
        from hspace.data.stores import AnnotationStore

        if not self.folder.annotations.exists():
            raise RunError(f"{self.path} has no annotations yet; run `hspace annotate {self.path}`")
        values, names = AnnotationStore(self.folder.annotations).scores()
        return {name: np.asarray(values[:, j]) for j, name in enumerate(names)}

    def pca(self) -> dict[str, np.ndarray]:
        """The per-timestep PCA: mean, components, explained variance, std, sign alignment, ..."""
        from hspace.data.stores import PCAStore

        if not self.folder.pca.exists():
            raise RunError(f"{self.path} has no PCA yet; run `hspace pca {self.path}`")
        arrays, attrs = PCAStore(self.folder.pca).read()
        return {**arrays, "attrs": attrs}

    def jacobian(self, sample: int, step: int) -> dict:
        """Singular values and vectors of one (sample, step) of `hspace jacobian`."""
        from hspace.data.stores import JacobianStore

        if not self.folder.jacobian.exists():
            raise RunError(f"{self.path} has no Jacobian results yet; run `hspace jacobian {self.path}`")
        arrays, attrs = JacobianStore(self.folder.jacobian).read(sample, step)
        return {**arrays, "attrs": attrs}

    # --------------------------------------------------------------------- evaluation
    def table1(self, label: str = "original") -> dict[str, dict[str, float]]:
        """A Table-1 leakage matrix of `hspace evaluate` (label original, disentangled or
        as_written): {direction: {attribute: mean change}}."""
        from hspace.data.eval_folder import EvalFolder

        table = EvalFolder(self.folder.eval).leakage(label)
        if not table:
            raise RunError(f"{self.path} has no {label} leakage table; run `hspace evaluate {self.path}`")
        return table

    def summary(self) -> dict | None:
        """eval/summary.json of `hspace evaluate` (None before it ran)."""
        from hspace.data.eval_folder import EvalFolder

        return EvalFolder(self.folder.eval).summary()

    # --------------------------------------------------------------------- directions
    def directions(self) -> dict[str, Path]:
        """{name: path} of every direction file of the run."""
        return {p.stem: p for p in self.folder.direction_files("*")}

    def direction(self, name: str) -> Direction:
        if name not in self.directions():
            have = ", ".join(sorted(self.directions())) or "none"
            raise RunError(f"{self.path} has no direction {name!r}; it has: {have}")
        return load_direction(self.folder.direction(name))

    def _group(self, path: Path, stage: str):
        import zarr

        if not path.exists():
            raise RunError(f"{self.path} has no {path.name} yet; run `hspace {stage}`")
        return zarr.open_group(path, mode="r")
