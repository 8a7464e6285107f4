"""`hspace avi RUN --prompt-pair A B --name NAME`: train an Attribute Vector Integration predictor
(Wang et al. 2025, sec. 3.2; hcore/avi.py) on a text-conditioned run's seeds and save it beside
the run's directions (RUN/directions/avi/NAME.safetensors, data.directions.predictor_file).

Training pairs: for each of the run's first ``samples`` seeds, x_org (the latent at ``org_step``
under A) and x_tar (at ``tar_step`` under B), rendered with the seed's own noise; every latent
channel is one example. Then the trained edit is scored on the run's last ``held_out`` samples
with the judge at alpha 0, 1, 2, 4, 8 (the paper's Fig. 7): the mean change of every factor it
scores (the own change where NAME is one of them), recorded in the predictor's metadata, drawn
beside it (NAME.png: four held-out samples across alpha) and, at alpha 1, in the stage's line.
"""

from __future__ import annotations

import numpy as np

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs


def named_pairs(avi) -> dict[str, tuple[str, str]]:
    """NAME -> (A, B): ``prompt_pairs``, and ``prompt_pair`` under ``name``; possibly none."""
    pairs = dict(avi.prompt_pairs)
    if avi.prompt_pair is not None:
        pairs[avi.name] = tuple(avi.prompt_pair)
    return pairs


def pairs_of(avi) -> dict[str, tuple[str, str]]:
    """:func:`named_pairs`, RunError for none."""
    pairs = named_pairs(avi)
    if not pairs:
        raise RunError("avi.prompt_pair: give the original and the target text (--prompt-pair A B)")
    return pairs


def spec_of(avi, steps: int, latent: tuple[int, int, int], pair: tuple[str, str]):
    """The predictor's AviSpec for a run of ``steps`` steps and latents ``latent`` (C, R, R);
    RunError naming the setting where it cannot be."""
    from hspace.hcore.avi import AviSpec

    c, side, _ = latent
    k = avi.k or side // 2
    org, tar = round(avi.org_share * steps), round(avi.tar_share * steps)
    if 2 * k > side:
        raise RunError(
            f"avi.k: 2k = {2 * k} singular vectors do not fit a {side} x {side} latent channel; k <= {side // 2}"
        )
    if not org < tar < steps:
        raise RunError(
            f"avi.org_share {avi.org_share} and tar_share {avi.tar_share} give steps {org} and {tar} of {steps}: "
            "x_tar must come later than x_org (raise tar_share or sample more steps)"
        )
    return AviSpec(c, side, k, steps, org, tar, pair[0], pair[1], avi.hidden or side * side)


def config_problems(cfg, kind: str, latent: tuple[int, int, int]) -> list[str]:
    """The avi section (none without one) of `hspace run`'s config: its prompt pairs, steps and
    k against the model (``kind``, its latent's (C, R, R))."""
    if cfg.avi is None:
        return []
    if kind == "pixel":
        return ["avi: a prompt pair needs a text-conditioned model (Stable Diffusion); drop the avi section"]
    try:
        for pair in pairs_of(cfg.avi).values():
            spec_of(cfg.avi, cfg.sample.steps, latent, pair)
    except RunError as e:
        return [str(e)]
    return []


def latents(replay, unet, scheduler, indices: list[int], prompt: str, step: int, batch: int = 64):
    import torch

    parts = [
        replay.render(
            unet, scheduler, indices[i : i + batch], prompts=[prompt] * len(indices[i : i + batch]), stop_before=step
        )
        for i in range(0, len(indices), batch)
    ]
    return torch.cat(parts)


