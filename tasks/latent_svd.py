"""`hspace latent-svd`: the SVD of every stored x_t (Wang et al. 2025, arXiv 2502.02225) and its
three properties measured against the truth (the toy worlds' oracle, or any annotator).

Reads samples.zarr's ``xt`` (``sample.store_xt``), writes latent_svd/ (data.stores.LatentSvdStore):

- svd.zarr: the top-k singular triplets of every sample's x_t at every step, per channel (C
  matrices H x W, the paper's choice) and flattened ((C*H) x W);
- properties.json and figures, each property one number (or table) and a figure:
  * small neighbourhood (sec. 4.3, Fig. 5): the Grassmann geodesic distance between the top-k
    left singular subspaces (per channel) of one trajectory at two steps, against two nulls: two
    random k-frames, and the same step of another seed (hcore.latent_svd.neighbourhood);
  * attributes in singular values (sec. 4.1, Fig. 2-4): sigma_i of x_t scaled by
    1 + ``probe_scale`` at step t (sv-scale), the sampler continued from there with the sample's
    own noise; the judge's change of every factor, per (t, i), its mean, and the share of samples
    it moves by more than 0.1 (the paper's "one sample's gender adjustable, another's not");
  * transplant (sec. 4.2): sample j's i-th singular vector pair replaced by sample j+1's at
    three steps: the share of the gap between them that the change closes (0: the attribute
    stays, as the paper claims; 1: it follows the vector);
  * mobility in order (sec. 4.2): per factor and step, the index that moves it most;
  * the theorem's assumption (sec. 3.2.1): the largest singular value grows from x_T to x_0
    (Spearman's rho of its mean with the step; the share of trajectories where it grows
    monotonically).
"""

from __future__ import annotations

import json

import numpy as np

from hspace.data.catalog import RunError, RunFolder, require_sampled
from hspace.tasks.stages import Context, Stage, outputs

VARIANTS = ("channel", "flat")
MOVES = 0.1  # a sample's factor "moves" when the judge's score changes by more than this (a probability)
MOVES_DEG = 2.0  # or, for an angle the judge gives in degrees, by more than this
NEIGHBOURHOOD_N = 64  # trajectories the neighbourhood distances average over (all pairs of steps)


def shapes(c: int, r: int) -> dict[str, tuple[int, int, int]]:
    """variant -> (matrices per latent, rows, columns) for latents (C, R, R)."""
    return {"channel": (c, r, r), "flat": (1, c * r, r)}


def problems(run: RunFolder, section) -> list[str]:
    """What stops the stage on this run, found before any work: no x_t stored, k too large,
    more probe samples than the run has."""
    from hspace.data.stores import XT, SampleStore

    if not run.samples.exists():
        return [f"{run.root} has no samples.zarr yet: run `hspace sample --store-xt` first"]
    group = SampleStore(run.samples).group
    if XT not in group:
        return [
            f"{run.samples} holds no x_t: sample with `--store-xt` (sample.store_xt: true) into a new --out, "
            "then run `hspace latent-svd` there"
        ]
    n, _, c, r, _ = group[XT].shape
    found = []
    limit = min(min(rows, cols) for _, rows, cols in shapes(c, r).values())
    if section.k > limit:
        found.append(f"latent_svd.k = {section.k}: the x_t matrices are {r} x {r}, so k must be <= {limit}")
    if section.probe_indices > section.k:
        found.append(f"latent_svd.probe_indices = {section.probe_indices} exceeds k = {section.k}")
    if section.n is not None and section.n > n:
        found.append(f"latent_svd.n = {section.n}: the run has {n} samples")
    if section.probe_n > n:
        found.append(f"latent_svd.probe_n = {section.probe_n}: the run has {n} samples")
    return found


def check(run, cfg, ctx) -> None:
    if cfg.latent_svd is not None and run.samples.exists():
        found = problems(run, cfg.latent_svd)
        if found:
            raise RunError(found[0])


def decompose(xt, n: int, k: int, store, bar) -> None:
    """The top-k SVD of every sample's x_t at every step, both variants, into ``store``."""
    import torch

    from hspace.hcore.latent_svd import top_svd

    job = bar.add_task("latent-svd (samples)", total=n, rate="")
    for i in range(n):
        x = torch.from_numpy(np.asarray(xt[i])).float()  # (T, C, R, R)
        for variant in VARIANTS:
            u, s, vh = top_svd(x, k, variant)
            arrays = store.arrays_rw(variant)
            arrays["S"][i], arrays["U"][i], arrays["Vh"][i] = s.numpy(), u.numpy(), vh.numpy()
        bar.advance(job)


