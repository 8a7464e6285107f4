"""PC naming (paper sec. 4.1, Fig. 5): measure how much each direction moves every
attribute the annotator scores, and name it after the one it moves most."""

from __future__ import annotations

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.data.eval_folder import EvalFolder
from hspace.tasks.stages import Context, Stage, outputs


def name_run_directions(
    run: RunFolder,
    meta: dict,
    names: list[str],
    net,
    n: int,
    gamma: float,
    unet,
    scheduler,
    stem: str = "pc_names",
    text=None,
) -> tuple[list[dict], object]:
    """Name each direction after the attribute it moves most (hcore.metrics.name_by_spread)
    on the run's first ``n`` samples, each attribute measured in units of its spread over
    them; writes RUN/eval/STEM.{json,md}. Returns (table, path of the .md)."""
    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.stores import SampleStore
    from hspace.hcore import metrics
    from hspace.hcore.sampler import to_unit

    vectors = [v for v, _ in dirfile.load_run_directions(run, meta, names, unet, scheduler)]
    replay = models.replay_for_run(meta, text)
    changes = metrics.attribute_changes(unet, scheduler, net, replay, list(range(n)), vectors, gamma)
    scale = net.score(to_unit(SampleStore(run.samples).x0[:n])).numpy().std(0)
    table = metrics.name_by_spread(changes, list(net.names), names, scale)
    return table, EvalFolder(run.eval).write_naming(table, list(net.names), gamma, stem)


# ----------------------------------------------------------------------------- the stage


def name_stage(run: RunFolder, name, ctx: Context) -> dict:
    from hspace.data import models
    from hspace.data.annotators import load_annotator

    meta = run.read()
    require_sampled(meta, "hspace name")
    n = min(64, meta["config"]["n"]) if name.n is None else name.n
    if n > meta["config"]["n"]:
        raise RunError(f"--n must be in [1, {meta['config']['n']}] (samples in this run)")
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    text = models.text_for_run(meta, device=ctx.device)
    net = load_annotator(name.annotator, ctx.device)
    table, path = name_run_directions(run, meta, name.directions, net, n, name.gamma, unet, scheduler, text=text)
    names = [{"direction": r["direction"], "name": r["name"], "change": r["change"]} for r in table]
    return {"outputs": outputs(run, [path, path.with_suffix(".json")]), "names": names, "gamma": name.gamma}


def names_line(r: dict) -> str:
    return "; ".join(f"{x['direction']} ≈ {x['name']} ({x['change']:+.3f})" for x in r["names"])


STAGE = Stage(
    "name",
    sections=("name",),
    inputs=("pca", "sample"),
    outputs=("eval",),
    body=name_stage,
    summary=names_line,
    pipeline=False,
    doc="Measure how much each direction moves every attribute and name it (pc02 ~ yaw).",
)
