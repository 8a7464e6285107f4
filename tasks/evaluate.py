"""Table 1 and PC naming for a run's directions: load them through the catalog, edit
held-out samples along each (hcore.metrics), write RUN/eval/ through the catalog."""

from __future__ import annotations

import torch

from hspace.data import directions as dirfile
from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.data.eval_folder import EvalFolder
from hspace.data.stores import SampleStore
from hspace.hcore import metrics
from hspace.hcore.sampler import to_unit


def name_run_directions(
    run: RunFolder, meta: dict, names: list[str], net, n: int, gamma: float, unet, scheduler, stem: str = "pc_names"
) -> tuple[list[dict], object]:
    """Name each direction after the attribute it moves most (hcore.metrics.name_by_spread)
    on the run's first ``n`` samples, each attribute measured in units of its spread over
    them; writes RUN/eval/STEM.{json,md}. Returns (table, path of the .md)."""
    from hspace.hcore.hooks import h_shape

    vectors = [v for v, _ in dirfile.load_run_directions(run, meta, names, h_shape(unet), scheduler)]
    changes = metrics.attribute_changes(unet, scheduler, net, meta["config"], list(range(n)), vectors, gamma)
    scale = net.score(to_unit(SampleStore(run.samples).x0[:n])).numpy().std(0)
    table = metrics.name_by_spread(changes, list(net.names), names, scale)
    return table, EvalFolder(run.eval).write_naming(table, list(net.names), gamma, stem)


def held_out_start(metas: list[dict]) -> int:
    """First sample index no listed direction was built from: supervised directions record
    ``samples_ranked`` (they ranked samples 0..samples_ranked-1); others used no labels."""
    return max([int(md.get("samples_ranked", 0)) for md in metas] + [0])


