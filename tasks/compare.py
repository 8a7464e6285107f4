"""`hspace compare`: every editing method side by side, judged against the truth.

For each attribute and each registered editing method that fits the run's model, on the same
held-out samples (samples no direction was built from): the method's strength is calibrated on
other held-out samples until the judge (the toy worlds' oracle, or any annotator) sees the
attribute move by ``target`` (as evaluate's ``gamma: auto``, hcore.calibrate), then it edits the
evaluation samples at that strength and is scored: its own change, leakage (the mean |change| of
every other attribute), pose drift (mean |change| of the angles, degrees), preservation (PSNR
and SSIM against the unedited render) and seconds per edit (and as a multiple of a plain render
of the same samples, measured in the same run).

A method joins by being registered (hcore.edits): what it needs decides how it is made here. A
direction: the run's eq. (10) file of the attribute (``ATTR``, or ``ATTR_xT`` for a method acting
on x_T; the h method also with ``ATTR_prompt`` and ``ATTR_disentangled`` where they exist); a
prompt pair: the target of the attribute's prompt pair (the metadata of its direction file
``ATTR_prompt``, from ``directions.prompt_pairs``; the source: the sample's own prompt); a
source: the sample's own unedited output, denoised again under that target prompt; nothing:
where the method names the attribute. What the run holds for the attribute makes two more: its
AVI predictor (directions/avi/ATTR, `hspace avi`) the method avi, and the latent-svd probe whose
scaling raised it most (latent_svd/properties.json) the method sv-scale at that step and index.
What does not fit is listed with the reason.

Calibration flags: "calibrated" (the own change on the calibration samples within 0.05 of the
target; the search stops within half of that), "missed" (the closest strength found is further:
a method whose strength moves in steps, an injection share of few sampling steps, can jump past
the target), "unreachable" (not even its strongest edit gets there: scored at the strength of
its largest change).
"""

from __future__ import annotations

import csv
import json
import time
from typing import TYPE_CHECKING

import numpy as np

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs

if TYPE_CHECKING:
    from hspace.hcore.edits import Bound


def entries(cls_by_name: dict, attribute: str, files: dict, pair: tuple | None, text, source, scheduler, found=None):
    """(the methods that fit, [(label, why not)]) for one attribute. ``files``: direction name ->
    tensor; ``pair``: the attribute's prompt pair; ``source(indices)``: the samples' outputs;
    ``found``: method name -> (indices -> the made method) where the run holds what makes it for
    this attribute (a trained predictor; the latent-svd probe that moves it most)."""
    from hspace.hcore.edits import Bound

    fit, skipped, found = [], [], found or {}
    for name, cls in sorted(cls_by_name.items()):
        needs = set(cls.needs)
        if name in found:
            fit.append(Bound(name, cls, found[name]))
        elif "weights" in needs:
            skipped.append((name, f"no trained file for {attribute} ({cls.trainer.replace('ATTR', attribute)})"))
        elif needs == {"direction"}:
            own = f"{attribute}_xT" if cls.acts_on == "x_T" else attribute
            names = [own] + ([f"{attribute}_prompt", f"{attribute}_disentangled"] if name == "h" else [])
            made = [(n, files[n]) for n in names if n in files]
            if not made:
                skipped.append((name, f"no direction file {own}"))
            for n, v in made:
                label = name if n == own else f"{name}:{n.removeprefix(attribute + '_')}"
                fit.append(Bound(label, cls, lambda idx, v=v, cls=cls: cls.from_direction(v)))
        elif needs in ({"prompt_pair"}, {"source"}) and (text is None or pair is None):
            why = "needs a text-conditioned model" if text is None else f"no prompt-pair direction {attribute}_prompt"
            skipped.append((name, why))
        elif needs == {"prompt_pair"}:
            fit.append(Bound(name, cls, lambda idx, cls=cls: cls.from_prompt(pair[1], text.tokenizers[0])))
        elif needs == {"source"}:
            fit.append(Bound(name, cls, lambda idx, cls=cls: cls.from_source(source(idx), scheduler), prompt=pair[1]))
        elif not needs and cls.attribute == attribute:
            fit.append(Bound(name, cls, lambda idx, cls=cls: cls()))
        elif not needs and name == "sv-scale":
            skipped.append((name, "no latent-svd probe of this attribute (hspace latent-svd RUN)"))
        elif needs:
            skipped.append((name, f"needs {', '.join(sorted(needs))}, which the comparison does not give"))
    return fit, skipped


