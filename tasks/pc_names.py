"""The PCs of a pipeline run named after the attribute each moves most (paper sec. 4.1 names
them by eye; hcore.metrics.name_by_spread measures it): eval/figure_pc_names.{json,md}, which
the PCA grid's rows show. ``hspace name`` does the same for any directions, on demand."""

from __future__ import annotations

from hspace.data import models
from hspace.data.catalog import RunFolder
from hspace.tasks.naming import name_run_directions, names_line
from hspace.tasks.stages import Context, Stage, outputs

STEM, GAMMA = "figure_pc_names", 2.0  # `hspace name` keeps eval/pc_names for itself


def named_pcs(run: RunFolder, f) -> list[str]:
    """The PCs the PCA grid shows (figures.pcs), as far as the run has them."""
    return [f"pc{j:02d}" for j in range(f.pcs) if run.direction(f"pc{j:02d}").exists()]


def pc_names_stage(run: RunFolder, figures, annotate, ctx: Context) -> dict:
    pcs = named_pcs(run, figures)
    if not (pcs and figures.name_samples > 0 and annotate.annotators):
        return {"outputs": [], "skipped": True}
    from hspace.data.annotators import load_annotator

    meta = run.read()
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    text = models.text_for_run(meta, device=ctx.device)
    net = load_annotator(annotate.annotators[0], ctx.device)
    n = min(figures.name_samples, meta["config"]["n"])
    with ctx.progress() as bar:
        bar.add_task(f"naming {len(pcs)} PCs on {n} samples", total=None, rate="")
        table, path = name_run_directions(run, meta, pcs, net, n, GAMMA, unet, scheduler, stem=STEM, text=text)
    names = [{"direction": r["direction"], "name": r["name"], "change": r["change"]} for r in table]
    return {"outputs": outputs(run, [path, path.with_suffix(".json")]), "names": names, "gamma": GAMMA}


def pc_names_cost(cfg) -> int:
    """One render up and one down per PC and sample (hcore.metrics.attribute_changes)."""
    f = cfg.figures
    if not (cfg.pca.enabled and f.pcs and f.name_samples and cfg.annotate.annotators):
        return 0
    return 2 * min(f.pcs, cfg.pca.components) * min(f.name_samples, cfg.sample.n) * cfg.sample.steps


STAGE = Stage(
    "pc_names",
    sections=("figures", "annotate"),
    inputs=("pca",),
    outputs=("eval",),
    body=pc_names_stage,
    cost=pc_names_cost,
    summary=lambda r: "" if r.get("skipped") else names_line(r),
    command=False,
)