def run_evaluation(
    run_dir: str,
    names: list[str],
    disentangled: bool = False,
    evaluator: str = "oracle",
    n: int | None = None,
    gamma: float | None = 1.0,
    target: float | None = None,
    calibration_n: int = 16,
    prompts: dict | None = None,
    device: str = "cpu",
    log=print,
    keep_norm: bool = True,
    conditions: dict[str, list[str]] | None = None,
    progress=None,
) -> dict:
    """Table 1 for a run's directions ``names``: edit held-out samples along each (and,
    with ``disentangled``, along each projected against the others by eq. (11)), score
    with ``evaluator`` and write RUN/eval/ (leakage_*.csv/.md/.png, summary.json). With
    ``keep_norm`` and a fixed gamma a third table, ``as_written``, edits along eq. (11)'s
    projection without the rescaling.
    gamma None: calibrate per direction (``--gamma auto``) to reach ``target``.
    ``conditions``: attribute -> attributes to project out (default: all the other listed
    directions); ``keep_norm``: rescale each projected direction to its original norm, so
    that both tables compare edits of the same length (see hcore.supervised).
    progress(done, total): called as the edit-and-score passes of the tables finish."""
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.hcore.calibrate import CalibrationError
    from hspace.hcore.hooks import h_shape
    from hspace.hcore.supervised import disentangle as project_out

    run = RunFolder(run_dir)
    meta = run.read()
    require_sampled(meta, "hspace evaluate")
    cfg = meta["config"]
    unet, scheduler = models.load_for_run(meta, device=device)
    net = load_annotator(evaluator, device, prompts=prompts)
    loaded = dirfile.load_run_directions(run, meta, names, h_shape(unet), scheduler)
    vectors = [v for v, _ in loaded]
    rows = [md.get("attribute", d) for d, (_, md) in zip(names, loaded, strict=True)]
    start = held_out_start([md for _, md in loaded])
    available = cfg["n"] - start
    if available <= 0:
        raise RunError(
            f"no held-out samples: the directions were built from all {cfg['n']} samples; "
            "rebuild them with `hspace directions ... --held-out N` to keep the last N samples for evaluation"
        )
    # --gamma auto calibrates on the last held-out samples and evaluates on others: a gamma
    # tuned on the very samples it is then scored on would flatter the diagonal
    reserved = min(calibration_n, available - 1) if gamma is None else 0
    if gamma is None and available < 2:
        raise RunError(
            f"--gamma auto needs held-out samples to calibrate on and others to evaluate; only {available} held out"
        )
    n = min(1000, available - reserved) if n is None else n
    if not 0 < n <= available - reserved:
        raise RunError(
            f"--n {n}: only {available} held-out samples (indices {start}..{cfg['n'] - 1}; "
            f"the directions were built from samples 0..{start - 1})"
            + (f", {reserved} of them kept for --gamma auto's calibration" if reserved else "")
            + f"; use --n {available - reserved} or sample more"
        )
    indices = list(range(start, start + n))
    cal_idx = list(range(cfg["n"] - reserved, cfg["n"]))
    columns = list(net.names)
    degrees = tuple(getattr(net, "degrees", ()))
    if gamma is None:
        unknown = [d for d, r in zip(names, rows, strict=True) if r not in columns]
        if unknown:
            raise RunError(
                f"--gamma auto: direction {unknown[0]!r} has no attribute the evaluator scores "
                f"({', '.join(columns)}); give a number"
            )
    out = EvalFolder(run.eval)
    summary: dict = {"n": n, "held_out_from": start, "evaluator": evaluator, "directions": names}
    conditions = conditions or {}
    unknown = sorted({c for cs in conditions.values() for c in cs} - set(rows))
    if unknown:
        raise RunError(f"disentangle conditions name {unknown}, not among the evaluated directions {rows}")
    against = {
        row: [j for j, r in enumerate(rows) if r != row and (row not in conditions or r in conditions[row])]
        for row in rows
    }
    variants = [("original", vectors)]
    if disentangled:
        flat = [v.numpy() for v in vectors]

        def projected(norm: bool) -> list[torch.Tensor]:
            try:
                return [
                    torch.from_numpy(project_out(flat[i], [flat[j] for j in against[row]], keep_norm=norm))
                    for i, row in enumerate(rows)
                ]
            except ValueError as e:
                raise RunError(f"--disentangled: {e}") from None

        summary["disentangled_against"] = {row: [rows[j] for j in js] for row, js in against.items()}
        summary["keep_norm"] = keep_norm
        variants.append(("disentangled", projected(keep_norm)))
        # eq. (11) as the paper writes it (no rescaling) beside the rescaled projection: the
        # projection shortens a direction, so at one gamma it also edits less. With --gamma
        # auto the calibration undoes the length difference, and the third table would repeat
        # the second.
        if keep_norm and gamma is not None:
            variants.append(("as_written", projected(False)))
    total, done = 1 + len(variants) * len(names), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    base = metrics.edit_scores(unet, scheduler, net, cfg, indices, None, 0.0)
    tick()
    cal_base = metrics.edit_scores(unet, scheduler, net, cfg, cal_idx, None, 0.0) if gamma is None else None
    for label, vs in variants:
        if gamma is not None:
            gammas = [float(gamma)] * len(vs)
        else:
            gammas, calibration = [], {}
            for d, row, v in zip(names, rows, vs, strict=True):
                j = columns.index(row)
                goal = target if target is not None else (10.0 if row in degrees else 0.5)
                try:
                    c = metrics.calibrate_edit(unet, scheduler, net, cfg, cal_idx, v, j, goal, cal_base)
                except CalibrationError as e:
                    # one direction out of reach must not throw away a night of sampling: it is
                    # scored at the strength of its largest effect (1 if none), flagged as such
                    fallback = e.gamma if e.gamma is not None else 1.0
                    gammas.append(fallback)
                    calibration[d] = {"gamma": fallback, "target": goal, "converged": False, "failed": str(e)}
                    log(f"warning: {label} {d}: --gamma auto failed ({e}); scored at gamma {fallback:.3g}")
                    continue
                gammas.append(c.gamma)
                calibration[d] = {
                    "gamma": c.gamma,
                    "reached": c.effect,
                    "target": goal,
                    "converged": c.converged,
                    "evaluations": c.evaluations,
                    "samples": [cal_idx[0], cal_idx[-1] + 1],
                }
                log(
                    f"{label} {d}: gamma {c.gamma:.3f} moves {row} by {c.effect:+.3f} "
                    f"(target {goal}, {c.evaluations} passes)"
                )
            summary.setdefault("calibration", {})[label] = calibration
        matrix = metrics.leakage_matrix(unet, scheduler, net, cfg, indices, vs, gammas, base=base, on_row=tick)
        out.write_leakage(label, matrix, rows, columns, degrees)
        # probabilities and degrees do not average together: the top-level means are over the
        # probability columns, ``degrees`` holds the same means over the pose columns
        summary[label] = {"gamma": dict(zip(names, gammas, strict=True))}
        summary[label].update(metrics.leakage_means(matrix, rows, columns, set(columns) - set(degrees)))
        if set(degrees) & set(columns):
            summary[label]["degrees"] = metrics.leakage_means(matrix, rows, columns, set(degrees))
        probabilities = set(columns) - set(degrees)
        summary[label]["per_direction"] = {  # each direction's own leakage, to say which one a projection worsened
            d: metrics.leakage_means(matrix[i : i + 1], [r], columns, probabilities)["mean_offdiagonal"]
            for i, (d, r) in enumerate(zip(names, rows, strict=True))
        }
    out.write_summary(summary)
    return summary