def findings(run: RunFolder, meta: dict, attribute: str, replay, unet, scheduler) -> dict:
    """What the run holds that makes a method for ``attribute``: its AVI predictor
    (directions/avi/ATTR, `hspace avi --name ATTR`), every other trained editor
    (directions/METHOD/ATTR: `hspace clip-edits`, `hspace diffae`) and the latent-svd probe (step, index) whose
    scaling raised it most (latent_svd/properties.json, made as sv-scale at that step and index)."""
    from hspace.data import directions as dirfile
    from hspace.data.stores import LatentSvdStore
    from hspace.hcore.edits import get, methods, once_per_indices

    found = {}
    path = dirfile.predictor_file(run, attribute)
    if path.exists():
        f, _ = dirfile.load_predictor(path, meta["model"]["fingerprint"], replay.steps)
        avi = get("avi")
        found["avi"] = once_per_indices(lambda idx: avi.from_replay(replay, unet, scheduler, idx, f, attribute))
    for method in sorted(m for m, cls in methods().items() if "weights" in cls.needs and m != "avi"):
        path = dirfile.trained_file(run, method, attribute)
        if path.exists():
            cls, trained, _ = dirfile.load_trained(path, meta["model"]["fingerprint"], replay.steps, unet.device)
            build = lambda idx, cls=cls, w=trained: cls.from_replay(replay, unet, scheduler, idx, w, attribute)  # noqa: E731
            found[method] = once_per_indices(build)
    props_file = LatentSvdStore(run.latent_svd).file("properties.json")
    if props_file.exists():
        props = json.loads(props_file.read_text())
        if attribute in props["factors"]:
            effects = np.array(props["effects_mean"])[:, :, props["factors"].index(attribute)]  # (T, m)
            signed = effects * np.sign(props["probe_scale"] or 1.0)  # the probe that raises it
            step, index = map(int, np.unravel_index(signed.argmax(), signed.shape))
            sv = get("sv-scale")
            found["sv-scale"] = lambda idx: sv(index=index, step=step, attribute=attribute)
    return found


class Judge:
    """Renders held-out samples under a method and scores them against the unedited renders."""

    def __init__(self, unet, scheduler, replay, net, attribute: str):
        self.unet, self.scheduler, self.replay, self.net = unet, scheduler, replay, net
        self.columns = list(net.names)
        self.degrees = [c for c in getattr(net, "degrees", ()) if c in self.columns]
        self.col = self.columns.index(attribute)
        self.base: dict = {}

    def render(self, indices: list[int], entry: Bound | None = None, strength: float = 0.0):
        """(uint8 images (B, 3, R, R), scores (B, A), seconds)."""
        from hspace.hcore.sampler import to_uint8

        how = {} if entry is None else {"edit": entry.make(indices).action(strength)}
        if entry is not None and entry.prompt is not None:
            how["prompts"] = [entry.prompt] * len(indices)
        start = time.perf_counter()
        x0 = self.replay.render(self.unet, self.scheduler, indices, **how)
        seconds = time.perf_counter() - start
        return to_uint8(x0).cpu().numpy(), self.net.score(x0).numpy(), seconds

    def unedited(self, indices: list[int]):
        key = tuple(indices)
        if key not in self.base:
            self.base[key] = self.render(indices)
        return self.base[key]

    def effect(self, entry: Bound, indices: list[int], s: float) -> float:
        """The mean change of the attribute at calibration strength s (see ``strength``)."""
        _, scores, _ = self.render(indices, entry, strength(entry, s))
        return float((scores[:, self.col] - self.unedited(indices)[1][:, self.col]).mean())

    def score(self, entry: Bound, indices: list[int], s: float, timed: bool = True) -> dict:
        from hspace.data.photos import ssim

        images, scores, seconds = self.render(indices, entry, strength(entry, s))
        base_images, base_scores, _ = self.unedited(indices)
        base_seconds = self.render(indices)[2] if timed else seconds  # a plain render timed beside the edit
        return {
            **edit_change(scores, base_scores, images, base_images, self.col, self.columns, self.degrees),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, base_images, strict=True)])),
            "seconds_per_edit": seconds / len(indices),
            "x_plain": seconds / max(base_seconds, 1e-9),
            "image": images[0],
        }


def edit_change(scores, base_scores, images, base_images, col: int, columns: list[str], degrees) -> dict:
    """An edit judged against the unedited renders: the mean change of its own score (column
    ``col``), the leakage (mean |change| of the other scores that are not degrees), the pose
    drift (mean |change| of the degree scores) and the mean PSNR (capped at 99 dB)."""
    from hspace.data.photos import psnr

    change = np.abs(scores - base_scores).mean(0)
    others = [j for j, c in enumerate(columns) if j != col and c not in degrees]
    pose = [columns.index(c) for c in degrees if c != columns[col]]
    return {
        "own_change": float((scores[:, col] - base_scores[:, col]).mean()),
        "leakage": float(change[others].mean()) if others else None,
        "pose_drift_deg": float(change[pose].mean()) if pose else None,
        "psnr_db": float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(images, base_images, strict=True)])),
    }


