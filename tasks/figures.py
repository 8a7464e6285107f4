"""Figures of a pipeline run (RUN/figures/): the sample grid, PCA and random-direction
edit grids (Fig. 6) with PCs named after the attribute they move, supervised and
disentangled grids, and a sequential edit (Fig. 11)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hspace.data import models
from hspace.data.catalog import RunFolder
from hspace.data.figures import grid_image, save_grid
from hspace.data.stores import SampleStore
from hspace.tasks.progress import progress_bar
from hspace.tasks.stages import Context, Stage, outputs

# Fig. 8 in the figures: the pairs n it is built from, the held-out samples it edits, and the
# pool redrawn at eta 0 when the run was sampled stochastically
EFFICIENCY_NS, EFFICIENCY_HELD, EFFICIENCY_POOL = (1, 3, 10, 30), 32, 128


def _edit_grid(unet, scheduler, meta: dict, sample: int, paths: list[Path], scales, gammas=None, text=None):
    from hspace.hcore.hooks import h_shape
    from hspace.tasks import edit as edit_tasks

    cfg = meta["config"]
    spec = edit_tasks.SampleSpec(models.replay_for_run(meta, text), sample)
    specs = [edit_tasks.DirectionSpec(p.stem, p, None if gammas is None else gammas[i]) for i, p in enumerate(paths)]
    vectors = edit_tasks.load_directions(
        specs,
        model_fingerprint=meta["model"]["fingerprint"],
        steps=cfg["steps"],
        h_shape=h_shape(unet),
        h_point=cfg["h_point"],
        scheduler=scheduler,
        edit_branch=cfg.get("edit_branch"),
    )
    cells, rows, cols = edit_tasks.plan_grid(specs, list(scales))
    return edit_tasks.render_edits(unet, scheduler, spec, vectors, cells), rows, cols


def pipeline_figures(run: RunFolder, cfg, device: str = "cpu", progress=None) -> list[Path]:
    """Write the figures for ``cfg`` (its figures, directions and annotate sections);
    returns their paths. progress(name, total): called as each figure is written."""
    from hspace.tasks import naming as ev

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
    efficiency = bool(f.efficiency and attrs and cfg.annotate.annotators)
    jacobian = bool(f.jacobian)
    planned = (  # the figures below, for the progress bar's total
        1
        + (bool(pcs) and f.name_samples > 0 and bool(cfg.annotate.annotators))
        + bool(pcs)
        + (bool(pcs) and run.direction("random00").exists())
        + sum(any(run.direction(a + suffix).exists() for a in attrs) for suffix in ("", "_disentangled"))
        + (len(attrs) > 1 and all(run.direction(a).exists() for a in attrs))
        + jacobian
        + efficiency
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
        names = {}
        if f.name_samples > 0 and cfg.annotate.annotators:
            from hspace.data.annotators import load_annotator

            net = load_annotator(cfg.annotate.annotators[0], device)
            n = min(f.name_samples, store.layout.n)
            stems = [p.stem for p in pcs]  # own file: `hspace name` keeps eval/pc_names
            table, path = ev.name_run_directions(
                run, meta, stems, net, n, 2.0, unet, scheduler, stem="figure_pc_names", text=text
            )
            names = {row["direction"]: row["name"] for row in table}
            add(path)
        for label, paths in (("pca", pcs), ("random", [run.direction(f"random{j:02d}") for j in range(len(pcs))])):
            paths = [p for p in paths if p.exists()]
            if not paths:
                continue
            images, rows_, cols_ = _edit_grid(unet, scheduler, meta, sample, paths, f.scales, text=text)
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
        images, rows_, cols_ = _edit_grid(unet, scheduler, meta, held, paths, scales, text=text)
        title = f"held-out sample {held}: {label} directions (eq. {'10' if label == 'supervised' else '11'})"
        add(save_grid(run.figure(f"{label}_grid.png"), grid_image(images, rows_, cols_, title=title)))
    paths = [run.direction(a) for a in attrs]
    if len(paths) > 1 and all(p.exists() for p in paths):
        held = store.layout.n - max(cfg.directions.held_out_of(meta["config"]), 1)
        images, rows_, cols_ = _edit_grid(unet, scheduler, meta, held, paths, [], gammas=[1.0] * len(paths), text=text)
        title = f"held-out sample {held}: sequential edits (Fig. 11), gamma 1 each"
        add(save_grid(run.figure("sequential.png"), grid_image(images, rows_, cols_, title=title)))
    if jacobian:
        add(_jacobian_grid(run, meta, unet, scheduler, store, sample, f, device, text))
    if efficiency:
        from hspace.data.figures import efficiency_plot
        from hspace.tasks.efficiency import sample_efficiency

        result = sample_efficiency(
            str(run.root),
            attrs[0],
            cfg.directions.held_out_of(meta["config"]),
            1.0,
            cfg.annotate.annotators[0],
            EFFICIENCY_NS,
            device,
            max_samples=EFFICIENCY_HELD,
            pool=EFFICIENCY_POOL,
        )
        run.figure("sample_efficiency.json").write_text(json.dumps(result, indent=2))
        add(run.figure("sample_efficiency.json"), efficiency_plot(result, run.figure("sample_efficiency.png")))
    return files


def _jacobian_grid(run: RunFolder, meta: dict, unet, scheduler, store, sample: int, f, device: str, text=None) -> Path:
    """Fig. 7: the top Jacobian direction of ``sample`` (Alg. 1) applied to it and to three
    other samples; gamma up to half the mean norm of h at that step."""
    from hspace.tasks.jacobian import run_jacobian

    steps = meta["config"]["steps"]
    step = min(f.jacobian_step if f.jacobian_step is not None else steps // 5, steps - 1)
    result = run_jacobian(str(run.root), sample, step, f.jacobian_k, device=device)
    top = Path(result["directions"][0])
    k = min(16, store.layout.n)
    h = store.h[:k, step].astype(np.float32).reshape(k, -1)
    g = 0.5 * float(np.linalg.norm(h, axis=1).mean())
    scales = [-g, -g / 2, 0.0, g / 2, g]
    shown = [sample] + [j for j in range(store.layout.n) if j != sample][:3]
    rows = [_edit_grid(unet, scheduler, meta, j, [top], scales, text=text)[0][0] for j in shown]
    title = f"top Jacobian direction of sample {sample} at step {step} (sigma {result['singular_values'][0]:.3g})"
    image = grid_image(np.stack(rows), [f"sample {j}" for j in shown], [f"g={x:+.0f}" for x in scales], title=title)
    return save_grid(run.figure("jacobian_grid.png"), image)


# ----------------------------------------------------------------------------- the stage


def figures_stage(run: RunFolder, figures, directions, annotate, ctx: Context) -> dict:
    from types import SimpleNamespace

    sections = SimpleNamespace(figures=figures, directions=directions, annotate=annotate)
    with progress_bar(disable=not ctx.show_progress) as bar:
        job = bar.add_task("figures", total=None, rate="")
        files = pipeline_figures(
            run, sections, ctx.device, progress=lambda name, total: bar.update(job, advance=1, total=total, rate=name)
        )
    return {"outputs": outputs(run, files)}


def figures_cost(cfg) -> int:
    """U-Net sample-passes of the figures under ``cfg`` (a RunConfig), as ``pipeline_figures``
    renders them: the PCA and random grids and the naming of the PCs (one render up and one
    down per PC and sample), the supervised and disentangled grids (gammas |g| <= 2) and the
    sequential edit, Fig. 8 (at eta 0: a stochastic run's first samples redrawn, then the
    held-out ones unedited and edited along h and x_T for each n) and Fig. 7's rows (4 samples,
    5 gammas). The Jacobian itself is the jacobian command's work: its iterations stop at a
    tolerance and are not counted."""
    from hspace.hcore.sampler import eta_schedule

    s, f, d = cfg.sample, cfg.figures, cfg.directions
    attrs = len(d.attributes) if d.latent == "h" else 0
    scored = bool(cfg.annotate.annotators)
    renders = 0
    if cfg.pca.enabled and f.pcs:
        pcs = min(f.pcs, cfg.pca.components)
        renders += 2 * pcs * len(f.scales) + 2 * pcs * min(f.name_samples, s.n) * scored
    near = len([g for g in f.scales if abs(g) <= 2] or f.scales)
    renders += attrs * near * (1 + cfg.disentangle.enabled) + (attrs + 1) * (attrs > 1)
    if f.efficiency and attrs and scored:
        held = d.held_out_of({})
        ranked = s.n - held
        deterministic = not any(eta_schedule(s.eta, s.steps))
        if not deterministic:
            ranked = min(ranked, EFFICIENCY_POOL)
            renders += ranked
        ns = [k for k in EFFICIENCY_NS if k <= ranked // 2]
        renders += min(EFFICIENCY_HELD, held) * (1 + 2 * len(ns))
    if f.jacobian and s.n > 0:
        renders += min(4, s.n) * 5
    return renders * s.steps


STAGE = Stage(
    "figures",
    order=80,
    sections=("figures", "directions", "annotate"),
    inputs=("pca", "directions", "disentangle", "annotate"),
    outputs=("figures",),
    # Fig. 7 runs the Jacobian (jacobian.zarr, directions/jac_*), the PCA grid names its rows
    # (eval/figure_pc_names.*): declared here until they are stages of their own
    also_writes=("jacobian", "directions", "eval"),
    body=figures_stage,
    cost=figures_cost,
    summary=lambda r: f"{len(r['outputs'])} files",
    command=False,
)
