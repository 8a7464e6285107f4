"""`hspace layers RUN`: the layer map. Where in the denoiser is h most semantic, and is it the
bottleneck, as Haas et al. assume (sec. 3)? For every point of ``layers.points`` (default: each
down block's output, the mid block's, each up block's), on the run's own samples and labels:

- h_{T:1} at every point captured in one replay of the run's first ``samples`` samples (hooks
  that only read: the samples are the run's), stored side by side in RUN/layers/h.zarr, one
  array per point (float16; a guided model's conditional half, as samples.zarr holds h);
- ``probe``: per binary attribute, the 5-fold accuracy of a linear probe on the samples' top
  64 principal-axis scores of h_{T:1} at the point (hcore.layers), the labels the run's
  annotator's score > 0.5;
- ``pca_vs_random``: the top ``components`` per-step principal axes at the point as directions
  (one standard deviation, hcore.pca.directions_from_pca) against their norm-matched random
  baseline (Fig. 6): the mean over directions of the largest attribute change in units of that
  attribute's spread over the run, PCs over randoms (Haas et al.'s "PCs are semantic" figure);
- per attribute, eq. (10)'s direction at the point (the top and bottom quarter of the samples
  by score; saved as RUN/directions/layers/POINT/ATTR.safetensors, h_point POINT: `hspace edit
  RUN --direction` edits there), its strength calibrated on ``calibration_n`` held-out samples to
  the own change ``target`` (interpolated on the grid GAMMAS, hcore.layers.interpolate_gamma),
  then on ``n`` other held-out samples: own change, leakage (the other binary attributes' mean
  |change|), pose drift and PSNR against the unedited render;
- bytes per sample: what storing h_{T:1} at the point costs (float16).

RUN/layers/table.json and table.csv hold one row per point, RUN/layers/layers.png draws the
measures (rows) over the points (columns).
"""

from __future__ import annotations

import json

import numpy as np

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs

GAMMAS = (0.25, 0.5, 1.0, 2.0, 4.0)  # eq. (10)'s strength grid (gamma 1: the mean difference itself)
PROBE_DIMS = 64
PCA_GAMMA = 1.0  # PCA and random directions at one standard deviation


