"""`hspace clip-edits RUN`: train the editors that learn from CLIP (hcore/clip_editors.py) on a
run's own samples (pixel or latent: a latent model's P_t reach CLIP through its VAE decoder,
with gradients, and its U-Net sees each sample's prompt and guidance as the run sampled them),
one edit per prompt pair, and save each beside the run's directions
(RUN/directions/METHOD/NAME.safetensors, data.directions.trained_file), usable as the editing
methods diffusionclip, asyrp-net and deltaspace (hcore/edits/clip_trained.py).

- diffusionclip: a LoRA fine-tuned from the first ``samples`` samples' x_{t0} (their own point
  at step round(t0_share * steps)) toward their images' text edit;
- asyrp-net: f(h_t, t) trained from the same samples' x_T over the first edit_share of the steps;
- deltaspace: one mapper for every pair, trained on image pairs of every sample before the
  held-out ones (their stored x0 and h_{T:1}), never on a text.

Each edit is then scored on the run's last ``held_out`` samples with the judge at gamma 0, 1,
2, 4: the mean change of every factor, in the file's metadata, the stage's line and NAME.png.
"""

from __future__ import annotations

import time

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs

METHODS = ("diffusionclip", "asyrp-net", "deltaspace")
GAMMAS = (0.0, 1.0, 2.0, 4.0)


def problems(section, n: int, kind: str) -> list[str]:
    """What in ``clip_edits`` cannot run on a run of ``n`` samples (any model ``kind``: a latent
    model's editors learn through its VAE decoder)."""
    p = []
    bad = [m for m in section.methods if m not in METHODS]
    if bad or not section.methods:
        p.append(f"clip_edits.methods: {', '.join(bad) or 'none'}; choose from {', '.join(METHODS)}")
    if not section.prompt_pairs:
        p.append("clip_edits.prompt_pairs: give NAME -> [source text, target text]")
    if section.samples + section.held_out > n:
        p.append(
            f"clip_edits: samples {section.samples} + held_out {section.held_out} exceed the run's {n} samples "
            f"(lower them, or sample more)"
        )
    return p


def config_problems(cfg, kind: str, n: int | None = None) -> list[str]:
    """``problems`` of the config's clip_edits section (none without one) for a run of ``n``
    samples (default: its sample.n), then the CLIP it names, loaded (a missing processor,
    toy-clip's unknown words)."""
    from hspace.data.annotators import load_clip_guide

    section = cfg.clip_edits
    if section is None:
        return []
    found = problems(section, cfg.sample.n if n is None else n, kind)
    if not found:
        try:
            load_clip_guide(section.clip, "cpu", [t for pair in section.prompt_pairs.values() for t in pair])
        except RunError as e:
            found.append(f"clip_edits.clip: {e}")
    return found


def check(run: RunFolder, cfg, ctx) -> None:
    """`hspace clip-edits RUN`: the section against the run, before the lock and any work."""
    from hspace.data import models

    if cfg.clip_edits is not None and run.run_json.exists():
        meta = run.read()
        found = config_problems(cfg, models.model_kind(meta), meta["config"]["n"])
        if found:
            raise RunError(found[0])


