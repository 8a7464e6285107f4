"""Table 1 for a run's directions: load them (and their eq. (11) projections, written by
the disentangle stage) through the catalog, edit held-out samples along each
(hcore.metrics), write RUN/eval/ through the catalog."""

from __future__ import annotations

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.data.eval_folder import TABLES, EvalFolder, calibration_misses, leakage_change, leaked_more, table_title
from hspace.tasks.stages import Context, Stage, outputs


def held_out_start(metas: list[dict]) -> int:
    """First sample index no listed direction was built from: supervised directions record
    ``samples_ranked`` (they ranked samples 0..samples_ranked-1); others used no labels."""
    return max([int(md.get("samples_ranked", 0)) for md in metas] + [0])


def own_outputs(unet, scheduler, replay):
    """indices -> those samples' own unedited outputs in the sampler's space (a latent model's
    final latents, undecoded), each set rendered once: what a source method (SDEdit) starts from."""
    rendered: dict = {}

    def source(indices):
        key = tuple(indices)
        if key not in rendered:
            stop = {"stop_before": replay.steps} if replay.text is not None else {}
            rendered[key] = replay.render(unet, scheduler, list(indices), **stop)
        return rendered[key]

    return source


def method_problem(name: str) -> str | None:
    """Why ``evaluate.methods`` cannot score the method ``name`` (None: it can): it must be
    registered, not the h method itself (its rows are evaluate.directions), not one acting on
    x_T (Table 1 lists h directions), and need nothing beyond a direction, a prompt pair or a
    source."""
    from hspace.hcore.edits import get

    try:
        cls = get(name)
    except ValueError as e:
        return f"evaluate.methods: {e}"
    if name == "h":
        return "evaluate.methods: h is how evaluate.directions are scored; list its files there"
    if cls.acts_on == "x_T":
        return f"evaluate.methods: {name} acts on x_T directions, and Table 1 scores h directions; drop it"
    extra = sorted(set(cls.needs) - {"direction", "prompt_pair", "source", "weights"})
    if extra:
        return f"evaluate.methods: {name} needs {', '.join(extra)}, which Table 1 does not give"
    return None