def latent_svd_run(run: RunFolder, section, ctx: Context) -> dict:
    import torch

    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.data.catalog import replace_folder
    from hspace.data.stores import XT, LatentSvdStore, SampleStore
    from hspace.hcore import latent_svd as ls

    meta = run.read()
    require_sampled(meta, "hspace latent-svd")
    found = problems(run, section)
    if found:
        raise RunError(found[0])
    xt = SampleStore(run.samples).group[XT]
    n_run, steps, c, r, _ = xt.shape
    n, k = section.n or n_run, section.k
    partial = run.latent_svd.with_name(run.latent_svd.name + ".partial")
    store = LatentSvdStore.create(partial, n, steps, shapes(c, r), k)
    unet, scheduler = models.load_for_run(meta, device=ctx.device)
    replay = models.replay_for_run(meta, device=ctx.device)
    net = load_annotator(section.evaluator, ctx.device)
    with ctx.progress() as bar:
        decompose(xt, n, k, _Writer(store), bar)
        s_channel, u_channel, _ = store.arrays("channel")
        near = min(n, NEIGHBOURHOOD_N)
        hood = ls.neighbourhood(torch.from_numpy(np.asarray(u_channel[:near])))
        sigma = torch.from_numpy(np.asarray(s_channel[:n, :, :, 0])).double()  # (n, T, C): the largest
        probe = Probe(unet, scheduler, replay, net, xt, list(range(section.probe_n)), bar)
        effects = probe.scaling(section.probe_indices, section.probe_scale)
        transplant = probe.transplants(section.probe_indices)
    props = properties(hood, sigma, effects, transplant, list(net.names), tuple(getattr(net, "degrees", ())), section)
    store.file("properties.json").write_text(json.dumps(props, indent=2))
    draw(store, props)
    replace_folder(partial, run.latent_svd)
    final = LatentSvdStore(run.latent_svd)
    files = [final.zarr, *(final.file(f) for f in ("properties.json", "neighbourhood.png", "effects.png"))]
    return {"outputs": outputs(run, files), "summary": props["summary"]}


class _Writer:
    """The store's arrays opened for writing, once per variant."""

    def __init__(self, store):
        self.store, self.open = store, {}

    def arrays_rw(self, variant: str) -> dict:
        import zarr

        if variant not in self.open:
            group = zarr.open_group(self.store.zarr, mode="r+")[variant]
            self.open[variant] = {name: group[name] for name in ("S", "U", "Vh")}
        return self.open[variant]


class Probe:
    """Renders probe samples from their stored x_t at step t (with their own noise after it),
    edited or not, and scores the results with the judge."""

    def __init__(self, unet, scheduler, replay, net, xt, indices: list[int], bar):
        self.unet, self.scheduler, self.replay, self.net = unet, scheduler, replay, net
        self.xt, self.indices, self.bar = xt, indices, bar
        self.steps = xt.shape[1]
        self.base: dict[int, np.ndarray] = {}

    def latent(self, t: int):
        import torch

        return torch.from_numpy(np.asarray(self.xt.oindex[self.indices, t])).float()

    def scores(self, t: int, x) -> np.ndarray:
        x0 = self.replay.render(self.unet, self.scheduler, self.indices, x_T=x, start_at=t)
        return self.net.score(x0).numpy()

    def unedited(self, t: int) -> np.ndarray:
        if t not in self.base:
            self.base[t] = self.scores(t, self.latent(t))
        return self.base[t]

    def scaling(self, m: int, scale: float) -> np.ndarray:
        """(T, m, P, A): the change of every factor when sigma_i at step t is scaled by 1 + scale."""
        from hspace.hcore.latent_svd import scale_singular_values

        job = self.bar.add_task("latent-svd (scaling probes)", total=self.steps * m, rate="")
        out = np.zeros((self.steps, m, len(self.indices), len(self.net.names)))
        for t in range(self.steps):
            x = self.latent(t)
            for i in range(m):
                out[t, i] = self.scores(t, scale_singular_values(x, i, 1 + scale)) - self.unedited(t)
                self.bar.advance(job)
        return out

    def transplants(self, m: int) -> dict:
        """At three steps (a quarter, half and three quarters of the way), sample j's i-th pair
        from sample j+1: {step: (m, A) slopes}."""
        import torch

        from hspace.hcore.latent_svd import transfer_slope, transplant

        chosen = transplant_steps(self.steps)
        job = self.bar.add_task("latent-svd (transplants)", total=len(chosen) * m, rate="")
        out = {}
        for t in chosen:
            x = self.latent(t)
            donor = x.roll(-1, 0)
            base = self.unedited(t)
            gap = torch.from_numpy(np.roll(base, -1, 0) - base)
            rows = []
            for i in range(m):
                change = torch.from_numpy(self.scores(t, transplant(x, donor, i)) - base)
                rows.append(transfer_slope(change, gap).numpy())
                self.bar.advance(job)
            out[t] = np.stack(rows)
        return out


