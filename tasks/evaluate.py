"""How much does a direction move each attribute? Edit samples at -gamma and +gamma,
score both with an annotator, and average the change (paper sec. 4.1 judges PCs by eye;
Table 1 measures this for supervised directions). Used to name PCs ("pc02 ~ yaw") and for
the PC vs random comparison of Fig. 6."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data import directions as dirfile
from data.catalog import RunFolder


def attribute_changes(
    unet,
    scheduler,
    annotator,
    sample_cfg: dict,
    indices: list[int],
    vectors: list[torch.Tensor],
    gamma: float,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean over samples of score(+gamma) - score(-gamma), halved: (len(vectors), A).

    Every edited sample replays its own x_T and z_{T:1} (same generator), so the only
    difference between the two renders is the edit."""
    from hcore.sampler import Edit, make_generators, sample

    out = np.zeros((len(vectors), len(annotator.names)), np.float64)
    for j, v in enumerate(vectors):
        for start in range(0, len(indices), batch_size):
            part = indices[start : start + batch_size]
            signs = torch.tensor([gamma] * len(part) + [-gamma] * len(part))
            gens = make_generators(sample_cfg["seed"], list(part) + list(part))
            x0 = sample(
                unet,
                scheduler,
                gens,
                sample_cfg["steps"],
                sample_cfg["eta"],
                edit=Edit([v], [signs]),
                h_point=sample_cfg["h_point"],
            )
            scores = annotator.score(x0).numpy()
            plus, minus = scores[: len(part)], scores[len(part) :]
            out[j] += ((plus - minus) / 2).sum(0)
    return out / len(indices)


def name_directions(
    changes: np.ndarray, names: list[str], direction_names: list[str], attribute_scale: np.ndarray
) -> list[dict]:
    """Name each direction after the attribute it moves most, measured in units of that
    attribute's spread (``attribute_scale``, e.g. the std of its scores over the run), so
    probabilities and degrees compare: pc02 ~ yaw."""
    rel = np.abs(changes) / np.maximum(attribute_scale, 1e-6)
    table = []
    for j, dname in enumerate(direction_names):
        best = int(np.argmax(rel[j]))
        table.append(
            {
                "direction": dname,
                "name": names[best],
                "change": float(changes[j, best]),
                "relative": float(rel[j, best]),
                "changes": {n: float(c) for n, c in zip(names, changes[j], strict=True)},
            }
        )
    return table


def changes_table_md(table: list[dict], names: list[str], gamma: float) -> str:
    head = "| direction | ≈ | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names) + "\n"
    rows = "".join(
        f"| {row['direction']} | {row['name']} | " + " | ".join(f"{row['changes'][n]:+.3f}" for n in names) + " |\n"
        for row in table
    )
    return f"Mean change of each attribute between γ = -{gamma:g} and +{gamma:g} (halved)\n\n" + head + rows


def load_run_directions(
    run: RunFolder, meta: dict, direction_names: list[str], unet, scheduler
) -> list[tuple[torch.Tensor, dict]]:
    """Load RUN/directions/NAME.safetensors for each name, refusing any that does not fit
    the run's model, schedule, steps and h point: [(v, metadata)]."""
    from data.catalog import RunError
    from hcore.hspace import h_shape

    missing = [d for d in direction_names if not (run.directions / f"{d}.safetensors").exists()]
    if missing:
        have = sorted(p.stem for p in run.directions.glob("*.safetensors")) if run.directions.exists() else []
        raise RunError(
            f"no direction file for {missing} in {run.directions}; this run has: {', '.join(have) or 'none'}"
        )
    cfg, out = meta["config"], []
    for name in direction_names:
        path = run.directions / f"{name}.safetensors"
        v, md = dirfile.load(path)
        dirfile.check(
            path,
            v,
            md,
            model_fingerprint=meta["model"]["fingerprint"],
            steps=cfg["steps"],
            h_shape=h_shape(unet),
            h_point=cfg["h_point"],
            scheduler=dirfile.scheduler_name(scheduler),
        )
        out.append((v, md))
    return out


def save_naming(run: RunFolder, table: list[dict], names: list[str], gamma: float) -> Path:
    out = run.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pc_names.json").write_text(json.dumps({"gamma": gamma, "directions": table}, indent=2))
    (out / "pc_names.md").write_text(changes_table_md(table, names, gamma))
    return out / "pc_names.md"


# ----------------------------------------------------------------------- Table 1 leakage


