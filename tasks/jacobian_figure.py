"""Fig. 7 of a pipeline run: the top Jacobian directions of one sample (paper sec. 4.2,
Alg. 1: jacobian.zarr and directions/jac_*), applied to it and to three other samples
(figures/jacobian_grid.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data import models
from hspace.data.catalog import RunFolder
from hspace.data.figures import grid_image, save_grid
from hspace.data.stores import SampleStore
from hspace.tasks.figures import edit_grid
from hspace.tasks.jacobian import jacobian_line
from hspace.tasks.stages import Context, Stage, outputs

GRID_ROWS, GRID_GAMMAS = 4, 5  # the sample and three others, at 5 strengths


def jacobian_grid(run: RunFolder, meta: dict, unet, scheduler, store, sample: int, f, device: str, text=None):
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
    shown = [sample] + [j for j in range(store.layout.n) if j != sample][: GRID_ROWS - 1]
    rows = [edit_grid(unet, scheduler, meta, j, [top], scales, text=text)[0][0] for j in shown]
    title = f"top Jacobian direction of sample {sample} at step {step} (sigma {result['singular_values'][0]:.3g})"
    image = grid_image(np.stack(rows), [f"sample {j}" for j in shown], [f"g={x:+.0f}" for x in scales], title=title)
    return save_grid(run.figure("jacobian_grid.png"), image), result


# ----------------------------------------------------------------------------- the stage


def jacobian_figure_stage(run: RunFolder, figures, ctx: Context) -> dict:
    if not figures.jacobian:
        return {"outputs": [], "skipped": True}
    meta = run.read()
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    text = models.text_for_run(meta, device=ctx.device)
    store = SampleStore(run.samples)
    with ctx.progress() as bar:
        bar.add_task("Fig. 7 (Jacobian and its grid)", total=None, rate="")
        sample = min(figures.sample, store.layout.n - 1)
        path, result = jacobian_grid(run, meta, unet, scheduler, store, sample, figures, ctx.device, text)
    result.pop("share_inside", None)
    return {"outputs": outputs(run, [run.jacobian, *result.pop("directions"), path]), **result}


def jacobian_figure_cost(cfg) -> int:
    """U-Net sample-passes of Fig. 7's grid; the Jacobian's own iterations stop at a
    tolerance and are not counted."""
    return min(GRID_ROWS, cfg.sample.n) * GRID_GAMMAS * cfg.sample.steps if cfg.figures.jacobian else 0


STAGE = Stage(
    "jacobian_figure",
    sections=("figures",),
    inputs=("sample",),
    outputs=("jacobian", "directions", "figures"),
    body=jacobian_figure_stage,
    cost=jacobian_figure_cost,
    summary=lambda r: "" if r.get("skipped") else jacobian_line(r),
    command=False,
)