def train_avi(run: RunFolder, avi, ctx: Context) -> dict:
    from hspace.data import models
    from hspace.data.annotators import load_annotator

    meta = run.read()
    require_sampled(meta, "hspace avi")
    cfg = meta["config"]
    if models.model_kind(meta) == "pixel":
        raise RunError(f"hspace avi edits toward a prompt: {models.ref_of(meta).id} takes no text (a pixel model)")
    n_train = min(avi.samples, cfg["n"] - avi.held_out)
    if n_train < 1:
        raise RunError(f"avi: the run's {cfg['n']} samples leave none to train on after --held-out {avi.held_out}")
    if len(avi.weights) != 4:
        raise RunError(f"avi.weights: give four lambdas (target, source, their values), got {len(avi.weights)}")
    pairs = pairs_of(avi)
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    replay = models.replay_for_run(meta, device=ctx.device)
    size = unet.config.sample_size
    specs = {name: spec_of(avi, replay.steps, (unet.config.in_channels, size, size), p) for name, p in pairs.items()}
    net = load_annotator(avi.evaluator, ctx.device)
    model = (meta, unet, scheduler, replay, net)
    results = {name: train_one(run, avi, spec, name, n_train, model, ctx) for name, spec in specs.items()}
    paths = [r.pop("path") for r in results.values()]
    paths += [f for f in (r.pop("figure") for r in results.values()) if f is not None]
    return {"outputs": outputs(run, paths), "predictors": results}


def train_one(run: RunFolder, avi, spec, name: str, n_train: int, model, ctx: Context) -> dict:
    """One predictor: its latent pairs, Adam, the held-out score, the file."""
    import torch

    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.hcore.avi import Predictor, train
    from hspace.hcore.edits.avi import AVI

    meta, unet, scheduler, replay, net = model
    cfg = meta["config"]
    with ctx.progress() as bar:
        job = bar.add_task(f"avi {name} (latent pairs)", total=2, rate="")
        idx = list(range(n_train))
        x_org = latents(replay, unet, scheduler, idx, spec.prompt_a, spec.org_step)
        bar.advance(job)
        x_tar = latents(replay, unet, scheduler, idx, spec.prompt_b, spec.tar_step)
        bar.advance(job)
        torch.manual_seed(0)
        f = Predictor(spec)
        fit = bar.add_task(f"avi {name} (epochs)", total=avi.epochs, rate="")
        weights = tuple(avi.weights)
        history = train(
            f, x_org, x_tar, weights, avi.epochs, avi.lr, avi.batch_size, on_epoch=lambda e, t: bar.advance(fit)
        )
    f.eval()
    held = list(range(cfg["n"] - avi.held_out, cfg["n"]))
    sweep, images = alpha_sweep(AVI.from_replay(replay, unet, scheduler, held, f), replay, unet, scheduler, held, net)
    change = sweep.get("1", {})
    info = {"model": meta["model"]["fingerprint"], "model_id": models.ref_of(meta).id, "attribute": name,
            "losses": history[-1], "held_out_change": change, "held_out": [held[0], held[-1] + 1] if held else [],
            "alpha_sweep": sweep, "weights": list(weights), "samples": n_train, "method": "AVI"}  # fmt: skip
    path = dirfile.save_predictor(dirfile.predictor_file(run, name), f, info)
    figure = path.with_suffix(".png")
    if images is not None:
        draw_sweep(images, sweep, name, figure)
    ctx.log(f"avi {name}: alpha 1 on {len(held)} held-out samples moves it by {change.get(name, float('nan')):+.3f}")
    return {"path": path, "figure": figure if images is not None else None, "losses": history[-1],
            "own_change": change.get(name)}  # fmt: skip


ALPHAS = (0.0, 1.0, 2.0, 4.0, 8.0)  # the held-out sweep of the strength (the paper's Fig. 7)


def alpha_sweep(method, replay, unet, scheduler, held: list[int], net, strengths=ALPHAS):
    """({strength: {factor: mean change}}, uint8 images (4, len(strengths) + 1, 3, R, R) of the
    first held-out samples: unedited, then each strength), or ({}, None) without held-out samples."""
    from hspace.hcore.sampler import to_uint8

    if not held:
        return {}, None
    x0 = replay.render(unet, scheduler, held)
    base, shown = net.score(x0).numpy(), [to_uint8(x0[:4]).numpy()]
    sweep = {}
    for alpha in strengths:
        edited = replay.render(unet, scheduler, held, edit=method.action(alpha))
        sweep[f"{alpha:g}"] = dict(zip(net.names, (net.score(edited).numpy() - base).mean(0).tolist(), strict=True))
        shown.append(to_uint8(edited[:4]).numpy())
    return sweep, np.stack(shown, 1)