def clip_edits_stage(run: RunFolder, clip_edits, ctx: Context) -> dict:
    if clip_edits is None:
        return {"outputs": [], "skipped": True}
    import torch

    from hspace.data import models
    from hspace.data.annotators import load_annotator, load_clip_guide

    meta = run.read()
    require_sampled(meta, "hspace clip-edits")
    cfg = meta["config"]
    found = problems(clip_edits, cfg["n"], models.model_kind(meta))
    if found:
        raise RunError(found[0])
    guide = load_clip_guide(clip_edits.clip, ctx.device, [t for p in clip_edits.prompt_pairs.values() for t in p])
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    replay = models.replay_for_run(meta, device=ctx.device)
    net = load_annotator(clip_edits.evaluator, ctx.device)
    base = {"model": meta["model"]["fingerprint"], "model_id": models.ref_of(meta).id, "steps": replay.steps,
            "clip": clip_edits.clip, "h_point": replay.h_point}  # fmt: skip
    from hspace.data.stores import SampleStore

    size = unet.config.sample_size
    x_shape = models.noise_shape(meta) or (unet.config.in_channels, size, size)
    shapes = (x_shape, int(SampleStore(run.samples).h.shape[2]))  # x_T's shape, h's channels
    model = (unet, scheduler, replay, guide, net, base, shapes)
    train = list(range(clip_edits.samples))
    held = list(range(cfg["n"] - clip_edits.held_out, cfg["n"]))
    torch.manual_seed(0)
    results, paths = {}, []
    mapper = None
    for method in clip_edits.methods:
        if method == "deltaspace":
            start = time.perf_counter()
            mapper = train_mapper(run, cfg, clip_edits, guide, ctx)
            minutes = (time.perf_counter() - start) / 60
        for name, pair in clip_edits.prompt_pairs.items():
            start = time.perf_counter()
            state, extra = train_one(method, clip_edits, tuple(pair), train, model, mapper, ctx, name)
            info = {**base, **extra, "method": method, "attribute": name, "prompt_a": pair[0], "prompt_b": pair[1]}
            info["train_minutes"] = minutes if method == "deltaspace" else (time.perf_counter() - start) / 60
            r = score(run, method, name, state, info, held, model, ctx)
            results[f"{method}:{name}"] = r
            paths += [r.pop("path")] + ([r.pop("figure")] if r.get("figure") else [])
    return {"outputs": outputs(run, paths), "edits": results}