def edit_scores(
    unet,
    scheduler,
    annotator,
    sample_cfg: dict,
    indices: list[int],
    v: torch.Tensor | None,
    gamma: float,
    batch_size: int = 64,
) -> np.ndarray:
    """Annotator scores (len(indices), A) of the samples edited by gamma * v (None: unedited)."""
    from hcore.sampler import Edit, make_generators, sample

    out = []
    for start in range(0, len(indices), batch_size):
        part = indices[start : start + batch_size]
        edit = None if v is None else Edit([v], [gamma])
        x0 = sample(
            unet,
            scheduler,
            make_generators(sample_cfg["seed"], part),
            sample_cfg["steps"],
            sample_cfg["eta"],
            edit=edit,
            h_point=sample_cfg["h_point"],
        )
        out.append(annotator.score(x0).numpy())
    return np.concatenate(out)


def leakage_matrix(
    unet,
    scheduler,
    annotator,
    sample_cfg: dict,
    indices: list[int],
    vectors: list[torch.Tensor],
    gamma: float | list[float],
    base: np.ndarray | None = None,
    on_row=None,
) -> np.ndarray:
    """Table 1: mean change of every attribute (columns) when editing with each direction
    (rows): mean over samples of score(edited) - score(original). (len(vectors), A).
    gamma: one for all rows or one per row; base: the unedited scores if already known;
    on_row(): called after each row (progress)."""
    gammas = [gamma] * len(vectors) if isinstance(gamma, int | float) else list(gamma)
    if base is None:
        base = edit_scores(unet, scheduler, annotator, sample_cfg, indices, None, 0.0)
    rows = []
    for v, g in zip(vectors, gammas, strict=True):
        rows.append((edit_scores(unet, scheduler, annotator, sample_cfg, indices, v, g) - base).mean(0))
        if on_row is not None:
            on_row()
    return np.stack(rows)


def calibrate(
    unet,
    scheduler,
    annotator,
    sample_cfg: dict,
    indices: list[int],
    v: torch.Tensor,
    column: int,
    target: float,
    base: np.ndarray | None = None,
):
    """``--gamma auto``: the gamma at which the mean change of annotator column ``column``
    over ``indices`` reaches ``target`` (hcore.calibrate, bisection)."""
    from hcore.calibrate import calibrate_gamma

    if base is None:
        base = edit_scores(unet, scheduler, annotator, sample_cfg, indices, None, 0.0)

    def effect(g: float) -> float:
        scores = edit_scores(unet, scheduler, annotator, sample_cfg, indices, v, g)
        return float((scores[:, column] - base[:, column]).mean())

    return calibrate_gamma(effect, target)


def _means(matrix: np.ndarray, rows: list[str], columns: list[str], keep: set[str]) -> dict:
    diag = [abs(matrix[i, columns.index(r)]) for i, r in enumerate(rows) if r in columns and r in keep]
    off = [abs(matrix[i, j]) for i, r in enumerate(rows) for j, c in enumerate(columns) if c != r and c in keep]
    return {
        "mean_diagonal": float(np.mean(diag)) if diag else None,
        "mean_offdiagonal": float(np.mean(off)) if off else None,
    }