def save_swept(path, state: dict, info: dict, held: list[int], model, strengths, shown: float, ctx, make=None) -> dict:
    """A trained editor's file (``info``: its metadata, with ``method``, ``attribute``, ``model``
    and, where it is bound to them, ``steps``) saved, loaded back as users load it, made for the
    held-out samples (``make(cls, trained)``; default: the method's ``from_replay``), swept over
    ``strengths`` by the judge, the sweep recorded in the file and drawn beside it (PATH.png); the
    own change at ``shown`` logged. ``model``: (unet, scheduler, replay, net). Returns {"figure":
    the drawing or None, "own_change": at ``shown``, "sweep"}."""
    from hspace.data import directions as dirfile

    unet, scheduler, replay, net = model
    method, name = info["method"], info["attribute"]
    dirfile.save_trained(path, state, info)
    cls, trained, _ = dirfile.load_trained(path, info["model"], info.get("steps"), ctx.device)
    make = make or (lambda c, t: c.from_replay(replay, unet, scheduler, held, t, name))
    sweep, images = (
        alpha_sweep(make(cls, trained), replay, unet, scheduler, held, net, strengths) if held else ({}, None)
    )
    dirfile.save_trained(
        path, state, {**info, "gamma_sweep": sweep, "held_out": [held[0], held[-1] + 1] if held else []}
    )
    figure = path.with_suffix(".png")
    if images is not None:
        draw_sweep(images, sweep, name, figure, f"{method} {name}: gamma sweep on held-out samples (mean own change)")
    own = sweep.get(f"{shown:g}", {}).get(name)
    if own is not None:
        ctx.log(f"{method} {name}: gamma {shown:g} on {len(held)} held-out samples moves it by {own:+.3f}")
    return {"figure": figure if images is not None else None, "own_change": own, "sweep": sweep}


def draw_sweep(images: np.ndarray, sweep: dict, name: str, path, title: str | None = None) -> None:
    """NAME.png beside the trained edit: held-out samples across its strength, each column's own change."""
    from hspace.data.figures import grid_image, save_grid

    cols = ["unedited"] + [f"{a} ({v.get(name, float('nan')):+.2f})" for a, v in sweep.items()]
    title = title or f"AVI {name}: alpha sweep on held-out samples (mean own change)"
    save_grid(path, grid_image(images, [f"#{i}" for i in range(len(images))], cols, title=title))


def avi_line(result: dict) -> str:
    if result.get("skipped"):
        return ""
    parts = []
    for name, r in result.get("predictors", {}).items():
        own = r.get("own_change")
        parts.append(
            f"{name} (source loss {r['losses']['source']:.3g}"
            + (f", own change {own:+.3f})" if own is not None else ")")
        )
    return "predictors: " + ", ".join(parts)


def avi_stage(run: RunFolder, avi, ctx: Context) -> dict:
    if avi is None:
        return {"outputs": [], "skipped": True}
    return train_avi(run, avi, ctx)


def avi_cost(cfg) -> int:
    """The pairs' renders (to org_step under A, to tar_step under B) and the held-out score
    (the x_tar renders, a plain render and one per alpha of the sweep)."""
    a = cfg.avi
    if a is None:
        return 0
    steps = cfg.sample.steps
    org, tar = round(a.org_share * steps), round(a.tar_share * steps)
    n = min(a.samples, cfg.sample.n - a.held_out)
    return len(named_pairs(a)) * (n * (org + tar) + a.held_out * ((1 + len(ALPHAS)) * steps + tar))


STAGE = Stage(
    "avi",
    sections=("avi",),
    inputs=("sample",),
    outputs=("directions",),
    body=avi_stage,
    summary=avi_line,
    cost=avi_cost,
    cli_sections={"avi": None},
    doc="Train an Attribute Vector Integration predictor (Wang et al. 2025) from a prompt pair on a "
    "text-conditioned run: RUN/directions/avi/NAME, usable as the editing method avi.",
)