def default_points(unet) -> list[str]:
    """Each down block's output, the mid block's, each up block's: the U-Net's levels in order."""
    downs = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    ups = [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return [*downs, "mid_block", *ups]


def problems(section, n: int) -> list[str]:
    """What in ``layers`` cannot run on a run of ``n`` samples (the model not loaded)."""
    p = []
    if section.samples + section.n + section.calibration_n > n:
        p.append(
            f"layers: samples {section.samples} + n {section.n} + calibration_n {section.calibration_n} exceed the "
            f"run's {n} samples (lower them, or sample more)"
        )
    if section.samples < 8:
        p.append(f"layers.samples: {section.samples}: the probes' 5 folds and eq. (10)'s quarters need >= 8")
    return p


def resolved_points(section, unet) -> dict[str, tuple[int, ...]]:
    """{point: the shape of one sample's h there}; RunError naming a bad point (hcore.hooks)."""
    from hspace.hcore.hooks import HPointError, h_shape

    points = list(section.points) or default_points(unet)
    try:
        return {p: tuple(h_shape(unet, p)) for p in points}
    except HPointError as e:
        raise RunError(f"layers.points: {e}") from None


def config_problems(cfg, unet) -> list[str]:
    """The layers section (none without one) of `hspace run`'s config, against its model."""
    if cfg.layers is None:
        return []
    found = problems(cfg.layers, cfg.sample.n)
    try:
        found or resolved_points(cfg.layers, unet)
    except RunError as e:
        found.append(str(e))
    return found


def check(run: RunFolder, cfg, ctx) -> None:
    """`hspace layers RUN` (this stage alone): the section against the run, its model and its
    annotations, which must exist."""
    if cfg.layers is None or not run.run_json.exists():
        return
    from hspace.data import models
    from hspace.tasks.supervised import attribute_scores

    meta = run.read()
    found = problems(cfg.layers, meta["config"]["n"])
    if found:
        raise RunError(found[0])
    resolved_points(cfg.layers, models.load_for_run(meta)[0])
    attribute_scores(run, cfg.layers.attributes, "layers.attributes")  # (`hspace layers` alone: annotated first)


def capture(run, meta, replay, unet, scheduler, points: dict, n: int, ctx) -> dict:
    """h_{T:1} of the run's samples 0..n-1 at every point, written to RUN/layers/h.zarr; the arrays."""
    import contextlib

    import torch

    from hspace.data.layers import LayerStore
    from hspace.hcore.hooks import HSpaceHook

    store = LayerStore.create(run.layers / "h.zarr", n, meta["config"]["steps"], points)
    batch = max(1, min(meta["config"]["batch_size"], 32))
    with ctx.progress() as bar:
        job = bar.add_task("layers (capture h)", total=n, rate="")
        for first in range(0, n, batch):
            idx = list(range(first, min(n, first + batch)))
            seen = {p: [] for p in points}
            with torch.no_grad(), contextlib.ExitStack() as hooks:
                for p in points:
                    hooks.enter_context(HSpaceHook(unet, point=p, on_h=seen[p].append))
                replay.render(unet, scheduler, idx)
            for p, hs in seen.items():
                if len(hs) != replay.steps:
                    raise RunError(f"layers: {p} ran {len(hs)} times in {replay.steps} steps; a point inside a loop?")
                steps = [h[-len(idx) :] for h in hs]  # a guided batch [uncond; cond]: the conditional half
                store.write(p, first, torch.stack(steps, 1).float().cpu().numpy())
            bar.advance(job, len(idx))
    return store


def layers_stage(run: RunFolder, layers, ctx: Context) -> dict:
    if layers is None:
        return {"outputs": [], "skipped": True}
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.data.disk import require_space
    from hspace.data.layers import layer_bytes
    from hspace.tasks.supervised import attribute_scores

    meta = run.read()
    require_sampled(meta, "hspace layers")
    cfg = meta["config"]
    found = problems(layers, cfg["n"])
    if found:
        raise RunError(found[0])
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    points = resolved_points(layers, unet)
    scores, names = attribute_scores(run, layers.attributes, "layers.attributes")
    attributes = list(layers.attributes)
    replay = models.replay_for_run(meta, device=ctx.device)
    net = load_annotator(layers.evaluator, ctx.device)
    need = layer_bytes(layers.samples, cfg["steps"], points, len(attributes))
    require_space(run.root, need, f"the layer map ({len(points)} points, {layers.samples} samples)")
    store = capture(run, meta, replay, unet, scheduler, points, layers.samples, ctx)
    held = list(range(cfg["n"] - layers.n - layers.calibration_n, cfg["n"]))
    judge = Judge(unet, scheduler, replay, net, held[: layers.n], held[layers.n :])
    spread = np.maximum(scores[:, [names.index(c) for c in net.names if c in names]].std(0), 1e-6)
    rows = []
    with ctx.progress() as bar:
        job = bar.add_task("layers (points)", total=len(points), rate="")
        for point, shape in points.items():
            ctx.log(f"layers: {point}")
            step = lambda t, p=point: store.read_step(p, t)  # noqa: E731  (one step of h in memory at a time)
            rows.append(measure(run, meta, point, shape, step, scores[: layers.samples], names, attributes, layers,
                                judge, spread))  # fmt: skip
            bar.advance(job)
    return {"outputs": outputs(run, write(run, rows, layers.target)), "rows": rows}


class Judge:
    """Renders held-out samples edited at a point and scores them against their unedited renders."""

    def __init__(self, unet, scheduler, replay, net, indices: list[int], cal: list[int]):
        import dataclasses

        self.unet, self.scheduler, self.net, self.indices, self.cal = unet, scheduler, net, indices, cal
        self.replay, self.at = replay, lambda p: dataclasses.replace(replay, h_point=p)
        self.degrees = set(getattr(net, "degrees", ()))
        self.base = {k: self._render(replay, idx, None) for k, idx in (("n", indices), ("cal", cal))}

    def _render(self, replay, idx, action):
        from hspace.hcore.sampler import to_uint8

        how = {} if action is None else {"edit": action}
        x0 = replay.render(self.unet, self.scheduler, idx, **how)
        return to_uint8(x0).cpu().numpy(), self.net.score(x0).numpy()

    def edited(self, point: str, v, gamma: float, which: str = "n") -> tuple[np.ndarray, np.ndarray]:
        """(images, scores (B, A)) of the ``which`` samples ("n" or "cal") edited at ``gamma``
        along ``v`` at ``point``."""
        from hspace.hcore.edits.directions import HDirection

        idx = self.indices if which == "n" else self.cal
        return self._render(self.at(point), idx, HDirection(v).action(gamma))

    def change(self, point: str, v, gamma: float, which: str = "n") -> np.ndarray:
        """Every score's change (B, A) against the unedited renders (``edited``)."""
        return self.edited(point, v, gamma, which)[1] - self.base[which][1]


def measure(run, meta, point, shape, step, scores, names, attributes, layers, judge: Judge, spread) -> dict:
    """One row of the layer map (the module's docstring); ``step(t)``: the samples' h_t (N, *shape)."""
    import math

    import torch

    from hspace.data import directions as dirfile
    from hspace.data.layers import layer_file
    from hspace.hcore import layers as science
    from hspace.hcore.pca import directions_from_pca, random_directions
    from hspace.hcore.supervised import top_bottom
    from hspace.tasks.compare import edit_change

    n, steps = len(scores), meta["config"]["steps"]
    net_names = list(judge.net.names)
    binary = [j for j, c in enumerate(net_names) if c not in judge.degrees]
    row = {"point": point, "shape": list(shape), "bytes_per_sample": steps * math.prod(shape) * 2}
    pcs = science.gram_scores(step, steps, PROBE_DIMS)
    row["probe"] = {a: science.probe(pcs, scores[:, names.index(a)] > 0.5) for a in attributes}
    axes, std = science.step_pca(lambda t: step(t).reshape(n, -1), steps, layers.components)
    relative = {}
    for kind, dirs in (("pca", directions_from_pca(axes, std)), ("random", random_directions(std, axes.shape[2]))):
        rel = []
        for v in dirs:
            delta = judge.change(point, torch.from_numpy(v.reshape(steps, *shape)), PCA_GAMMA)
            rel.append(float(np.max(np.abs(delta.mean(0)[binary]) / spread[binary])))
        relative[kind] = float(np.mean(rel))
    row["pca_vs_random"] = relative["pca"] / max(relative["random"], 1e-9)
    row["edits"] = {}
    k = max(1, n // 4)
    quarters = {}
    for a in attributes:
        try:
            quarters[a] = top_bottom(scores[:, names.index(a)], k)
        except ValueError as e:  # tied scores across the quarter's cut
            raise RunError(f"layers: {a}: {e}") from None
    means = {a: [] for a in attributes}  # eq. (10) at every step, all attributes in one pass over h
    for t in range(steps):
        h = step(t)
        for a, (top, bottom) in quarters.items():
            means[a].append(h[top].mean(0) - h[bottom].mean(0))
    for a in attributes:
        j = net_names.index(a)
        v = torch.from_numpy(np.stack(means.pop(a)))
        info = dirfile.metadata_for_run(meta, f"eq. (10) at {point} (hspace layers)", "layers", "1: the difference")
        dirfile.save(layer_file(run, point, a), v, info | {"h_point": point, "attribute": a, "top": k})
        effects = [float(judge.change(point, v, g, "cal")[:, j].mean()) for g in GAMMAS]
        gamma = science.interpolate_gamma(GAMMAS, effects, layers.target)
        images, edited = judge.edited(point, v, gamma if gamma is not None else GAMMAS[-1])
        judged = edit_change(edited, judge.base["n"][1], images, judge.base["n"][0], j, net_names, judge.degrees)
        row["edits"][a] = {"gamma": gamma, "calibrated": gamma is not None, **judged}
    return row


def write(run: RunFolder, rows: list[dict], target: float) -> list:
    """RUN/layers/table.{json,csv} and layers.png."""
    import csv

    folder = run.layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.json").write_text(json.dumps(rows, indent=1))
    flat = [flat_row(r) for r in rows]
    with open(folder / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    plot(flat, folder / "layers.png", target)
    return [folder / "h.zarr", folder / "table.json", folder / "table.csv", folder / "layers.png"]


MEASURES = ("probe", "pca_vs_random", "own_change", "leakage", "psnr_db", "MB_per_sample")


def flat_row(r: dict) -> dict:
    """A point's row as numbers: means over the attributes (leakage and PSNR at the calibrated edits only)."""
    probes = [v for v in r["probe"].values() if v is not None]
    done = [e for e in r["edits"].values() if e["calibrated"]]
    mean = lambda key, es: float(np.mean([e[key] for e in es])) if es else float("nan")  # noqa: E731
    return {"point": r["point"], "probe": float(np.mean(probes)) if probes else float("nan"),
            "pca_vs_random": r["pca_vs_random"], "calibrated": f"{len(done)}/{len(r['edits'])}",
            "own_change": mean("own_change", done), "leakage": mean("leakage", done), "psnr_db": mean("psnr_db", done),
            "MB_per_sample": r["bytes_per_sample"] / 1e6}  # fmt: skip


def plot(flat: list[dict], path, target: float) -> None:
    """Measures (rows) over points (columns): each row coloured from its worst to its best point
    (the own change: by its distance from ``target``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array([[r[m] for r in flat] for m in MEASURES], dtype=float)
    better_low = {"leakage", "MB_per_sample", "own_change"}
    shade = np.zeros_like(values)
    for i, m in enumerate(MEASURES):
        row = np.abs(values[i] - target) if m == "own_change" else values[i]
        finite = row[np.isfinite(row)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        shade[i] = 0.5 if hi == lo else (row - lo) / (hi - lo)
        if m in better_low:
            shade[i] = 1 - shade[i]
    fig, ax = plt.subplots(figsize=(1.2 * len(flat) + 2, 3.6))
    ax.imshow(np.nan_to_num(shade, nan=0.5), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(MEASURES)):
        for j in range(len(flat)):
            shown = "–" if np.isnan(values[i, j]) else f"{values[i, j]:.3g}"
            ax.text(j, i, shown, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(flat)), [r["point"] for r in flat], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(MEASURES)), ["probe accuracy", "PCs / random", f"own change (to {target:g})",
                                          "leakage (at target)",
                                          "PSNR (dB)", "MB per sample"], fontsize=8)  # fmt: skip
    ax.set_title("the layer map: where h is semantic (green: best point of each row)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layers_line(result: dict) -> str:
    if result.get("skipped"):
        return ""
    flat = [flat_row(r) for r in result["rows"]]
    best = max(flat, key=lambda r: (np.nan_to_num(r["probe"]), -np.nan_to_num(r["leakage"], nan=9)))
    clean = min(flat, key=lambda r: np.nan_to_num(r["leakage"], nan=9))
    return (f"most readable {best['point']} (probe {best['probe']:.3f}); cleanest edit {clean['point']} "
            f"(leakage {clean['leakage']:.3f})")  # fmt: skip


def layers_cost(cfg) -> int:
    """U-Net sample-passes: one zero sample per point, its shape probed (hcore.hooks.h_shape,
    stopped at the point); the capture of ``samples``; the unedited held-out renders; per point
    2 x components PCA and random edits of ``n``; per attribute and point the calibration grid
    on ``calibration_n`` and the edit on ``n``."""
    s = cfg.layers
    if s is None:
        return 0
    per_point = 2 * s.components * s.n + len(s.attributes) * (len(GAMMAS) * s.calibration_n + s.n)
    points = len(s.points) or block_count(cfg.sample.model)
    return points + cfg.sample.steps * (s.samples + s.n + s.calibration_n + points * per_point)


def block_count(model: str) -> int:
    """How many points the default map has (down blocks, mid, up blocks), from the model's config."""
    from hspace.data import models

    config = models.unet_config(models.resolve(model))
    return len(config["down_block_types"]) + 1 + len(config["up_block_types"])


STAGE = Stage(
    "layers",
    sections=("layers",),
    inputs=("sample", "annotate"),
    outputs=("layers", "directions"),
    body=layers_stage,
    summary=layers_line,
    cost=layers_cost,
    check=check,
    doc="The layer map: h at every block of the denoiser (or layers.points) on the run's samples: linear probes, PCs "
    "against random directions, eq. (10) edits calibrated to one own change (leakage, PSNR) and bytes per sample; "
    "RUN/layers/table.{json,csv}, layers.png and RUN/directions/layers/POINT/ATTR.",
)