def train_one(method: str, section, pair, train: list[int], model, mapper, ctx: Context, name: str):
    """(the weights to save, their metadata) of ``method`` for one prompt pair."""
    from hspace.hcore import clip_editors as ce
    from hspace.hcore.sampler import ddim_scheduler

    unet, scheduler, replay, guide, _, _, (noise_shape, h_channels) = model
    delta_t = guide.text_delta(*pair)
    steps = replay.steps
    space = ce.Space(replay.text, replay.text.prompts_for(train) if replay.text is not None else None)
    with ctx.progress() as bar:
        if method == "deltaspace":
            return {**mapper.state_dict()}, {"dim": mapper.dim, "hidden": mapper.hidden,
                                             "h_shape": ",".join(map(str, mapper.h_shape))}  # fmt: skip
        rounds = section.epochs * -(-len(train) // 8)
        job = bar.add_task(f"{method} {name}", total=rounds, rate="")
        report = lambda i, losses: bar.update(job, completed=i)  # noqa: E731
        if method == "diffusionclip":
            k0 = round(section.t0_share * steps)
            x_start = replay.render(unet, scheduler, train, stop_before=k0)
            x_ref = replay.render(unet, scheduler, train)
            ce.add_edit_lora(unet, section.rank)
            try:
                history = ce.train_diffusionclip(
                    unet, scheduler, guide, x_start, x_ref, steps, k0, delta_t,
                    epochs=section.epochs, lr=section.lr, l1=section.l1, on_step=report, space=space,
                )  # fmt: skip
                state = ce.lora_weights(unet)
            finally:
                ce.remove_lora(unet)
            sched = ddim_scheduler(scheduler)
            sched.set_timesteps(steps)
            return state, {"rank": section.rank, "t0": int(sched.timesteps[k0]), "t0_step": k0, "losses": history[-1]}
        stop = max(1, round(section.edit_share * steps))
        f = ce.DeltaNet(h_channels, steps)
        x_T = replay.x_T(train, noise_shape)
        history = ce.train_asyrp(
            f, unet, scheduler, guide, x_T, steps, stop, delta_t, h_point=replay.h_point,
            epochs=section.epochs, lr=section.asyrp_lr, l1=section.l1, on_step=report, space=space,
        )  # fmt: skip
        return f.state_dict(), {"channels": f.channels, "hidden": f.hidden, "stop_step": stop, "losses": history[-1]}


def train_mapper(run: RunFolder, cfg: dict, section, guide, ctx: Context):
    """DeltaEdit's mapper on every sample before the held-out ones: their stored x0 (CLIP image
    features) and h_{T:1} (the targets, on their top ``basis`` principal axes)."""
    import numpy as np
    import torch

    from hspace.data.stores import SampleStore
    from hspace.hcore import clip_editors as ce
    from hspace.hcore.sampler import to_unit

    store = SampleStore(run.samples)
    n = cfg["n"] - section.held_out
    h = torch.from_numpy(np.asarray(store.h[:n], dtype=np.float32))
    h_shape = tuple(h.shape[1:])
    h = h.reshape(n, -1)
    with torch.no_grad():
        x0 = to_unit(store.x0[:n])
        features = torch.cat([guide.image(x0[i : i + 64].to(ctx.device)).cpu() for i in range(0, n, 64)])
    mapper = ce.DeltaMapper(features.shape[1], ce.h_basis(h, min(section.basis, n - 1)), h_shape)
    with ctx.progress() as bar:
        epochs = 30
        job = bar.add_task("deltaspace mapper (epochs)", total=epochs, rate="")
        history = ce.train_deltaspace(mapper, features, h, epochs=epochs, on_epoch=lambda e, loss: bar.advance(job))
    ctx.log(f"deltaspace: mapper trained on {n} samples, loss {history[0]:.3g} -> {history[-1]:.3g}")
    return mapper


def score(run: RunFolder, method: str, name: str, state: dict, info: dict, held: list[int], model, ctx) -> dict:
    """Save the edit, then its held-out sweep over GAMMAS (metadata, NAME.png: tasks.avi.save_swept)."""
    from hspace.data import directions as dirfile
    from hspace.tasks.avi import save_swept

    unet, scheduler, replay, _, net, _, _ = model
    path = dirfile.trained_file(run, method, name)
    r = save_swept(path, state, info, held, (unet, scheduler, replay, net), GAMMAS, 1.0, ctx)
    return {"path": path, **r, "train_minutes": round(info["train_minutes"], 2)}


def clip_edits_line(result: dict) -> str:
    if result.get("skipped"):
        return ""
    parts = [
        f"{label} ({'own change ' + format(r['own_change'], '+.3f') + ', ' if r['own_change'] is not None else ''}"
        f"{r['train_minutes']:.1f} min)"
        for label, r in result.get("edits", {}).items()
    ]
    return "trained: " + ", ".join(parts)


def clip_edits_cost(cfg) -> int:
    """U-Net passes (forward calls): DiffusionCLIP renders its samples to t0 and whole, then one
    pass per step after t0 per sample and epoch; Asyrp two per edited step (the unedited and the
    edited pass); each edit's held-out sweep renders the samples plainly and at every gamma,
    where DiffusionCLIP adds its fine-tuned pass after t0, Asyrp its unedited pass in the edited
    steps, and DeltaSpace renders the samples once more for their CLIP features."""
    c = cfg.clip_edits
    if c is None:
        return 0
    steps, n, held, g = cfg.sample.steps, c.samples, c.held_out, len(GAMMAS)
    k0, stop = round(c.t0_share * steps), max(1, round(c.edit_share * steps))
    per = {"diffusionclip": n * (k0 + steps) + c.epochs * n * (steps - k0) + g * held * (steps - k0),
           "asyrp-net": 2 * c.epochs * n * stop + g * held * stop, "deltaspace": held * steps}  # fmt: skip
    sweep = held * (1 + g) * steps
    return len(c.prompt_pairs) * sum(per.get(m, 0) + sweep for m in c.methods)


STAGE = Stage(
    "clip-edits",
    sections=("clip_edits",),
    inputs=("sample",),
    outputs=("directions",),
    body=clip_edits_stage,
    summary=clip_edits_line,
    cost=clip_edits_cost,
    check=check,
    cli_sections={"clip_edits": None},
    doc="Train the CLIP-guided editors (DiffusionCLIP's LoRA, Asyrp's f(h, t), DeltaSpace's mapper) on a "
    "run: RUN/directions/METHOD/NAME, usable as the editing methods of those names.",
)
