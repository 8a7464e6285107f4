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
  in z_sem and between the run's eq. (10) directions in h, beside the labels' own correlations
  (what each inherits from the world): directions/zsem/probe.json.

Each saved edit is scored on the run's last ``held_out`` samples at GAMMAS (gamma 0: the
autoencoder's reconstruction, what the code keeps) and drawn beside it (NAME.png).

A hierarchical autoencoder (HDAE, toy-hdae: codes of several encoder levels) gives the same two
edits as ``hdae-dense`` and ``hdae`` (HDAE's own: the sparse hyperplane), each file recording
how the normal's weight falls on the code's levels (HDAE's Fig. 18) and where its top k sit; the
probe gains each level's code alone (directions/hdae/probe.json). PADA stays on a flat code.
"""

from __future__ import annotations

import json
import time

import numpy as np

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs

GAMMAS = (0.0, 8.0, 16.0, 32.0)
PADA_STRENGTHS = (0.0, 1.0, 2.0, 4.0)  # PADA's: the share of the way to z_age (1: its output)
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
    if model.levels and section.pada_attribute is not None:
        return [f"diffae.pada_attribute: PADA edits a flat z_sem (toy-diffae); with the hierarchical {section.model} "
                "give --pada-attribute none"]  # fmt: skip
    return []


def method_names(auto) -> tuple[str, str]:
    """The (dense, sparse) methods of an autoencoder's hyperplanes: zsem / zsem-sparse on a flat
    code, hdae-dense / hdae on a hierarchical one."""
    return ("hdae-dense", "hdae") if auto.levels else ("zsem", "zsem-sparse")


def section_problems(section, n: int, image_size: int | None) -> list[str]:
    """``problems`` of the section for a run of ``n`` samples, then (where there are none) its
    autoencoder against ``image_size`` px images (None: not known yet) and PADA's CLIP and texts,
    loaded."""
    found = problems(section, n)
    try:
        if not found and image_size is not None:
            found = model_problems(section, image_size)
        if not found:
            age_guide(section, "cpu")
    except RunError as e:
        found.append(str(e))
    return found


def config_problems(cfg, image_size: int) -> list[str]:
    """The diffae section (none without one) of `hspace run`'s config, for a model of
    ``image_size`` px images (``section_problems``)."""
    return [] if cfg.diffae is None else section_problems(cfg.diffae, cfg.sample.n, image_size)


def check(run: RunFolder, cfg, ctx) -> None:
    """`hspace diffae RUN`: the section against the run and its autoencoder, before any work."""
    if cfg.diffae is None or not run.run_json.exists():
        return
    from hspace.data.stores import SampleStore

    meta = run.read()
    size = int(SampleStore(run.samples).x0.shape[-1]) if run.samples.exists() else None
    found = section_problems(cfg.diffae, meta["config"]["n"], size)
    if found:
        raise RunError(found[0])
    if run.annotations.exists():
        labels(run, wanted(cfg.diffae), 1)


def wanted(diffae) -> list[str]:
    """The attributes whose labels the stage reads: the hyperplanes' and PADA's."""
    extra = [diffae.pada_attribute] if diffae.pada_attribute and diffae.pada_attribute not in diffae.attributes else []
    return [*diffae.attributes, *extra]


def age_guide(diffae, device: str):
    """PADA's CLIP with its two texts (None without PADA); RunError where it does not load or
    does not know a word."""
    if diffae.pada_attribute is None:
        return None
    from hspace.data.annotators import load_clip_guide

    try:
        return load_clip_guide(diffae.clip, device, list(diffae.pada_texts))
    except RunError as e:
        raise RunError(f"diffae.clip: {e}") from None


def labels(run: RunFolder, attributes: list[str], n: int):
    """The run's annotator scores (n, A) of ``attributes``; RunError where it has none."""
    from hspace.tasks.supervised import attribute_scores

    scores, names = attribute_scores(run, attributes, "diffae.attributes")
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
    from hspace.hcore.diffae import level_shares
    from hspace.hcore.edits.zsem import CodeDirection, ZSem
    from hspace.hcore.sampler import to_unit

    meta = run.read()
    require_sampled(meta, "hspace diffae")
    cfg = meta["config"]
    store = SampleStore(run.samples)
    found = problems(diffae, cfg["n"]) or model_problems(diffae, int(store.x0.shape[-1]))
    if found:
        raise RunError(found[0])
    y = labels(run, wanted(diffae), diffae.samples) > 0.5
    guide = age_guide(diffae, ctx.device)
    same = [a for j, a in enumerate(wanted(diffae)) if y[:, j].all() or not y[:, j].any()]
    if same:
        raise RunError(
            f"diffae.attributes: {same[0]} reads the same on all of the first {diffae.samples} samples, so no "
            "hyperplane separates them: drop it or raise diffae.samples"
        )
    auto, scheduler, _, stats = load_diffae(diffae.model, ctx.device)
    dense_name, sparse_name = method_names(auto)
    levels = auto.code_parts()
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
    direction = lambda normal: CodeDirection(torch.from_numpy(normal).float(), auto, scheduler, stats,  # noqa: E731
                                             diffae.steps, base["diffae_fingerprint"])  # fmt: skip
    model = (unet, run_scheduler, replay, net)
    own = replay.render(unet, run_scheduler, held) if held else None  # encoded once per attribute, edited by all
    results, paths, normals = {}, [], {}
    with ctx.progress() as bar:
        job = bar.add_task("diffae (attributes)", total=len(diffae.attributes), rate="")
        for j, name in enumerate(diffae.attributes):
            clf = LogisticRegression(max_iter=2000).fit(code, y[:, j])  # y's first columns: the attributes
            w = clf.coef_[0] / np.linalg.norm(clf.coef_[0])
            normals[name] = w
            info = {**base, "attribute": name, "train_accuracy": float(clf.score(code, y[:, j]))}
            if auto.levels:
                info["level_shares"] = level_shares(w, levels)
            template = ZSem(direction(w), own, name) if held else None
            r = score(run, dense_name, name, normal_state(w), info, held, model, ctx, template=template)
            sweep = k_sweep(clf.coef_[0], clf.intercept_[0], code, y[:, j], diffae.k, template, net, direction, name)
            best = max(sweep, key=lambda k: sweep[k]["own_change"] / max(sweep[k]["leakage"], 1e-3))
            info = {**info, "k": int(best), "k_sweep": sweep}
            kept = sparse(w, int(best))
            if auto.levels:
                info["kept_per_level"] = {lv: int((kept[part] != 0).sum()) for lv, part in levels.items()}
            rs = score(run, sparse_name, name, normal_state(kept), info, held, model, ctx, template=template)
            paths += [p for x in (r, rs) for p in (x.pop("path"), x.pop("figure")) if p]
            results[name] = {dense_name: r, sparse_name: rs | {"k": int(best)}}
            bar.advance(job)
    if diffae.pada_attribute is not None:
        age = y[:, wanted(diffae).index(diffae.pada_attribute)]
        state, info = train_age(diffae, guide, x0, code, age, (auto, scheduler, stats), ctx)
        r = score(run, "pada", diffae.pada_attribute, state, {**base, **info}, held, model, ctx, PADA_STRENGTHS)
        paths += [p for p in (r.pop("path"), r.pop("figure")) if p]
        results[diffae.pada_attribute] = results.get(diffae.pada_attribute, {}) | {"pada": r}
    probe_file = dirfile.code_probe_file(run, "hdae" if auto.levels else "zsem")
    probe_file.parent.mkdir(parents=True, exist_ok=True)
    h_dirs = {a: dirfile.load(run.direction(a))[0].flatten().numpy() for a in normals if run.direction(a).exists()}
    parts = {f"z_sem {lv}": code[:, part] for lv, part in levels.items()} if auto.levels else {}
    found = probe(store, code, y, diffae.attributes, normals, parts) | {"h_direction_cosines": cosines(h_dirs)}
    probe_file.write_text(json.dumps(found, indent=2))
    return {"outputs": outputs(run, [*paths, probe_file]), "edits": results, "methods": [dense_name, sparse_name]}


def train_age(diffae, guide, x0, code, age, auto, ctx) -> tuple[dict, dict]:
    """PADA (hcore/pada.py) on the training samples: (its state with the mean CLIP image feature
    of the samples of the target age, its metadata)."""
    import torch

    from hspace.hcore.pada import Pada, train_pada

    model, scheduler, stats = auto
    texts = guide.text(list(diffae.pada_texts))
    pada = Pada(texts.shape[1], code.shape[1])
    start = time.perf_counter()
    ages = torch.from_numpy(age.astype(np.int64))
    with ctx.progress() as bar:
        job = bar.add_task("pada (steps)", total=diffae.pada_steps, rate="")
        losses = train_pada(pada, model, scheduler, guide, x0, torch.from_numpy(code).float(), stats, ages, texts,
                            steps=diffae.pada_steps, on_step=lambda i, _: bar.update(job, completed=i))  # fmt: skip
    with torch.no_grad():
        reference = guide.image(x0[torch.from_numpy(age)]).mean(0).cpu()
    state = {f"pada.{k}": v.detach().cpu().contiguous() for k, v in pada.state_dict().items()}
    state["reference"] = reference
    info = {"attribute": diffae.pada_attribute, "target": diffae.pada_texts[1], "source_text": diffae.pada_texts[0],
            "clip": diffae.clip, "clip_dim": int(texts.shape[1]), "hidden": pada.hidden, "losses": losses,
            "train_minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    return state, info


def sparse(w: np.ndarray, k: int) -> np.ndarray:
    """HDAE's sparse hyperplane: ``w`` keeping its ``k`` largest weights by magnitude, unit."""
    keep = np.argsort(-np.abs(w))[: min(k, len(w))]
    out = np.zeros_like(w)
    out[keep] = w[keep]
    return out / np.linalg.norm(out)


def k_sweep(coef, b, code, y, ks, template, net, direction, name: str) -> dict:
    """{k: the sparse hyperplane's accuracy on the training code (coef_k . z + b > 0, coef_k
    the classifier's weights keeping the top k), its own change and leakage at PROBE_GAMMA on
    the held-out samples ``template`` encoded (against their own renders)}."""
    col = net.names.index(name)
    degrees = set(getattr(net, "degrees", ()))
    others = [i for i, c in enumerate(net.names) if i != col and c not in degrees]
    base = net.score(template.images).numpy() if template is not None else None
    out = {}
    for k in ks:
        wk = sparse(coef, k)
        kept = np.where(wk != 0, coef, 0.0)
        entry = {"accuracy": float(((code @ kept + b > 0) == y).mean())}
        if template is not None:
            change = net.score(template.with_edit(direction(wk)).action(PROBE_GAMMA).images()).numpy() - base
            entry |= {"own_change": float(change[:, col].mean()), "leakage": float(np.abs(change[:, others]).mean())}
        else:
            entry |= {"own_change": 0.0, "leakage": 1.0}
        out[str(k)] = entry
    return out


def normal_state(normal) -> dict:
    import torch

    return {"normal": torch.from_numpy(np.ascontiguousarray(normal)).float()}


def score(run: RunFolder, method: str, name: str, state: dict, info: dict, held: list[int], model, ctx,
          strengths=GAMMAS, template=None) -> dict:  # fmt: skip
    """Save the edit, then its held-out sweep over ``strengths`` (metadata, NAME.png:
    tasks.avi.save_swept); ``template``: the held-out samples encoded already (a z_sem
    direction's, reused)."""
    from hspace.data import directions as dirfile
    from hspace.tasks.avi import save_swept

    path = dirfile.trained_file(run, method, name)
    shown = PROBE_GAMMA if PROBE_GAMMA in strengths else strengths[-2]
    make = (lambda cls, trained: template.with_edit(trained)) if template is not None else None
    r = save_swept(path, state, {**info, "method": method}, held, model, strengths, shown, ctx, make)
    return {"path": path, **r, "at": shown}


def probe(store, code: np.ndarray, y: np.ndarray, attributes: list[str], normals: dict, parts=None) -> dict:
    """Linear probes of every attribute from z_sem and from h_{T:1} (each on its top PROBE_DIMS
    principal axes, 5-fold cross-validated accuracy), and from each of ``parts`` ({name: codes}:
    a hierarchical code's levels alone), and the cosines between attributes' normals."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(code)
    h = np.asarray(store.h[:n], dtype=np.float32).reshape(n, -1)
    spaces = {"z_sem": code, "h": h, **(parts or {})}
    folds = max(2, min(5, int(min(y.sum(0).min(), (~y).sum(0).min()))))
    acc = {}
    for space, feats in spaces.items():
        dims = min(PROBE_DIMS, n - n // folds - 1, feats.shape[1])
        pipe = make_pipeline(StandardScaler(), PCA(dims, random_state=0), LogisticRegression(max_iter=2000))
        acc[space] = {a: float(cross_val_score(pipe, feats, y[:, j], cv=folds).mean())
                      for j, a in enumerate(attributes) if 0 < y[:, j].sum() < n}  # fmt: skip
    return {"n": n, "folds": folds, "dims": PROBE_DIMS, "probe_accuracy": acc, "z_sem_normal_cosines": cosines(normals),
            "label_correlation": {f"{a}~{b}": float(np.corrcoef(y[:, i], y[:, j])[0, 1])
                                  for i, a in enumerate(attributes) for j, b in enumerate(attributes) if j > i
                                  and 0 < y[:, i].sum() < n and 0 < y[:, j].sum() < n}}  # fmt: skip


def cosines(vectors: dict) -> dict:
    """{"A~B": cos(v_A, v_B)} for every pair of attributes (names sorted)."""
    names = sorted(vectors)
    unit = {a: vectors[a] / max(float(np.linalg.norm(vectors[a])), 1e-12) for a in names}
    return {f"{a}~{b}": float(unit[a] @ unit[b]) for i, a in enumerate(names) for b in names[i + 1 :]}


def diffae_line(result: dict) -> str:
    if result.get("skipped"):
        return ""
    parts = []
    for name, r in result.get("edits", {}).items():
        if "pada" in r and r["pada"]["own_change"] is not None:
            parts.append(f"PADA {name} ({r['pada']['own_change']:+.3f} at {r['pada']['at']:g})")
        pair = result["methods"]
        if pair[0] not in r:
            continue
        own, own_k = r[pair[0]]["own_change"], r[pair[1]]["own_change"]
        if own is not None:
            parts.append(f"{name} ({own:+.3f}; top-{r[pair[1]]['k']} {own_k:+.3f})")
        else:
            parts.append(name)
    return f"z_sem directions at gamma {PROBE_GAMMA:g}: " + ", ".join(parts)


def diffae_cost(cfg) -> int:
    """U-Net sample-passes of the run's model and the autoencoder: the held-out samples rendered
    once; per attribute their inversion (eq. (14)), each saved edit's sweep (a plain render and
    a decoding per gamma) and a decoding per k; PADA two passes of a batch of 16 per training
    step (the edited and the plain one-step image), the samples rendered and inverted again
    (with its z_age) and its sweep."""
    d = cfg.diffae
    if d is None:
        return 0
    steps, held = cfg.sample.steps, d.held_out
    sweep = held * (steps + d.steps * len(GAMMAS))  # a plain render, a decoding per gamma
    inversion = held * (d.steps + 1)  # hcore.inversion.ddim_invert: one pass per step and one for h_0
    per_attribute = inversion + 2 * sweep + len(d.k) * held * d.steps  # two sweeps, the k sweep
    pada = 2 * 16 * d.pada_steps + held * steps + inversion + held * (steps + d.steps * len(PADA_STRENGTHS))
    return held * steps + len(d.attributes) * per_attribute + (pada if d.pada_attribute is not None else 0)


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
    doc="Directions in a diffusion autoencoder's code z_sem (toy-diffae, or the hierarchical toy-hdae) from the run's "
    "labelled samples: DiffAE's normal (zsem; hdae-dense) and HDAE's sparse one (zsem-sparse; hdae), "
    "RUN/directions/METHOD/ATTR, and the probes of z_sem vs h.",
)
