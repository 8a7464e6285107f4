"""`hspace diffae RUN`: directions in a diffusion autoencoder's semantic code z_sem (toy-diffae,
hcore/diffae.py), found on a run's own samples, so that they meet the run's h-space directions
on the same samples, labels and held-out seeds (hcore/edits/zsem.py applies them).

- The code: the run's first ``samples`` samples (their stored images) encoded, z_sem normalised
  per dimension by the autoencoder's statistics.
- ``zsem`` (DiffAE sec. 5.2): per attribute, a logistic regression of the run's labels (the
  annotator's score > 0.5, as eq. (10)'s ranking reads the same annotations) on the code; the
  direction is its unit normal.
- ``zsem-sparse`` (HDAE's sparse hyperplanes, the reading note's sec. IX): the normal keeping
  its top-k weights for each k of ``k``; each k's held-out accuracy (the sparse hyperplane as a
  classifier) and own change and leakage at gamma ``PROBE_GAMMA`` are recorded, and the k with
  the most own change per leakage is saved.
- The probe (the comparison with h-space): 5-fold cross-validated accuracy of a linear
  probe of every binary factor from z_sem and from h_{T:1} (both reduced to their top 64
  principal axes, so that neither has more room), and the cosine between attributes' normals
  in z_sem beside the labels' own correlations (what each inherits from the world):
  directions/zsem/probe.json.

Each saved edit is scored on the run's last ``held_out`` samples at GAMMAS (gamma 0: the
autoencoder's reconstruction, what the code keeps) and drawn beside it (NAME.png).
"""

from __future__ import annotations

import json

import numpy as np

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs

GAMMAS = (0.0, 8.0, 16.0, 32.0)
PROBE_GAMMA = 16.0  # the k sweep's edit strength
PROBE_DIMS = 64  # principal axes both probes read


def problems(section, n: int) -> list[str]:
    """What in ``diffae`` cannot run on a run of ``n`` samples."""
    p = []
    if section.samples + section.held_out > n:
        p.append(
            f"diffae: samples {section.samples} + held_out {section.held_out} exceed the run's {n} samples "
            "(lower them, or sample more)"
        )
    if not section.attributes:
        p.append("diffae.attributes: name at least one attribute of the run's annotations")
    if any(k < 1 for k in section.k):
        p.append(f"diffae.k: {section.k}: each k keeps that many weights, >= 1")
    return p


def model_problems(section, image_size: int) -> list[str]:
    """The autoencoder named, against the run's image size (loaded: one line where it is none)."""
    from hspace.data.diffae import load_diffae

    model = load_diffae(section.model)[0]
    side = model.unet.config.sample_size
    if side != image_size:
        return [f"diffae.model: {section.model} encodes {side} px images, the run's are {image_size} px"]
    return []


def check(run: RunFolder, cfg, ctx) -> None:
    """`hspace diffae RUN`: the section against the run and its autoencoder, before any work."""
    if cfg.diffae is None or not run.run_json.exists():
        return
    from hspace.data.stores import SampleStore

    meta = run.read()
    found = problems(cfg.diffae, meta["config"]["n"])
    if not found and run.samples.exists():
        found = model_problems(cfg.diffae, int(SampleStore(run.samples).x0.shape[-1]))
    if found:
        raise RunError(found[0])


def labels(run: RunFolder, attributes: list[str], n: int):
    """The run's annotator scores (n, A) of ``attributes``; RunError where it has none."""
    from hspace.data.stores import AnnotationStore

    if not run.annotations.exists():
        raise RunError(f"{run.root} has no annotations; run `hspace annotate {run.root}` first")
    scores, names = AnnotationStore(run.annotations).scores()
    missing = [a for a in attributes if a not in names]
    if missing:
        raise RunError(f"diffae.attributes: {', '.join(missing)} not in the run's annotations ({', '.join(names)})")
    return scores[:n, [names.index(a) for a in attributes]]