def strength(entry: Bound, s: float) -> float:
    """The method's own strength at calibration strength s (a weakening strength, an injection
    share, runs from its maximum down)."""
    return entry.cls.strength_max - s if entry.cls.weakens else s


def compare_run(run: RunFolder, compare, ctx: Context) -> dict:
    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.hcore.edits import methods
    from hspace.tasks.evaluate import held_out_start, own_outputs

    meta = run.read()
    require_sampled(meta, "hspace compare")
    cfg = meta["config"]
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    replay = models.replay_for_run(meta, device=ctx.device)
    net = load_annotator(compare.evaluator, ctx.device)
    have = {p.stem for p in run.direction_files()}
    attributes = compare.attributes or [a for a in net.names if a in have]
    unknown = [a for a in attributes if a not in net.names]
    if unknown or not attributes:
        scored = ", ".join(net.names)
        raise RunError(f"compare.attributes: {unknown or 'none'} not scored by {compare.evaluator} ({scored})")
    registered = methods()
    wanted = {m: registered[m] for m in compare.methods} if compare.methods else registered
    names = sorted({n for a in attributes for n in (a, f"{a}_xT", f"{a}_prompt", f"{a}_disentangled") if n in have})
    loaded = dirfile.load_run_directions(run, meta, names, unet, scheduler)
    files = {n: v for n, (v, _) in zip(names, loaded, strict=True)}
    metas = {n: md for n, (_, md) in zip(names, loaded, strict=True)}  # ATTR_prompt: its prompt pair
    start = held_out_start([md for _, md in loaded])
    need = compare.n + compare.calibration_n
    if cfg["n"] - start < need:
        raise RunError(
            f"compare needs {need} held-out samples (--n {compare.n} + --calibration-n {compare.calibration_n}); "
            f"the run has {cfg['n'] - start} (indices {start}..{cfg['n'] - 1}): ask for fewer or sample more"
        )
    indices = list(range(start, start + compare.n))
    cal = list(range(cfg["n"] - compare.calibration_n, cfg["n"]))
    pairs = {a: (m["prompt_a"], m["prompt_b"]) for a in attributes if "prompt_b" in (m := metas.get(f"{a}_prompt", {}))}
    text = replay.text

    source = own_outputs(unet, scheduler, replay)

    rows, skipped, curves, grid = [], {}, {}, {}
    with ctx.progress() as bar:
        task = bar.add_task("compare (attributes)", total=len(attributes), rate="")
        for attribute in attributes:
            found = findings(run, meta, attribute, replay, unet, scheduler)
            fit, skipped[attribute] = entries(
                wanted, attribute, files, pairs.get(attribute), text, source, scheduler, found
            )
            judge = Judge(unet, scheduler, replay, net, attribute)
            grid[attribute] = {"original": judge.unedited(indices)[0][0]}
            for entry in fit:
                ctx.log(f"compare {attribute}: {entry.label}")
                row, curve, image = judged(judge, entry, indices, cal, compare.target)
                rows.append(row)
                if curve is not None:
                    curves.setdefault(attribute, {})[entry.label] = curve
                    grid[attribute][entry.label] = image
            bar.advance(task)
    return write(run, rows, skipped, curves, grid, compare, models.ref_of(meta).id)


TOLERANCE = 0.05  # a calibrated method's own change on the calibration samples is within this of the target
FIELDS = ["attribute", "method", "calibration", "calibration_change", "strength", "value", "n", "own_change",
          "leakage", "pose_drift_deg", "psnr_db", "ssim", "seconds_per_edit", "x_plain"]  # fmt: skip


def judged(judge: Judge, entry: Bound, indices: list[int], cal: list[int], target: float):
    """One leaderboard row: the strength calibrated on ``cal``, then the scores on ``indices``;
    with the curve of (own change, leakage) at 0, half and the full strength, and one image."""
    from hspace.hcore.calibrate import CalibrationError, calibrate_gamma

    row = {"attribute": judge.columns[judge.col], "method": entry.label}
    try:
        first, most = entry.cls.strength_start, entry.cls.strength_max
        c = calibrate_gamma(lambda s: judge.effect(entry, cal, s), target, first, most, rtol=TOLERANCE / target / 2)
        s, reached, status = c.gamma, c.effect, "calibrated" if abs(c.effect - target) <= TOLERANCE else "missed"
    except CalibrationError as e:
        s, reached, status = e.gamma, None, "unreachable"
    if s is None:
        return row | {"calibration": "does not raise it"}, None, None
    half = judge.score(entry, indices, s / 2, timed=False)
    full = judge.score(entry, indices, s)
    image = full.pop("image")
    curve = [(0.0, 0.0)] + [(r["own_change"], r["leakage"] or 0.0) for r in (half, full)]
    row |= {"calibration": status, "calibration_change": reached, "strength": entry.cls.strength}
    row |= {"value": strength(entry, s), "n": len(indices)} | full
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, curve, image


