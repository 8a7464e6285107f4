"""Figures of a pipeline run (RUN/figures/): the sample grid, PCA and random-direction
edit grids (Fig. 6) with PCs named after the attribute they move (the pc_names stage's
table), supervised and disentangled grids, and a sequential edit (Fig. 11). Fig. 7 and
Fig. 8 are stages of their own (tasks/jacobian_figure.py, tasks/efficiency.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data import models
from hspace.data.catalog import RunFolder
from hspace.data.eval_folder import EvalFolder
from hspace.data.figures import grid_image, save_grid
from hspace.data.stores import SampleStore
from hspace.tasks.stages import Context, Stage, outputs


def edit_grid(unet, scheduler, meta: dict, sample: int, paths: list[Path], scales, gammas=None, text=None):
    from hspace.hcore.hooks import h_shape
    from hspace.tasks import edit as edit_tasks

    cfg = meta["config"]
    spec = edit_tasks.SampleSpec(models.replay_for_run(meta, text), sample)
    specs = [edit_tasks.DirectionSpec(p.stem, p, None if gammas is None else gammas[i]) for i, p in enumerate(paths)]
    vectors = edit_tasks.load_directions(
        specs,
        model_fingerprint=meta["model"]["fingerprint"],
        steps=cfg["steps"],
        h_shape=h_shape(unet, cfg["h_point"]),
        h_point=cfg["h_point"],
        scheduler=scheduler,
        edit_branch=cfg.get("edit_branch"),
    )
    cells, rows, cols = edit_tasks.plan_grid(specs, list(scales))
    return edit_tasks.render_edits(unet, scheduler, spec, vectors, cells), rows, cols


def pipeline_figures(run: RunFolder, cfg, device: str = "cpu", progress=None) -> list[Path]:
    """Write the figures for ``cfg`` (its figures, directions and annotate sections);
    returns their paths. progress(name, total): called as each figure is written."""
    from hspace.tasks.pc_names import STEM

    meta = run.read()
    run.figures.mkdir(exist_ok=True)
    unet, scheduler = models.load_for_run(meta, device=device)
    text = models.text_for_run(meta, device=device)  # SD: each sample's prompt and the VAE decoder
    store = SampleStore(run.samples)
    f = cfg.figures
    sample = min(f.sample, store.layout.n - 1)
    pcs = [run.direction(f"pc{j:02d}") for j in range(f.pcs)]
    pcs = [p for p in pcs if p.exists()]
    attrs = cfg.directions.attributes if cfg.directions.latent == "h" else []
    planned = (  # the figures below, for the progress bar's total
        1
        + bool(pcs)
        + (bool(pcs) and run.direction("random00").exists())
        + sum(any(run.direction(a + suffix).exists() for a in attrs) for suffix in ("", "_disentangled"))
        + (len(attrs) > 1 and all(run.direction(a).exists() for a in attrs))
    )
    files = []

    def add(*paths: Path) -> None:
        files.extend(paths)
        if progress is not None:
            progress(Path(paths[-1]).name, planned)

    k = min(32, store.layout.n)
    x0 = store.x0[:k]
    cols = 8
    rows = -(-k // cols)
    pad = np.zeros((rows * cols, *x0.shape[1:]), np.uint8)
    pad[:k] = x0
    add(
        save_grid(
            run.figure("samples.png"),
            grid_image(
                pad.reshape(rows, cols, *x0.shape[1:]),
                [str(r * cols) for r in range(rows)],
                [""] * cols,
                title=f"the first {k} samples",
            ),
        )
    )
    if pcs:
        naming = EvalFolder(run.eval).naming(STEM) if f.name_samples > 0 else None  # the pc_names stage's
        names = {row["direction"]: row["name"] for row in (naming or {}).get("directions", [])}
        for label, paths in (("pca", pcs), ("random", [run.direction(f"random{j:02d}") for j in range(len(pcs))])):
            paths = [p for p in paths if p.exists()]
            if not paths:
                continue
            images, rows_, cols_ = edit_grid(unet, scheduler, meta, sample, paths, f.scales, text=text)
            if label == "pca":
                rows_ = [f"{r} ≈ {names[r]}" if r in names else r for r in rows_]
            title = f"sample {sample}: {'principal components' if label == 'pca' else 'norm-matched random directions'}"
            add(save_grid(run.figure(f"{label}_grid.png"), grid_image(images, rows_, cols_, title=title)))
    for label, suffix in (("supervised", ""), ("disentangled", "_disentangled")):
        paths = [run.direction(a + suffix) for a in attrs]
        paths = [p for p in paths if p.exists()]
        if not paths:
            continue
        held = store.layout.n - max(cfg.directions.held_out_of(meta["config"]), 1)  # a held-out sample
        scales = [s for s in f.scales if abs(s) <= 2] or f.scales
        images, rows_, cols_ = edit_grid(unet, scheduler, meta, held, paths, scales, text=text)
        title = f"held-out sample {held}: {label} directions (eq. {'10' if label == 'supervised' else '11'})"
        add(save_grid(run.figure(f"{label}_grid.png"), grid_image(images, rows_, cols_, title=title)))
    paths = [run.direction(a) for a in attrs]
    if len(paths) > 1 and all(p.exists() for p in paths):
        held = store.layout.n - max(cfg.directions.held_out_of(meta["config"]), 1)
        images, rows_, cols_ = edit_grid(unet, scheduler, meta, held, paths, [], gammas=[1.0] * len(paths), text=text)
        title = f"held-out sample {held}: sequential edits (Fig. 11), gamma 1 each"
        add(save_grid(run.figure("sequential.png"), grid_image(images, rows_, cols_, title=title)))
    return files


# ----------------------------------------------------------------------------- the stage


def figures_stage(run: RunFolder, figures, directions, annotate, ctx: Context) -> dict:
    from types import SimpleNamespace

    sections = SimpleNamespace(figures=figures, directions=directions, annotate=annotate)
    with ctx.progress() as bar:
        job = bar.add_task("figures", total=None, rate="")
        files = pipeline_figures(
            run, sections, ctx.device, progress=lambda name, total: bar.update(job, advance=1, total=total, rate=name)
        )
    return {"outputs": outputs(run, files)}


def figures_cost(cfg) -> int:
    """U-Net sample-passes of the figures under ``cfg`` (a RunConfig), as ``pipeline_figures``
    renders them: the PCA and random grids, the supervised and disentangled grids (gammas
    |g| <= 2) and the sequential edit."""
    s, f, d = cfg.sample, cfg.figures, cfg.directions
    attrs = len(d.attributes) if d.latent == "h" else 0
    renders = 2 * min(f.pcs, cfg.pca.components) * len(f.scales) if cfg.pca.enabled else 0
    near = len([g for g in f.scales if abs(g) <= 2] or f.scales)
    renders += attrs * near * (1 + cfg.disentangle.enabled) + (attrs + 1) * (attrs > 1)
    return renders * s.steps


STAGE = Stage(
    "figures",
    sections=("figures", "directions", "annotate"),
    inputs=("pca", "directions", "disentangle", "annotate", "pc_names"),
    outputs=("figures",),
    body=figures_stage,
    cost=figures_cost,
    summary=lambda r: f"{len(r['outputs'])} files",
    command=False,
)
