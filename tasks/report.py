"""RUN/report.html: one self-contained offline page (images inlined as data: URIs, no
scripts, no external resources). It leads with what was found (a table of every direction:
what it moves most, by how much, its leakage before and after eq. (11), and the Table-1
headline), then the figures and leakage tables; stage records and the config are folded
away at the end."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

from hspace.data.catalog import RunFolder
from hspace.data.eval_folder import TABLES, EvalFolder, calibration_misses, leakage_change, leaked_more, table_title
from hspace.tasks.stages import BEFORE, Context, Stage, outputs, registry

FIGURES = [
    ("samples.png", "Samples", "The first samples of the run (x0)."),
    ("pca_grid.png", "Principal components (Fig. 6)", "Each row edits one sample along a PC; γ in σ units."),
    ("random_grid.png", "Random directions (Fig. 6 baseline)", "Norm-matched random directions: little changes."),
    ("supervised_grid.png", "Supervised directions (eq. 10)", "Mean difference of top and bottom samples."),
    ("disentangled_grid.png", "Disentangled directions (eq. 11)", "Each projected against the other attributes."),
    ("sequential.png", "Sequential editing (Fig. 11)", "Directions accumulated one after another."),
    (
        "sample_efficiency.png",
        "Sample efficiency, h vs x_T (Fig. 8)",
        "Directions from n pairs applied to held-out samples (blue h, red x_T): left the mean change of the "
        "first attribute, right the RMS pixel change of the edit (how much of the image it replaces).",
    ),
    (
        "jacobian_grid.png",
        "Image-specific direction (Fig. 7)",
        "The top right singular vector of the Jacobian at one step of one sample, applied to it and to others.",
    ),
]


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _csv_table(path: Path) -> str:
    rows = list(csv.reader(path.open()))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr><th>" + html.escape(r[0]) + "</th>" + "".join(f"<td>{float(x):+.3f}</td>" for x in r[1:]) + "</tr>"
        for r in rows[1:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def sampling_text(config: dict) -> str:
    """How the run sampled: steps, eta (eq. (5)) and the clipping of P_t."""
    eta = config.get("eta")
    eta_text = f"eta {eta:g}" if isinstance(eta, int | float) else f"eta per step {eta}"
    clip = config.get("clip_sample")
    clip_text = "P_t clipping as the model's scheduler" if clip is None else f"P_t clipping {'on' if clip else 'off'}"
    return f"{config.get('steps')} steps, {eta_text}, {clip_text}"


def _num(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _rows(path: Path) -> tuple[list[str], dict[str, list[float]]]:
    rows = list(csv.reader(path.open()))
    return rows[0][1:], {r[0]: [float(x) for x in r[1:]] for r in rows[1:]}


def _findings(ev: EvalFolder) -> list[str]:
    """The page's first screen: the Table-1 headline and one row per direction."""
    summary = ev.summary()
    if summary is None or not ev.leakage_csv("original").exists():
        return []
    columns, original = _rows(ev.leakage_csv("original"))
    projected = {  # the eq. (11) tables this run has: norm kept, as written
        label: _rows(ev.leakage_csv(label))[1] for label in TABLES[1:] if ev.leakage_csv(label).exists()
    }
    degrees = {"yaw", "pitch", "roll"} & set(columns)  # pose columns (Hopenet, the oracle) are in degrees
    parts = ["<h2 id='findings'>Findings</h2>"]
    changes = [(label, leakage_change(summary, label)) for label in projected]
    changes = [(label, c) for label, c in changes if c]
    if changes:
        text = "; ".join(
            f"{_num(c['after'])} ({100 * c['change']:+.0f}%) with {table_title(label, summary)}, "
            f"diagonal kept {100 * c['kept']:.0f}%"
            for label, c in changes
        )
        parts.append(
            f"<p class='headline'>Leakage (mean |off-diagonal| of Table 1) {_num(changes[0][1]['before'])} → "
            f"{text} ({summary.get('n')} held-out samples, "
            f"evaluator {html.escape(str(summary.get('evaluator')))}).</p>"
        )
    worse = leaked_more(summary)
    if worse:
        items = ", ".join(
            f"<b>{html.escape(w['direction'])}</b> {_num(w['before'])} → {_num(w['after'])} "
            f"({html.escape(table_title(w['table'], summary))})"
            for w in worse
        )
        parts.append(
            f"<p class='warn' id='leaked-more'>Leaks more after the projection: {items}. Eq. (11) removes the "
            "components along the other directions, not leakage itself: where directions are correlated, the "
            "projection can turn a direction towards other attributes.</p>"
        )
    failed = calibration_misses(summary)
    if failed:
        items = "; ".join(f"<b>{html.escape(d)}</b>: {html.escape(c['failed'])}" for d, c in failed.items())
        parts.append(f"<p class='warn'>--gamma auto missed its target, scored at its strongest gamma: {items}</p>")
    parts.append(
        "<table id='summary'><tr><th>direction</th><th>its own attribute</th><th>moves most</th><th>by</th>"
        "<th>leakage before</th>"
        + "".join(f"<th>leakage, {html.escape(table_title(label, summary))}</th>" for label in projected)
        + "</tr>"
    )

    def leakage(row: str, values: list[float]) -> float:
        others = [abs(v) for c, v in zip(columns, values, strict=True) if c != row and c not in degrees]
        return sum(others) / len(others) if others else float("nan")

    for row, values in original.items():
        own = values[columns.index(row)] if row in columns else None
        top = max(range(len(values)), key=lambda j: abs(values[j]) / (30.0 if columns[j] in degrees else 1.0))
        unit = "°" if columns[top] in degrees else ""
        parts.append(
            f"<tr><th>{html.escape(row)}</th><td>{_num(own)}</td><td>{html.escape(columns[top])}</td>"
            f"<td>{values[top]:+.3g}{unit}</td><td>{_num(leakage(row, values))}</td>"
            + "".join(f"<td>{_num(leakage(row, t[row])) if row in t else '–'}</td>" for t in projected.values())
            + "</tr>"
        )
    parts.append(
        '</table><p>Probabilities for binary attributes, degrees for pose; "moves most" compares degrees / 30 '
        "with probabilities; leakage = mean |change| of the other binary attributes.</p>"
    )
    return parts