def write(run: RunFolder, rows, skipped, curves, grid, compare, model: str) -> dict:
    """compare/leaderboard.{csv,json}, compare/leakage.png (leakage against own change as the
    strength grows to its calibrated value), compare/grid.png (one sample under every method)."""
    from hspace.data.figures import grid_image, save_grid

    run.compare.mkdir(parents=True, exist_ok=True)
    with run.compare_file("leaderboard.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        w.writeheader()
        w.writerows(rows)
    summary = {"model": model, "target": compare.target, "rows": rows, "not_applicable": skipped}
    run.compare_file("leaderboard.json").write_text(json.dumps(summary, indent=2))
    labels = sorted({m for g in grid.values() for m in g if m != "original"})
    cols = ["original", *labels]
    first = next(iter(grid.values()))["original"]
    blank = np.full_like(first, 255)
    images = np.stack([np.stack([g.get(c, blank) for c in cols]) for g in grid.values()])
    title = f"{model}: every method, one sample"
    save_grid(run.compare_file("grid.png"), grid_image(images, list(grid), cols, title=title))
    plot_curves(curves, compare.target, run.compare_file("leakage.png"))
    files = [run.compare_file(n) for n in ("leaderboard.csv", "leaderboard.json", "grid.png", "leakage.png")]
    return {"outputs": outputs(run, files), "rows": len(rows), "model": model}


def plot_curves(curves: dict, target: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(curves), 1), figsize=(3.2 * max(len(curves), 1), 3), squeeze=False)
    for ax, (attribute, lines) in zip(axes[0], curves.items(), strict=False):
        for label, pts in sorted(lines.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axvline(target, color="gray", lw=0.5)
        ax.set(title=attribute, xlabel="own change", ylabel="leakage (mean |change| of others)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_stage(run: RunFolder, compare, ctx: Context) -> dict:
    if compare is None:
        return {"outputs": [], "skipped": True}
    return compare_run(run, compare, ctx)


def method_problems(names: list[str]) -> list[str]:
    """One line per name of ``compare.methods`` that is not a registered editing method."""
    from hspace.hcore.edits import methods

    known = methods()
    return [f"compare.methods: no editing method {m!r}; registered: {', '.join(sorted(known))}"
            for m in names if m not in known]  # fmt: skip


def check_compare(run, cfg, ctx) -> None:
    """Unknown method names, refused before any work (`hspace run` checks them with the whole
    config, tasks/check.py)."""
    problems = method_problems(cfg.compare.methods) if cfg.compare is not None else []
    if problems:
        raise RunError(problems[0])


def compare_cost(cfg) -> int:
    """At most this many U-Net sample-passes: per attribute the unedited renders, and per method
    and direction file at most 16 calibration renders, two scored ones and a plain one timed
    beside the second; twice the edited rows for a method with a source batch or a second pass
    (Asyrp, Prompt-to-Prompt, Plug-and-Play); the h method with up to three files."""
    from hspace.hcore.edits import methods

    c = cfg.compare
    if c is None:
        return 0
    known = methods()
    chosen = [known[m] for m in c.methods if m in known] if c.methods else list(known.values())
    renders = 16 * c.calibration_n + 2 * c.n
    per_attribute = c.n + c.calibration_n
    for cls in chosen:
        double = getattr(cls, "asyrp", False) or cls.acts_on == "attention"
        per_attribute += (renders * (2 if double else 1) + c.n) * (3 if cls.name == "h" else 1)  # + a plain timing
    return len(c.attributes or cfg.directions.attributes) * per_attribute * cfg.sample.steps


STAGE = Stage(
    "compare",
    sections=("compare",),
    # the last four: the stages whose files make methods it finds
    inputs=("directions", "disentangle", "annotate", "avi", "clip-edits", "diffae", "latent-svd"),
    outputs=("compare",),
    body=compare_stage,
    summary=lambda r: "" if r.get("skipped") else f"{r['rows']} method x attribute rows on {r['model']}",
    check=check_compare,
    cost=compare_cost,
    doc="Every editing method side by side on the same held-out samples, each calibrated to the same own "
    "change and judged by the oracle: own change, leakage, pose drift, PSNR, SSIM, seconds.",
)