def properties(hood: dict, sigma, effects: np.ndarray, transplant: dict, names: list[str], degrees, section) -> dict:
    """The numbers of properties.json (see the module's docstring); ``degrees``: the factors
    the judge gives as angles (their threshold and headline apart from the probabilities')."""
    from hspace.hcore.latent_svd import spearman

    steps = hood["steps"].numpy()
    adjacent = np.array([steps[t, t + 1] for t in range(len(steps) - 1)])
    other = hood["other_seed"].numpy()
    mean_sigma = sigma.mean((0, 2))  # (T,)
    grows = (sigma.mean(2).diff(dim=1) >= 0).all(1).double().mean()
    mean_effect = effects.mean(2)  # (T, m, A)
    angle = np.array([a in degrees for a in names])
    moved = (np.abs(effects) > np.where(angle, MOVES_DEG, MOVES)).mean(2)  # (T, m, A): the share of samples moved
    strongest = np.abs(mean_effect).max(1)  # (T, A)
    prob = np.where(angle, 0.0, strongest)
    best_index = np.abs(mean_effect).argmax(1)  # (T, A)
    mixed = (moved > 0.2) & (moved < 0.8)
    at = np.unravel_index(prob.argmax(), prob.shape)
    slopes = {str(t): v.tolist() for t, v in transplant.items()}
    all_slopes = np.concatenate([v for v in transplant.values()]) if transplant else np.zeros((0, len(names)))
    summary = {
        "adjacent_distance": float(adjacent.mean()),
        "other_seed_distance": float(np.nanmean(other)),
        "random_distance": hood["random"],
        "neighbourhood_holds": bool(adjacent.mean() < min(np.nanmean(other), hood["random"])),
        "sigma_max_rho": spearman(mean_sigma),
        "sigma_max_grows_share": float(grows),
        "largest_effect": float(prob.max()),
        "largest_effect_deg": float(strongest[:, angle].max()) if angle.any() else None,
        "largest_effect_at": {"step": int(at[0]), "factor": names[int(at[1])]},
        "peak_step": {a: int(strongest[:, j].argmax()) for j, a in enumerate(names)},
        "mixed_share": float(mixed.mean()),
        "transplant_slope_mean": float(np.abs(all_slopes).mean()) if all_slopes.size else None,
        "indices_per_factor": {a: int(len(set(best_index[:, j].tolist()))) for j, a in enumerate(names)},
    }
    return {
        "k": section.k,
        "probe_scale": section.probe_scale,
        "probe_n": section.probe_n,
        "factors": names,
        "degrees": [a for a in names if a in degrees],
        "neighbourhood": {
            "steps": steps.tolist(),
            "adjacent": adjacent.tolist(),
            "other_seed": other.tolist(),
            "random": hood["random"],
            "max": hood["max"],
        },  # fmt: skip
        "sigma_max": mean_sigma.tolist(),
        "effects_mean": mean_effect.tolist(),
        "moved_share": moved.tolist(),
        "best_index": best_index.tolist(),
        "transplant_slopes": slopes,
        "summary": summary,
    }