def write_leakage(
    out_dir: Path, label: str, matrix: np.ndarray, rows: list[str], columns: list[str], degrees: tuple = ()
) -> dict:
    """leakage_<label>.csv / .md / .png; returns mean |diagonal| and mean |off-diagonal|,
    where the diagonal pairs each direction with the column of its own attribute.

    Probabilities and degrees do not average together: the top-level means are over the
    probability columns, and ``degrees`` holds the same means over the pose columns."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "direction," + ",".join(columns)
    lines = [header] + [f"{r}," + ",".join(f"{x:.6f}" for x in row) for r, row in zip(rows, matrix, strict=True)]
    (out_dir / f"leakage_{label}.csv").write_text("\n".join(lines) + "\n")
    md = "| direction | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    md += "".join(
        f"| {r} | " + " | ".join(f"{x:+.3f}" for x in row) + " |\n" for r, row in zip(rows, matrix, strict=True)
    )
    (out_dir / f"leakage_{label}.md").write_text(md)
    heatmap(matrix, rows, columns, f"leakage ({label})", degrees).save(out_dir / f"leakage_{label}.png")
    summary = _means(matrix, rows, columns, set(columns) - set(degrees))
    if set(degrees) & set(columns):
        summary["degrees"] = _means(matrix, rows, columns, set(degrees))
    return summary


def heatmap(matrix: np.ndarray, rows: list[str], columns: list[str], title: str, degrees: tuple = ()):
    """A labelled diverging heatmap (blue negative, red positive), values written in cells;
    the columns in ``degrees`` share one colour scale, the probability columns another."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell, left, top = 64, 8 + max(int(font.getlength(r)) for r in rows), 40
    img = Image.new("RGB", (left + cell * len(columns) + 8, top + cell * len(rows) + 8), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), title, fill="black", font=font)
    # colour scale per unit: degrees would otherwise wash out the probabilities
    deg = np.array([c in degrees for c in columns])
    scales = np.ones(len(columns))
    for group in (deg, ~deg):
        if group.any():
            scales[group] = max(float(np.abs(matrix[:, group]).max()), 1e-9)
    for j, c in enumerate(columns):
        d.text((left + j * cell + 2, top - 14), c[:10], fill="black", font=font)
    for i, r in enumerate(rows):
        d.text((4, top + i * cell + cell // 2 - 6), r, fill="black", font=font)
        for j in range(len(columns)):
            a = float(matrix[i, j]) / scales[j]
            colour = (
                (255, int(255 * (1 - a)), int(255 * (1 - a)))
                if a >= 0
                else (int(255 * (1 + a)), int(255 * (1 + a)), 255)
            )
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2)
            d.rectangle(box, fill=colour)
            d.text((box[0] + 4, box[1] + cell // 2 - 6), f"{matrix[i, j]:+.2f}", fill="black", font=font)
    return img


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
    with ``evaluator`` and write RUN/eval/ (leakage_*.csv/.md/.png, summary.json).
    gamma None: calibrate per direction (``--gamma auto``) to reach ``target``.
    ``conditions``: attribute -> attributes to project out (default: all the other listed
    directions); ``keep_norm``: rescale each projected direction to its original norm, so
    that both tables compare edits of the same length (see hcore.supervised).
    progress(done, total): called as the edit-and-score passes of the tables finish."""
    from data import models
    from data.annotators import load_annotator
    from data.catalog import RunError, require_sampled
    from hcore.calibrate import CalibrationError
    from hcore.supervised import disentangle as project_out

    run = RunFolder(Path(run_dir))
    meta = run.read()
    require_sampled(meta, "hspace evaluate")
    cfg = meta["config"]
    unet, scheduler = models.load_for_run(meta, device=device)
    net = load_annotator(evaluator, device, prompts=prompts)
    loaded = load_run_directions(run, meta, names, unet, scheduler)
    vectors = [v for v, _ in loaded]
    rows = [md.get("attribute", d) for d, (_, md) in zip(names, loaded, strict=True)]
    start = held_out_start([md for _, md in loaded])
    available = cfg["n"] - start
    if available <= 0:
        raise RunError(
            f"no held-out samples: the directions were built from all {cfg['n']} samples; "
            "rebuild them with `hspace directions ... --first M` to keep samples for evaluation"
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
    out = run.root / "eval"
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
        try:
            dis = [
                torch.from_numpy(project_out(flat[i], [flat[j] for j in against[row]], keep_norm=keep_norm))
                for i, row in enumerate(rows)
            ]
        except ValueError as e:
            raise RunError(f"--disentangled: {e}") from None
        summary["disentangled_against"] = {row: [rows[j] for j in js] for row, js in against.items()}
        summary["keep_norm"] = keep_norm
        variants.append(("disentangled", dis))
    total, done = 1 + len(variants) * len(names), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    base = edit_scores(unet, scheduler, net, cfg, indices, None, 0.0)
    tick()
    cal_base = edit_scores(unet, scheduler, net, cfg, cal_idx, None, 0.0) if gamma is None else None
    for label, vs in variants:
        if gamma is not None:
            gammas = [float(gamma)] * len(vs)
        else:
            gammas, calibration = [], {}
            for d, row, v in zip(names, rows, vs, strict=True):
                j = columns.index(row)
                goal = target if target is not None else (10.0 if row in degrees else 0.5)
                try:
                    c = calibrate(unet, scheduler, net, cfg, cal_idx, v, j, goal, cal_base)
                except CalibrationError as e:
                    raise RunError(f"--gamma auto: direction {d!r} ({label}): {e}") from None
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
        matrix = leakage_matrix(unet, scheduler, net, cfg, indices, vs, gammas, base=base, on_row=tick)
        summary[label] = {"gamma": dict(zip(names, gammas, strict=True))}
        summary[label].update(write_leakage(out, label, matrix, rows, columns, degrees))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