def diffae_stage(run: RunFolder, diffae, ctx: Context) -> dict:
    if diffae is None:
        return {"outputs": [], "skipped": True}
    import torch
    from sklearn.linear_model import LogisticRegression

    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.data.diffae import diffae_fingerprint, load_diffae
    from hspace.data.stores import SampleStore
    from hspace.hcore.edits.zsem import CodeDirection
    from hspace.hcore.sampler import to_unit

    meta = run.read()
    require_sampled(meta, "hspace diffae")
    cfg = meta["config"]
    store = SampleStore(run.samples)
    found = problems(diffae, cfg["n"]) or model_problems(diffae, int(store.x0.shape[-1]))
    if found:
        raise RunError(found[0])
    y = labels(run, diffae.attributes, diffae.samples) > 0.5
    same = [a for j, a in enumerate(diffae.attributes) if y[:, j].all() or not y[:, j].any()]
    if same:
        raise RunError(
            f"diffae.attributes: {same[0]} reads the same on all of the first {diffae.samples} samples, so no "
            "hyperplane separates them: drop it or raise diffae.samples"
        )
    auto, scheduler, _, stats = load_diffae(diffae.model, ctx.device)
    with torch.no_grad():
        x0 = to_unit(store.x0[: diffae.samples]).to(ctx.device)
        raw = torch.cat([auto.encoder(x0[i : i + 256]) for i in range(0, len(x0), 256)]).cpu()
    code = ((raw - stats["mean"].cpu()) / stats["std"].cpu()).numpy()
    unet, run_scheduler = models.load_for_run(meta, device=ctx.device)
    replay = models.replay_for_run(meta, device=ctx.device)
    net = load_annotator(diffae.evaluator, ctx.device)
    held = list(range(cfg["n"] - diffae.held_out, cfg["n"]))
    base = {"diffae": str(diffae.model), "diffae_fingerprint": diffae_fingerprint(diffae.model),
            "diffae_steps": diffae.steps, "model": meta["model"]["fingerprint"],
            "model_id": models.ref_of(meta).id, "samples": diffae.samples}  # fmt: skip
    direction = lambda normal: CodeDirection(torch.from_numpy(normal).float(), auto, scheduler, stats, diffae.steps)  # noqa: E731
    model = (unet, run_scheduler, replay, net)
    results, paths, normals = {}, [], {}
    with ctx.progress() as bar:
        job = bar.add_task("diffae (attributes)", total=len(diffae.attributes), rate="")
        for j, name in enumerate(diffae.attributes):
            clf = LogisticRegression(max_iter=2000).fit(code, y[:, j])
            w = clf.coef_[0] / np.linalg.norm(clf.coef_[0])
            normals[name] = w
            info = {**base, "attribute": name, "train_accuracy": float(clf.score(code, y[:, j]))}
            r = score(run, "zsem", name, w, info, held, direction, model, ctx)
            sweep = k_sweep(clf.coef_[0], clf.intercept_[0], code, y[:, j], diffae.k, held, direction, model, name)
            best = max(sweep, key=lambda k: sweep[k]["own_change"] / max(sweep[k]["leakage"], 1e-3))
            info = {**info, "k": int(best), "k_sweep": sweep}
            rs = score(run, "zsem-sparse", name, sparse(w, int(best)), info, held, direction, model, ctx)
            results[name] = {"zsem": r, "zsem-sparse": rs | {"k": int(best)}}
            paths += [p for x in (r, rs) for p in (x.pop("path"), x.pop("figure")) if p]
            bar.advance(job)
    probe_file = dirfile.code_probe_file(run)
    probe_file.parent.mkdir(parents=True, exist_ok=True)
    probe_file.write_text(json.dumps(probe(store, code, y, diffae.attributes, normals), indent=2))
    return {"outputs": outputs(run, [*paths, probe_file]), "edits": results}


def sparse(w: np.ndarray, k: int) -> np.ndarray:
    """HDAE's sparse hyperplane: ``w`` keeping its ``k`` largest weights by magnitude, unit."""
    keep = np.argsort(-np.abs(w))[: min(k, len(w))]
    out = np.zeros_like(w)
    out[keep] = w[keep]
    return out / np.linalg.norm(out)


def k_sweep(coef, b, code, y, ks, held, direction, model, name: str) -> dict:
    """{k: the sparse hyperplane's accuracy on the training code (coef_k . z + b > 0, coef_k
    the classifier's weights keeping the top k), its own change and leakage on the held-out
    samples at PROBE_GAMMA}."""
    from hspace.hcore.edits import get

    unet, scheduler, replay, net = model
    col = net.names.index(name)
    degrees = set(getattr(net, "degrees", ()))
    others = [i for i, c in enumerate(net.names) if i != col and c not in degrees]
    base = net.score(replay.render(unet, scheduler, held)).numpy() if held else None
    out = {}
    for k in ks:
        wk = sparse(coef, k)
        kept = np.where(wk != 0, coef, 0.0)
        entry = {"accuracy": float(((code @ kept + b > 0) == y).mean())}
        if held:
            made = get("zsem-sparse")(direction(wk), replay.render(unet, scheduler, held), name)
            change = net.score(replay.render(unet, scheduler, held, edit=made.action(PROBE_GAMMA))).numpy() - base
            entry |= {"own_change": float(change[:, col].mean()), "leakage": float(np.abs(change[:, others]).mean())}
        else:
            entry |= {"own_change": 0.0, "leakage": 1.0}
        out[str(k)] = entry
    return out


