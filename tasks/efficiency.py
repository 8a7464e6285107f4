"""Sample efficiency of eq. (10) in h vs x_T (paper Fig. 8): directions for one attribute
from n = 1, 3, 10, 30, 100 top/bottom pairs among the samples before the held-out ones,
in h and in x_T (DDIM, eta = 0), applied at gamma to the held-out samples; the
annotator's mean change of the attribute per n, and the RMS pixel change of the edit
(how much of the image it replaces: an x_T "edit" from few pairs swaps the noise)."""

from __future__ import annotations

from pathlib import Path

from hspace.data import models
from hspace.data.annotators import load_annotator
from hspace.data.catalog import RunError, RunFolder, require_sampled


def sample_efficiency(
    run_dir: str,
    attribute: str,
    held_out: int = 64,
    gamma: float = 1.0,
    annotator: str = "oracle",
    ns: tuple[int, ...] = (1, 3, 10, 30, 100),
    device: str = "cpu",
    max_samples: int | None = None,
) -> dict:
    """``max_samples``: edit only the first this many held-out samples (a quicker figure)."""
    from hspace.hcore.sampler import Edit, draw_noise, make_generators, sample
    from hspace.tasks.supervised import mean_difference

    run = RunFolder(Path(run_dir))
    meta = run.read()
    require_sampled(meta, "the sample-efficiency figure")
    cfg = meta["config"]
    if cfg["eta"] != 0:
        raise RunError("Fig. 8 compares DDIM (eta = 0) runs; this run has eta > 0")
    first = cfg["n"] - held_out
    if first < 2 or held_out < 1:
        raise RunError(f"held_out {held_out} leaves {first} samples to build directions from")
    held = list(range(first, cfg["n"]))[:max_samples]
    unet, scheduler = models.load_for_run(meta, device=device)
    net = load_annotator(annotator, device)
    if attribute not in net.names:
        raise RunError(f"{annotator} does not score {attribute!r}; it scores {', '.join(net.names)}")
    col = list(net.names).index(attribute)
    base_x0 = sample(unet, scheduler, make_generators(cfg["seed"], held), cfg["steps"], 0.0, h_point=cfg["h_point"])
    base = net.score(base_x0)[:, col]
    ns = [n for n in ns if n <= first // 2]
    change, moved = {}, {}
    for latent in ("h", "xT"):
        for n in ns:
            v, _, _ = mean_difference(run, attribute, n, latent, first=first)  # built, never saved
            gens = make_generators(cfg["seed"], held)
            if latent == "h":
                x0 = sample(unet, scheduler, gens, cfg["steps"], 0.0, edit=Edit([v], [gamma]), h_point=cfg["h_point"])
            else:
                x_T = draw_noise(make_generators(cfg["seed"], held), v.shape[1:]) + gamma * v
                x0 = sample(unet, scheduler, gens, cfg["steps"], 0.0, x_T=x_T, h_point=cfg["h_point"])
            x0 = x0.cpu()
            change[f"{latent}:{n}"] = float((net.score(x0)[:, col] - base).mean())
            moved[f"{latent}:{n}"] = float(((x0 - base_x0.cpu()) ** 2).mean().sqrt())
    return {"attribute": attribute, "gamma": gamma, "held_out": len(held), "ns": ns, "change": change, "moved": moved}


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
