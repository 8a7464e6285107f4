"""Sample efficiency of eq. (10) in h vs x_T (paper Fig. 8): directions for one attribute
from n = 1, 3, 10, 30, 100 top/bottom pairs among the samples before the held-out ones,
in h and in x_T, all at DDIM (eta = 0) as the paper compares them, applied at gamma to
the held-out samples; the
annotator's mean change of the attribute per n, and the RMS pixel change of the edit
(how much of the image it replaces: an x_T "edit" from few pairs swaps the noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hspace.data import models
from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs


def sample_efficiency(
    run_dir: str,
    attribute: str,
    held_out: int = 64,
    gamma: float = 1.0,
    annotator: str = "oracle",
    ns: tuple[int, ...] = (1, 3, 10, 30, 100),
    device: str = "cpu",
    max_samples: int | None = None,
    pool: int = 256,
) -> dict:
    """``max_samples``: edit only the first this many held-out samples (a quicker figure).

    The paper compares at eta = 0 (sec. 5, Fig. 8): there x_T alone decides the image, so an
    x_T direction is a fair rival. A run sampled at eta = 0 gives its stored h and
    annotations; a run at another eta (the paper's synthesis default is 1) has its first
    ``pool`` samples redrawn with DDIM (eta = 0, the same seeds, so the same x_T) and
    scored by ``annotator``, in memory."""
    import torch

    from hspace.data.annotators import load_annotator
    from hspace.hcore.sampler import Edit, eta_schedule
    from hspace.hcore.supervised import top_bottom
    from hspace.tasks.supervised import mean_difference

    run = RunFolder(Path(run_dir))
    meta = run.read()
    require_sampled(meta, "the sample-efficiency figure")
    cfg = meta["config"]
    first = cfg["n"] - held_out
    if first < 2 or held_out < 1:
        raise RunError(f"held_out {held_out} leaves {first} samples to build directions from")
    held = list(range(first, cfg["n"]))[:max_samples]
    unet, scheduler = models.load_for_run(meta, device=device)
    replay = models.replay_for_run(meta, device=device)  # SD: each sample's prompt, the VAE decoder
    net = load_annotator(annotator, device)
    if attribute not in net.names:
        raise RunError(f"{annotator} does not score {attribute!r}; it scores {', '.join(net.names)}")
    col = list(net.names).index(attribute)
    deterministic = not any(eta_schedule(cfg["eta"], cfg["steps"]))
    if deterministic:
        ranked = first

        def direction(n: int, latent: str):
            return mean_difference(run, attribute, n, latent, first=first)[0]  # built, never saved
    else:
        ranked = min(first, pool)
        h_pool, scores = ddim_pool(unet, scheduler, net, replay, list(range(ranked)), col)

        def direction(n: int, latent: str):
            pos, neg = (torch.from_numpy(i) for i in top_bottom(scores, n))
            if latent == "h":
                return h_pool[pos].float().mean(0) - h_pool[neg].float().mean(0)
            shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            x_T = [replay.x_T(idx.tolist(), shape) for idx in (pos, neg)]
            return (x_T[0].mean(0) - x_T[1].mean(0))[None]

    base_x0 = replay.render(unet, scheduler, held, eta=0.0)
    base = net.score(base_x0)[:, col]
    ns = [n for n in ns if n <= ranked // 2]
    change, moved = {}, {}
    for latent in ("h", "xT"):
        for n in ns:
            v = direction(n, latent)
            if latent == "h":
                x0 = replay.render(unet, scheduler, held, eta=0.0, edit=Edit([v], [gamma]))
            else:
                x_T = replay.x_T(held, v.shape[1:]) + gamma * v
                x0 = replay.render(unet, scheduler, held, eta=0.0, x_T=x_T)
            x0 = x0.cpu()
            change[f"{latent}:{n}"] = float((net.score(x0)[:, col] - base).mean())
            # on the images as stored (clamped to [-1, 1]): without clipping of P_t an x_T "edit" from
            # one pair can leave the image range far behind
            moved[f"{latent}:{n}"] = float(((x0.clamp(-1, 1) - base_x0.cpu().clamp(-1, 1)) ** 2).mean().sqrt())
    return {
        "attribute": attribute,
        "gamma": gamma,
        "held_out": len(held),
        "ns": ns,
        "change": change,
        "moved": moved,
        "eta": 0.0,
        "ranked_from": "the run's stored samples" if deterministic else f"samples 0..{ranked - 1} redrawn at eta 0",
    }


def ddim_pool(unet, scheduler, net, replay, indices: list[int], column: int, batch_size: int = 64):
    """Samples ``indices`` redrawn with DDIM (eta = 0) from their seeds (and prompts, for a
    text-conditioned run; ``replay``: hcore.generator.Replay): (h_{T:1} as float16
    (n, T, C, H, W), the annotator's score of ``column`` (n,))."""
    import torch

    hs, scores = [], []
    for start in range(0, len(indices), batch_size):
        part, per_step = indices[start : start + batch_size], []

        def keep(step: int, t: int, h, into: list = per_step) -> None:
            into.append(h.detach().float().cpu().half())

        x0 = replay.render(unet, scheduler, part, eta=0.0, on_step=keep)
        hs.append(torch.stack(per_step, 1))
        scores.append(net.score(x0)[:, column].cpu().numpy())
    return torch.cat(hs), np.concatenate(scores)


def table_md(result: dict) -> str:
    lines = [
        f"mean change of {result['attribute']} on {result['held_out']} held-out samples at gamma = {result['gamma']:g}",
        "| n pairs | h: change | h: RMS pixel change | x_T: change | x_T: RMS pixel change |",
        "|---|---|---|---|---|",
    ]
    c, m = result["change"], result["moved"]
    for n in result["ns"]:
        lines.append(f"| {n} | {c[f'h:{n}']:+.3f} | {m[f'h:{n}']:.3f} | {c[f'xT:{n}']:+.3f} | {m[f'xT:{n}']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage

# Fig. 8 in a pipeline run: the pairs n it is built from, the held-out samples it edits, and
# the pool redrawn at eta 0 when the run was sampled stochastically
FIGURE_NS, FIGURE_HELD, FIGURE_POOL = (1, 3, 10, 30), 32, 128


def efficiency_stage(run: RunFolder, figures, directions, annotate, ctx: Context) -> dict:
    """Fig. 8 of the first attribute: figures/sample_efficiency.{json,png}."""
    import json

    from hspace.data.figures import efficiency_plot

    attrs = directions.attributes if directions.latent == "h" else []
    if not (figures.efficiency and attrs and annotate.annotators):
        return {"outputs": [], "skipped": True}
    meta = run.read()
    run.figures.mkdir(exist_ok=True)
    held = directions.held_out_of(meta["config"])
    with ctx.progress() as bar:
        bar.add_task(f"Fig. 8 ({attrs[0]}: h vs x_T)", total=None, rate="")
        result = sample_efficiency(
            str(run.root), attrs[0], held, 1.0, annotate.annotators[0], FIGURE_NS, ctx.device, FIGURE_HELD, FIGURE_POOL
        )
    run.figure("sample_efficiency.json").write_text(json.dumps(result, indent=2))
    png = efficiency_plot(result, run.figure("sample_efficiency.png"))
    return {"outputs": outputs(run, [run.figure("sample_efficiency.json"), png]), "attribute": attrs[0]}


def efficiency_cost(cfg) -> int:
    """U-Net sample-passes of Fig. 8, at eta 0: a stochastic run's first samples redrawn (at
    most the pool), then the held-out samples unedited and edited along h and x_T for each n."""
    from hspace.hcore.sampler import eta_schedule

    s, f, d = cfg.sample, cfg.figures, cfg.directions
    if not (f.efficiency and d.latent == "h" and d.attributes and cfg.annotate.annotators):
        return 0
    held = d.held_out_of({})
    ranked, renders = s.n - held, 0
    if any(eta_schedule(s.eta, s.steps)):
        ranked = min(ranked, FIGURE_POOL)
        renders += ranked
    ns = [k for k in FIGURE_NS if k <= ranked // 2]
    return (renders + min(FIGURE_HELD, held) * (1 + 2 * len(ns))) * s.steps


STAGE = Stage(
    "efficiency",
    sections=("figures", "directions", "annotate"),
    inputs=("sample", "annotate"),
    outputs=("figures",),
    body=efficiency_stage,
    cost=efficiency_cost,
    summary=lambda r: "" if r.get("skipped") else f"Fig. 8 of {r['attribute']}",
    command=False,
)