def score(run: RunFolder, method: str, name: str, normal, info: dict, held: list[int], direction, model, ctx) -> dict:
    """Save the direction, then its held-out sweep over GAMMAS (metadata, NAME.png)."""
    import torch

    from hspace.data import directions as dirfile
    from hspace.tasks.avi import alpha_sweep, draw_sweep

    unet, scheduler, replay, net = model
    path = dirfile.trained_file(run, method, name)
    state = {"normal": torch.from_numpy(np.ascontiguousarray(normal)).float()}
    dirfile.save_trained(path, state, {**info, "method": method})
    cls, trained, _ = dirfile.load_trained(path, info["model"], None, ctx.device)  # as users load it
    made = cls.from_replay(replay, unet, scheduler, held, trained, name) if held else None
    sweep, images = alpha_sweep(made, replay, unet, scheduler, held, net, GAMMAS) if held else ({}, None)
    dirfile.save_trained(path, state, {**info, "method": method, "gamma_sweep": sweep,
                                       "held_out": [held[0], held[-1] + 1] if held else []})  # fmt: skip
    figure = path.with_suffix(".png")
    if images is not None:
        draw_sweep(images, sweep, name, figure, f"{method} {name}: gamma sweep on held-out samples (mean own change)")
    own = sweep.get(f"{PROBE_GAMMA:g}", {}).get(name)
    if own is not None:
        ctx.log(f"{method} {name}: gamma {PROBE_GAMMA:g} on {len(held)} held-out samples moves it by {own:+.3f}")
    return {"path": path, "figure": figure if images is not None else None, "own_change": own, "sweep": sweep}


def probe(store, code: np.ndarray, y: np.ndarray, attributes: list[str], normals: dict) -> dict:
    """Linear probes of every attribute from z_sem and from h_{T:1} (each on its top PROBE_DIMS
    principal axes, 5-fold cross-validated accuracy), and the cosines between attributes' normals."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(code)
    h = np.asarray(store.h[:n], dtype=np.float32).reshape(n, -1)
    spaces = {"z_sem": code, "h": h}
    folds = max(2, min(5, int(min(y.sum(0).min(), (~y).sum(0).min()))))
    acc = {}
    for space, feats in spaces.items():
        dims = min(PROBE_DIMS, n - n // folds - 1, feats.shape[1])
        pipe = make_pipeline(StandardScaler(), PCA(dims, random_state=0), LogisticRegression(max_iter=2000))
        acc[space] = {a: float(cross_val_score(pipe, feats, y[:, j], cv=folds).mean())
                      for j, a in enumerate(attributes) if 0 < y[:, j].sum() < n}  # fmt: skip
    names = sorted(normals)
    cos = {f"{a}~{b}": float(normals[a] @ normals[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    return {"n": n, "folds": folds, "dims": PROBE_DIMS, "probe_accuracy": acc, "z_sem_normal_cosines": cos,
            "label_correlation": {f"{a}~{b}": float(np.corrcoef(y[:, i], y[:, j])[0, 1])
                                  for i, a in enumerate(attributes) for j, b in enumerate(attributes) if j > i
                                  and 0 < y[:, i].sum() < n and 0 < y[:, j].sum() < n}}  # fmt: skip


def diffae_line(result: dict) -> str:
    if result.get("skipped"):
        return ""
    parts = []
    for name, r in result.get("edits", {}).items():
        own, own_k = r["zsem"]["own_change"], r["zsem-sparse"]["own_change"]
        if own is not None:
            parts.append(f"{name} ({own:+.3f}; top-{r['zsem-sparse']['k']} {own_k:+.3f})")
        else:
            parts.append(name)
    return f"z_sem directions at gamma {PROBE_GAMMA:g}: " + ", ".join(parts)


def diffae_cost(cfg) -> int:
    """U-Net passes (forward calls) of the run's model and the autoencoder: per attribute, the
    held-out renders for each saved edit's sweep (plain, then the autoencoder's inversion and a
    decoding per gamma) and for each k of the sweep (plain, render, inversion, one decoding)."""
    d = cfg.diffae
    if d is None:
        return 0
    steps, held = cfg.sample.steps, d.held_out
    edit = held * (2 * steps + d.steps * (1 + len(GAMMAS)))
    sweep = held * steps + len(d.k) * held * (steps + 2 * d.steps)
    return len(d.attributes) * (2 * edit + sweep)


STAGE = Stage(
    "diffae",
    sections=("diffae",),
    inputs=("sample", "annotate"),
    outputs=("directions",),
    body=diffae_stage,
    summary=diffae_line,
    cost=diffae_cost,
    check=check,
    cli_sections={"diffae": None},
    doc="Directions in a diffusion autoencoder's code z_sem (toy-diffae) from the run's labelled samples: DiffAE's "
    "normal (zsem) and HDAE's sparse one (zsem-sparse), RUN/directions/METHOD/ATTR, and the probes of z_sem vs h.",
)