def scored_methods(names: list[str], directions: list[str], loaded: list, model: dict) -> list:
    """Table 1's rows for ``evaluate.methods``: [(label, attribute row, hcore.edits.Bound)]. A
    method needing nothing is one row (its attribute, else its name); one needing a direction is
    a row per listed direction (METHOD:NAME); one needing a prompt pair or a source is a row per
    listed prompt-pair direction (ATTR_prompt -> METHOD:ATTR: toward its target prompt; a source
    method starts from each sample's own output, ``source(indices)``); one needing weights it
    trained is one row, its file named in its spec (``avi:predictor=PATH``: the attribute it was
    trained for). ``model``: replay, unet, scheduler, source, fingerprint. RunError, before any
    edit, where a method gets no row."""
    from hspace.data.directions import load_trained
    from hspace.hcore.edits import Bound, get, make, once_per_indices
    from hspace.tasks.edit_methods import weights_path

    replay, unet, scheduler, source = model["replay"], model["unet"], model["scheduler"], model["source"]
    text = replay.text if replay is not None else None
    rows = []
    for name in names:
        problem = method_problem(name)
        if problem:
            raise RunError(problem)
        cls = get(name)
        needs = set(cls.needs)
        if not needs:
            try:
                made = make(name)  # with its settings: "sv-scale:index=1:step=2"
            except ValueError as e:
                raise RunError(f"evaluate.methods: {e}") from None
            rows.append((name, made.attribute or name, Bound(name, cls, lambda idx, made=made: made)))
            continue
        if "weights" in needs:
            path = weights_path(name, "evaluate.methods:")
            found, f, meta = load_trained(path, model["fingerprint"], replay.steps, method=cls.name)
            if found is not cls:
                raise RunError(f"evaluate.methods: {name} names {found.name} weights, not {cls.name}'s")
            attribute = meta.get("attribute", cls.name)
            build = lambda idx, cls=cls, f=f, a=attribute: cls.from_replay(replay, unet, scheduler, idx, f, a)  # noqa: E731
            rows.append((f"{cls.name}:{attribute}", attribute, Bound(name, cls, once_per_indices(build))))
            continue
        made = []
        for d, (v, md) in zip(directions, loaded, strict=True):
            attribute = md.get("attribute", d)
            if needs == {"direction"}:
                build = lambda idx, cls=cls, v=v: cls.from_direction(v)  # noqa: E731
                made.append((f"{name}:{d}", attribute, Bound(name, cls, build)))
            elif "prompt_b" in md and text is not None:
                target, attribute = md["prompt_b"], attribute.removesuffix("_prompt")
                if needs == {"prompt_pair"}:
                    build = lambda idx, cls=cls, t=target: cls.from_prompt(t, text.tokenizers[0])  # noqa: E731
                    made.append((f"{name}:{attribute}", attribute, Bound(name, cls, build)))
                else:
                    build = lambda idx, cls=cls: cls.from_source(source(idx), scheduler)  # noqa: E731
                    made.append((f"{name}:{attribute}", attribute, Bound(name, cls, build, prompt=target)))
        if not made:
            why = "a text-conditioned model" if text is None else "a prompt-pair direction ATTR_prompt listed"
            raise RunError(f"evaluate.methods: {name} needs {why} to be scored")
        rows += made
    return rows


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
    progress=None,
    methods: list[str] | None = None,
) -> dict:
    """Table 1 (paper sec. 5): the mean change of every attribute the ``evaluator`` scores
    when held-out samples are edited along each direction, written to RUN/eval/
    (leakage_*.csv/.md/.png, summary.json). ``disentangled``: also a table of each
    direction's eq. (11) projection as the disentangle stage wrote it
    (``NAME_disentangled``) and, with a fixed gamma, of eq. (11) as written
    (``NAME_disentangled_as_written``, where that stage kept the norm); a direction with
    no such file is left out of that table, named in the log and in the summary.
    gamma None: calibrate per direction (``--gamma auto``) to reach ``target``. ``methods``:
    registered editing methods, rows of the original table too (``scored_methods``).
    progress(done, total): called as the edit-and-score passes of the tables finish."""
    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.hcore import metrics
    from hspace.hcore.calibrate import CalibrationError
    from hspace.tasks.disentangle import AS_WRITTEN, disentangled_name

    run = RunFolder(run_dir)
    meta = run.read()
    require_sampled(meta, "hspace evaluate")
    cfg = meta["config"]
    unet, scheduler = models.load_for_run(meta, device=device)
    replay = models.replay_for_run(meta, device=device)  # SD: prompts, guidance and the VAE decoder
    net = load_annotator(evaluator, device, prompts=prompts)
    loaded = dirfile.load_run_directions(run, meta, names, unet, scheduler)
    vectors = [v for v, _ in loaded]
    rows = [md.get("attribute", d) for d, (_, md) in zip(names, loaded, strict=True)]
    start = held_out_start([md for _, md in loaded])
    source = own_outputs(unet, scheduler, replay)
    model = {"replay": replay, "unet": unet, "scheduler": scheduler, "source": source,
             "fingerprint": meta["model"]["fingerprint"]}  # fmt: skip
    made = scored_methods(methods or [], names, loaded, model)
    names, directions = names + [label for label, _, _ in made], names
    vectors += [bound for _, _, bound in made]
    rows += [row for _, row, _ in made]
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
    variants = [("original", names, vectors)]
    names = directions  # the eq. (11) tables: directions only
    if disentangled:
        have = {p.stem for p in run.direction_files()}
        tables = [("disentangled", "")] + ([("as_written", AS_WRITTEN)] if gamma is not None else [])
        for label, suffix in tables:
            files = [disentangled_name(d) + suffix for d in names]
            kept = [d for d, f in zip(names, files, strict=True) if f in have]
            if label == "disentangled" and len(kept) < len(names):
                missing = [d for d in names if d not in kept]
                summary["not_disentangled"] = missing
                log(
                    f"disentangled table: no eq. (11) file for {', '.join(missing)} "
                    f"(run `hspace disentangle {run.root}` for them); left out of that table"
                )
            if not kept:
                continue
            loaded_p = dirfile.load_run_directions(
                run, meta, [disentangled_name(d) + suffix for d in kept], unet, scheduler
            )
            variants.append((label, kept, [v for v, _ in loaded_p]))
            if label == "disentangled":
                summary["disentangled_against"] = {
                    d: md.get("against", "").split(",") for d, (_, md) in zip(kept, loaded_p, strict=True)
                }
                summary["keep_norm"] = all(md.get("keep_norm") == "true" for _, md in loaded_p)
        if summary.get("keep_norm") is False:  # the "disentangled" table already is eq. (11) as written
            variants = [v for v in variants if v[0] != "as_written"]
    total, done = 1 + sum(len(vs) for _, _, vs in variants), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    base = metrics.edit_scores(unet, scheduler, net, replay, indices, None, 0.0)
    tick()
    cal_base = metrics.edit_scores(unet, scheduler, net, replay, cal_idx, None, 0.0) if gamma is None else None
    row_of = dict(zip(variants[0][1], rows, strict=True))
    for label, table_names, vs in variants:
        table_rows = [row_of[d] for d in table_names]
        if gamma is not None:
            gammas = [float(gamma)] * len(vs)
        else:
            gammas, calibration = [], {}
            for d, row, v in zip(table_names, table_rows, vs, strict=True):
                j = columns.index(row)
                goal = target if target is not None else (10.0 if row in degrees else 0.5)
                try:
                    c = metrics.calibrate_edit(unet, scheduler, net, replay, cal_idx, v, j, goal, cal_base)
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
        matrix = metrics.leakage_matrix(unet, scheduler, net, replay, indices, vs, gammas, base=base, on_row=tick)
        out.write_leakage(label, matrix, table_rows, columns, degrees)
        # probabilities and degrees do not average together: the top-level means are over the
        # probability columns, ``degrees`` holds the same means over the pose columns
        summary[label] = {"gamma": dict(zip(table_names, gammas, strict=True))}
        summary[label].update(metrics.leakage_means(matrix, table_rows, columns, set(columns) - set(degrees)))
        if set(degrees) & set(columns):
            summary[label]["degrees"] = metrics.leakage_means(matrix, table_rows, columns, set(degrees))
        probabilities = set(columns) - set(degrees)
        summary[label]["per_direction"] = {  # each direction's own leakage, to say which one a projection worsened
            d: metrics.leakage_means(matrix[i : i + 1], [r], columns, probabilities)["mean_offdiagonal"]
            for i, (d, r) in enumerate(zip(table_names, table_rows, strict=True))
        }
        summary[label]["per_direction_own"] = {  # and its own change: tables of other rows compare on common ones
            d: metrics.leakage_means(matrix[i : i + 1], [r], columns, probabilities)["mean_diagonal"]
            for i, (d, r) in enumerate(zip(table_names, table_rows, strict=True))
        }
    out.write_summary(summary)
    return summary