def _compared(run: RunFolder) -> list[str]:
    """`hspace compare`'s section: the leaderboard, leakage against own change, one sample."""
    board = run.compare_file("leaderboard.csv")
    if not board.exists():
        return []
    rows = list(csv.DictReader(board.open()))
    cols = ["attribute", "method", "calibration", "value", "own_change", "leakage", "pose_drift_deg", "psnr_db",
            "ssim", "x_plain"]  # fmt: skip
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(r.get(c) or '')}</td>" for c in cols) + "</tr>" for r in rows)
    parts = [
        "<h2 id='compare'>Every editing method side by side</h2><p>Each method calibrated on held-out samples "
        "to the same own change, then scored on others (compare/leaderboard.csv).</p>",
        f"<table><tr>{head}</tr>{body}</table>",
    ]
    for name, alt in (("leakage.png", "leakage against own change"), ("grid.png", "one sample, every method")):
        if run.compare_file(name).exists():
            parts.append(_img(run.compare_file(name), alt))
    return parts


def _latent_svd(run: RunFolder) -> list[str]:
    """The latent-svd stage's section: the SVD paper's properties, one line each, and its figures."""
    from hspace.data.stores import LatentSvdStore

    store = LatentSvdStore(run.latent_svd)
    if not store.file("properties.json").exists():
        return _avi_figures(run)
    s = json.loads(store.file("properties.json").read_text())["summary"]
    lines = [
        f"small neighbourhood: geodesic distance between neighbouring steps {s['adjacent_distance']:.3f}, the same "
        f"step of another seed {s['other_seed_distance']:.3f}, random subspaces {s['random_distance']:.3f}",
        f"attributes in singular values: the largest mean change of a probability {s['largest_effect']:.3f} "
        f"({s['largest_effect_at']['factor']} at step {s['largest_effect_at']['step']}); a factor moved in some "
        f"samples and not others (20-80%) at {s['mixed_share']:.0%} of (step, index, factor)",
        f"transplant: a vector from another seed closes {s['transplant_slope_mean'] or 0:.0%} of the gap on average",
        f"the largest singular value over the steps: Spearman rho {s['sigma_max_rho']:+.2f} with the step "
        f"(positive: it grows toward x_0, the theorem's assumption)",
    ]
    parts = ["<h2 id='latent-svd'>The SVD of x_t (Wang et al. 2025)</h2><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in lines] + ["</ul>"]
    for name, alt in (("neighbourhood.png", "small neighbourhood"), ("effects.png", "singular value probes")):
        if store.file(name).exists():
            parts.append(_img(store.file(name), alt))
    return parts + _avi_figures(run)


def _avi_figures(run: RunFolder) -> list[str]:
    """`hspace avi`'s predictors: each one's alpha sweep on held-out samples (the paper's Fig. 7)."""
    from hspace.data.directions import predictor_files

    figures = [f.with_suffix(".png") for f in predictor_files(run) if f.with_suffix(".png").exists()]
    if not figures:
        return []
    parts = ["<h2 id='avi'>Attribute Vector Integration: alpha sweeps</h2>"]
    return parts + [_img(f, f"AVI {f.stem}") for f in figures]


def _folded(meta: dict) -> list[str]:
    """Stage records (fingerprints, timings, outputs) and the config, folded away."""
    parts = []
    pipeline = meta.get("stages", {})
    if pipeline:
        parts.append(
            "<details><summary>Stages (fingerprints, timings, outputs)</summary><table><tr><th>stage</th>"
            "<th>state</th><th>fingerprint</th><th>seconds</th><th>summary</th><th>outputs</th></tr>"
        )
        # in the registry's order; the report stage itself is this page, still being written
        for stage in [s for s in registry() if s in pipeline and s != STAGE.name]:
            rec = pipeline[stage]
            outputs = ", ".join(rec.get("outputs", [])[:6]) + (" …" if len(rec.get("outputs", [])) > 6 else "")
            parts.append(
                f"<tr><th>{html.escape(stage)}</th><td>{html.escape(str(rec.get('state')))}</td>"
                f"<td><code>{html.escape(str(rec.get('key')))}</code></td><td>{rec.get('seconds', '')}</td>"
                f"<td style='text-align:left'>{html.escape(_summary(stage, rec))}</td>"
                f"<td style='text-align:left'>{html.escape(outputs)}</td></tr>"
            )
        parts.append("</table></details>")
    config = meta.get("pipeline_config", meta["config"])
    parts.append(f"<details><summary>Config</summary><pre>{html.escape(json.dumps(config, indent=2))}</pre></details>")
    return parts


def _summary(stage: str, record: dict) -> str:
    """The stage's one line (its declaration's ``summary``), as the terminal showed it; empty
    for a record that does not carry what the line needs (an older run)."""
    if record.get("state") != "done":
        return ""
    try:
        return registry()[stage].summary(record)
    except (KeyError, TypeError, ValueError):
        return ""


def write_report(run: RunFolder) -> Path:
    meta = run.read()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>hspace run {html.escape(run.root.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;image-rendering:pixelated;border:1px solid #ccc}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}.warn{background:#fff3cd;padding:4px 8px}"
        "</style></head><body>",
        f"<h1>hspace run <code>{html.escape(str(run.root))}</code></h1>",
        f"<p>model <code>{html.escape(str(meta['model'].get('id')))}</code> "
        f"(fingerprint {html.escape(str(meta['model'].get('fingerprint', ''))[:12])}), "
        f"created {html.escape(str(meta.get('created')))}; {html.escape(sampling_text(meta['config']))}</p>",
    ]
    ev = EvalFolder(run.eval)
    parts += _findings(ev)
    for name, title, caption in FIGURES:
        path = run.figure(name)
        if path.exists():
            parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p>{_img(path, title)}")
    naming = ev.naming("figure_pc_names")  # the names on the PCA grid of this page
    if naming:
        table = naming["directions"]
        parts.append("<h2>What each PC moves</h2><table><tr><th>PC</th><th>≈</th><th>change</th></tr>")
        parts += [
            f"<tr><th>{html.escape(r['direction'])}</th><td>{html.escape(r['name'])}</td><td>{r['change']:+.3f}</td></tr>"
            for r in table
        ]
        parts.append("</table>")
    summary = ev.summary()
    if summary is not None:
        parts.append(
            "<h2>Leakage (Table 1)</h2><p>Mean change of every attribute (columns) when editing held-out "
            f"samples along each direction (rows); evaluator {html.escape(str(summary.get('evaluator')))}, "
            f"{summary.get('n')} samples.</p>"
        )
        for label in TABLES:
            if ev.leakage_csv(label).exists():
                s = summary.get(label, {})
                parts.append(
                    f"<h3>{table_title(label, summary)}</h3><p>mean |diagonal| {_num(s.get('mean_diagonal'))}, "
                    f"mean |off-diagonal| {_num(s.get('mean_offdiagonal'))}</p>"
                )
                parts.append(_csv_table(ev.leakage_csv(label)))
                parts.append(_img(ev.leakage_csv(label).with_suffix(".png"), f"leakage heatmap ({label})"))
    parts += _compared(run)
    parts += _latent_svd(run)
    extra = [p for p in run.figure_files("*.png") if p.name not in {n for n, _, _ in FIGURES}]
    for path in extra:  # Fig. 8 plots, Jacobian grids and other figures dropped here
        parts.append(f"<h2>{html.escape(path.stem)}</h2>{_img(path, path.stem)}")
    parts += _folded(meta)
    parts.append("</body></html>")
    out = run.report
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out


def publish_artifacts(run: RunFolder, stage: Stage, key: str, result: dict) -> None:
    """Prefect artifacts for the UI: a markdown summary per stage (fingerprint, outputs),
    then what the stage's declaration publishes besides (``Stage.publish``: the leakage
    tables of the evaluation, the link to this report); keys: lowercase, digits, dashes."""
    from prefect.artifacts import create_markdown_artifact

    slug = "".join(c if c.isalnum() else "-" for c in run.root.name.lower()).strip("-") or "run"
    listed = "\n".join(f"- `{run.root}/{o}`" for o in result.get("outputs", [])) or "- (none)"
    create_markdown_artifact(
        f"### {stage.name}\n\nrun folder `{run.root}`, fingerprint `{key}`\n\noutputs:\n{listed}\n",
        key=f"hspace-{slug}-{stage.name.replace('_', '-')}",  # Prefect: lowercase, digits, dashes
        description=f"hspace stage {stage.name}",
    )
    if stage.publish is not None:
        stage.publish(run, slug)


# ----------------------------------------------------------------------------- the stage


def report_stage(run: RunFolder, ctx: Context) -> dict:
    return {"outputs": outputs(run, [write_report(run)])}


def _publish(run: RunFolder, slug: str) -> None:
    from prefect.artifacts import create_link_artifact

    create_link_artifact(run.report.resolve().as_uri(), link_text=run.report.name, key=f"hspace-{slug}-report")


STAGE = Stage(
    "report",
    sections=(),
    inputs=BEFORE,
    outputs=("report",),
    body=report_stage,
    publish=_publish,
    command=False,
)