def draw(store, props: dict) -> None:
    """neighbourhood.png: the distance between neighbouring steps of a trajectory against the
    nulls, the whole step x step matrix, the largest singular value over the steps;
    effects.png: per factor, the mean change under sigma_i x (1 + s) at step t (t x i), and
    the transplant slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hood, names = props["neighbourhood"], props["factors"]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
    steps = np.arange(len(hood["other_seed"]))
    ax[0].plot(steps[:-1] + 0.5, hood["adjacent"], "o-", label="steps t, t+1 (same seed)")
    ax[0].plot(steps, hood["other_seed"], "s--", label="step t, another seed")
    ax[0].axhline(hood["random"], color="gray", ls=":", label="random k-frames")
    ax[0].set(xlabel="step (0 = x_T)", ylabel="geodesic distance", title=f"small neighbourhood, k = {props['k']}")
    ax[0].legend(fontsize=7)
    im = ax[1].imshow(np.array(hood["steps"]), cmap="viridis", vmin=0, vmax=hood["max"])
    ax[1].set(xlabel="step", ylabel="step", title="distance, same trajectory")
    fig.colorbar(im, ax=ax[1], fraction=0.046)
    ax[2].plot(props["sigma_max"], "o-")
    ax[2].set(xlabel="step (0 = x_T)", ylabel="mean largest singular value", title="the theorem's assumption")
    fig.tight_layout()
    fig.savefig(store.file("neighbourhood.png"), dpi=90)
    plt.close(fig)
    effects = np.array(props["effects_mean"])  # (T, m, A)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(2.3 * (len(names) + 1), 3), squeeze=False)
    for j, name in enumerate(names):  # each factor on its own scale, said in its title
        a, lim = axes[0][j], max(float(np.abs(effects[:, :, j]).max()), 1e-6)
        a.imshow(effects[:, :, j], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        unit = " deg" if name in props["degrees"] else ""
        a.set(title=f"{name} (±{lim:.2g}{unit})", xlabel="index i", ylabel="step t" if j == 0 else None)
    slopes = props["transplant_slopes"]
    for t, rows in slopes.items():
        axes[0][-1].plot(np.abs(np.array(rows)).mean(0), "o-", label=f"step {t}")
    axes[0][-1].set(title="transplant: gap closed", xticks=range(len(names)), ylim=(0, 1))
    axes[0][-1].set_xticklabels(names, rotation=60, fontsize=6)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"mean change when sigma_i at step t is scaled by {1 + props['probe_scale']:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(store.file("effects.png"), dpi=90)
    plt.close(fig)


def summary_line(result: dict) -> str:
    s = result.get("summary")
    if not s:
        return ""
    return (
        f"neighbourhood {s['adjacent_distance']:.3f} between steps vs {s['other_seed_distance']:.3f} another seed, "
        f"{s['random_distance']:.3f} random; sigma_max rho {s['sigma_max_rho']:+.2f}; "
        f"largest probe effect {s['largest_effect']:.3f} ({s['largest_effect_at']['factor']} at step "
        f"{s['largest_effect_at']['step']})"
    )


def latent_svd_stage(run: RunFolder, latent_svd, ctx: Context) -> dict:
    if latent_svd is None:
        return {"outputs": [], "skipped": True}
    return latent_svd_run(run, latent_svd, ctx)


def cost(cfg) -> int:
    """U-Net sample-passes of the probes: per step t the unedited render and one per probed
    index, T - t passes each; then the transplants at three steps c, T - c passes per index."""
    s = cfg.latent_svd
    if s is None:
        return 0
    t, m = cfg.sample.steps, s.probe_indices
    scaling = (m + 1) * sum(t - i for i in range(t))
    return (scaling + m * sum(t - c for c in transplant_steps(t))) * s.probe_n


def transplant_steps(steps: int) -> list[int]:
    """The steps transplants are tried at: a quarter, half and three quarters of the way."""
    return sorted({round(f * (steps - 1)) for f in (0.25, 0.5, 0.75)})


STAGE = Stage(
    "latent-svd",
    sections=("latent_svd",),
    inputs=("sample",),
    outputs=("latent_svd",),
    cli_sections={"latent_svd": None},
    body=latent_svd_stage,
    summary=summary_line,
    check=check,
    cost=cost,
    doc="The SVD of every stored x_t (Wang et al. 2025) and its three properties measured with the judge: "
    "small neighbourhood, attributes in singular values, mobility in order (needs sample.store_xt).",
)