# ----------------------------------------------------------------------------- the stage


def evaluate_stage(run: RunFolder, evaluate, disentangle, directions, device, ctx: Context) -> dict:
    if not evaluate.enabled or directions.latent != "h":
        return {"outputs": [], "skipped": True}
    with ctx.progress() as bar:
        job = bar.add_task("evaluate (edit-and-score passes)", total=None, rate="")
        summary = run_evaluation(
            str(run.root),
            evaluate.directions or list(directions.attributes) + [f"{a}_prompt" for a in directions.prompt_pairs],
            methods=evaluate.methods,
            disentangled=evaluate.disentangled and disentangle.enabled,
            evaluator=evaluate.evaluator,
            n=evaluate.n,
            gamma=None if evaluate.gamma == "auto" else evaluate.gamma,
            target=evaluate.target,
            calibration_n=evaluate.calibration_n,
            prompts=evaluate.prompts,
            device=ctx.device,
            log=ctx.log,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    return {
        "outputs": outputs(run, [EvalFolder(run.eval).summary_path]),
        "summary": {k: summary[k] for k in summary if k != "calibration"},
    }


def _publish(run: RunFolder, slug: str) -> None:
    """The leakage tables as Prefect table artifacts."""
    import csv

    from prefect.artifacts import create_table_artifact

    from hspace.data.eval_folder import TABLES

    for label in TABLES:
        path = EvalFolder(run.eval).leakage_csv(label)
        if path.exists():
            rows = list(csv.DictReader(path.open()))
            create_table_artifact(
                rows, key=f"hspace-{slug}-leakage-{label.replace('_', '-')}", description=f"leakage ({label})"
            )


def evaluate_cost(cfg) -> int:
    """U-Net sample-passes of Table 1 under ``cfg`` (a RunConfig): the unedited renders and one
    per row and variant on the evaluated samples; --gamma auto adds its bisection's cap (16
    renders per row) on the calibration samples."""
    from hspace.tasks.config import evaluated_rows

    s, ev, d = cfg.sample, cfg.evaluate, cfg.directions
    if not (ev.enabled and d.latent == "h"):
        return 0
    held, rows = d.held_out_of({}), len(evaluated_rows(cfg))
    reserved = ev.calibration_n if ev.gamma == "auto" else 0
    n_eval = ev.n or min(1000, held - reserved)
    variants = 1 + (ev.disentangled and cfg.disentangle.enabled) * (
        1 + (cfg.disentangle.keep_norm and ev.gamma != "auto")
    )
    passes = (1 + variants * rows) * n_eval * s.steps
    if reserved:
        passes += (1 + variants * rows * 16) * reserved * s.steps
    return passes


def leakage_line(result: dict) -> str:
    """The evaluate stage's line: Table 1's mean |off-diagonal|, and how eq. (11) changes it
    (norm kept, then as written where that table was made)."""
    summary = result.get("summary", {})
    before = summary.get("original", {})
    off, diag = before.get("mean_offdiagonal"), before.get("mean_diagonal")
    if off is None or diag is None:
        return ""
    changes = [(label, leakage_change(summary, label)) for label in TABLES[1:]]
    text = [
        ("as written " if label == "as_written" else "")
        + f"{c['after']:.3g} ({c['change']:+.0%}), diagonal kept {c['kept']:.0%}"
        for label, c in changes
        if c
    ]
    failed = calibration_misses(summary)
    miss = f"; gamma auto missed its target for {', '.join(sorted(failed))}" if failed else ""
    if not text:
        return f"leakage off-diagonal {off:.3g}, diagonal {diag:.3g}{miss}"
    worse = leaked_more(summary)
    worse_text = [
        f"{w['direction']} {w['before']:.3g} -> {w['after']:.3g} ({table_title(w['table'], summary)})" for w in worse
    ]
    warn = "; leaks MORE after the projection: " + ", ".join(worse_text) if worse else ""
    return f"leakage off-diagonal {off:.3g} -> " + "; ".join(text) + warn + miss


STAGE = Stage(
    "evaluate",
    sections=("evaluate", "disentangle", "directions", "device"),
    inputs=("directions", "disentangle", "annotate"),
    outputs=("eval",),
    body=evaluate_stage,
    summary=leakage_line,
    publish=_publish,
    cost=evaluate_cost,
    cli_sections={"evaluate": None},
    doc="Table 1: mean change of every attribute per direction, original and disentangled (the eq. (11) "
    "files of `hspace disentangle`), on held-out samples.",
)
