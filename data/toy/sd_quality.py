"""What toy-sd is worth as a yardstick, measured by the toy world's oracle:

- ``vae_quality``: reconstruction error of the VAE on held-out renders, and whether the
  oracle still reads every attribute from the reconstruction as from the render;
- ``caption_samples``: samples drawn under the captions of held-out faces (the world's own
  joint distribution of stated and unstated attributes), scored by the oracle, with h;
- ``adherence``: how often the oracle agrees with each attribute a caption states, the
  frequency of each attribute where the caption leaves it open (against the world's), and
  the oracle's confidence;
- ``probe``: a linear probe (logistic regression) reading each attribute from h_t.
"""

from __future__ import annotations

import numpy as np
import torch

from hspace.data.toy import captions
from hspace.data.toy import faces as toyfaces

HELDOUT_SEED = 5 << 40  # faces whose captions and renders toy-sd never trained on
BINARY = captions.BINARY


def load_toy_sd(folder=None, guidance_scale: float = 4.0, device: str = "cpu"):
    """(unet, scheduler, TextSetup) of the toy-sd folder (default: the shipped one)."""
    from hspace.data import models
    from hspace.data.text_models import load_text_parts
    from hspace.hcore.generator import TextSetup

    ref = models.resolve(str(folder) if folder is not None else "toy-sd")
    unet, scheduler = models.load(ref, device=device)
    parts = load_text_parts(ref.path, ref.kind, device)
    text = TextSetup(parts.vae, parts.tokenizers, parts.text_encoders, prompts=[""], guidance_scale=guidance_scale)
    return unet, scheduler, text


@torch.no_grad()
def vae_quality(vae, oracle, n: int = 1000, style: str = "v2", batch: int = 250) -> dict:
    """MSE / PSNR (images in [-1, 1], peak-to-peak 2) of x vs D(E(x)) (posterior mean) on
    ``n`` held-out renders, and the oracle's agreement between render and reconstruction
    per binary attribute (MAE in degrees for pose)."""
    from hspace.hcore.sampler import to_unit

    images, factors = toyfaces.render_batch(np.arange(HELDOUT_SEED, HELDOUT_SEED + n), 32, style=style)
    x = to_unit(images.transpose(0, 3, 1, 2))
    rec = torch.cat([vae.decode(vae.encode(x[i : i + batch]).latent_dist.mean).sample for i in range(0, n, batch)])
    rec = rec.clamp(-1, 1)
    mse = float(((rec - x) ** 2).mean())
    a, b = oracle.score(x).numpy(), oracle.score(rec).numpy()
    out = {"n": n, "mse": mse, "psnr_db": float(10 * np.log10(4.0 / mse))}
    for j, name in enumerate(oracle.names):
        if name in BINARY:
            out[f"agree_{name}"] = float(((a[:, j] > 0.5) == (b[:, j] > 0.5)).mean())
        else:
            out[f"mae_{name}"] = float(np.abs(a[:, j] - b[:, j]).mean())
    return out


def heldout_captions(n: int, first: int = HELDOUT_SEED, p_state: float = 0.7) -> tuple[list[str], list[dict]]:
    """Captions of ``n`` held-out faces and what each states."""
    seeds = np.arange(first, first + n)
    factors = toyfaces.draw_factors(seeds)
    pairs = [captions.caption(factors, i, int(s), p_state) for i, s in enumerate(seeds)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@torch.no_grad()
def caption_samples(
    unet,
    scheduler,
    text,
    oracle,
    prompts: list[str],
    steps: int = 20,
    seed: int = 0,
    batch: int = 64,
    h_steps: tuple[int, ...] = (),
) -> dict:
    """Sample one image per prompt (seeds from ``seed``; DDIM eta 0), score it with the
    oracle; with ``h_steps``, also h of the conditional branch at those steps (N, S, D)."""
    from hspace.hcore.generator import Replay

    replay = Replay(seed, steps, 0.0, text=text)
    scores, hs = [], []
    for start in range(0, len(prompts), batch):
        rows = list(range(start, min(len(prompts), start + batch)))
        got: dict = {}

        def keep(s, t, h, got=got):
            if s in h_steps:
                got[s] = h.detach().float().flatten(1).cpu()

        x0 = replay.render(unet, scheduler, rows, prompts=[prompts[i] for i in rows], on_step=keep)
        scores.append(oracle.score(x0).numpy())
        if h_steps:
            hs.append(torch.stack([got[s] for s in h_steps], 1).numpy())
    out = {"scores": np.concatenate(scores), "names": list(oracle.names)}
    if h_steps:
        out["h"] = np.concatenate(hs)
    return out


def adherence(scores: np.ndarray, names: list[str], stated: list[dict], yaw_said: float = captions.YAW_SAID) -> dict:
    """Per binary attribute: the share of captions stating it whose sample the oracle reads
    as stated (``agree``), the frequency of the attribute where the caption leaves it open
    (``open_freq``) against the world's marginal (``world_freq``); yaw: the share of "head
    turned left/right" samples turned that way by more than ``yaw_said``/2 degrees; and the
    oracle's mean confidence max(p, 1 - p)."""
    world = toyfaces.draw_factors(np.arange(HELDOUT_SEED, HELDOUT_SEED + 20000))
    out: dict = {}
    for a in BINARY:
        j = names.index(a)
        said = np.array([a in s for s in stated])
        want = np.array([bool(s.get(a, False)) for s in stated])
        got = scores[:, j] > 0.5
        out[a] = {
            "stated": int(said.sum()),
            "agree": float((got[said] == want[said]).mean()) if said.any() else None,
            "open_freq": float(got[~said].mean()) if (~said).any() else None,
            "world_freq": float(getattr(world, a).mean()),
        }
    yaw = scores[:, names.index("yaw")]
    sides = np.array([s.get("yaw", "") for s in stated])
    turned = (sides == "left") & (yaw < -yaw_said / 2) | (sides == "right") & (yaw > yaw_said / 2)
    out["yaw"] = {
        "stated": int((sides != "").sum()),
        "agree": float(turned[sides != ""].mean()) if (sides != "").any() else None,
    }
    binary = scores[:, [names.index(a) for a in BINARY]]
    out["confidence"] = float(np.maximum(binary, 1 - binary).mean())
    out["agree_mean"] = float(np.mean([out[a]["agree"] for a in BINARY if out[a]["agree"] is not None]))
    return out


def probe(h: np.ndarray, scores: np.ndarray, names: list[str], h_steps, train_frac: float = 0.75) -> dict:
    """Held-out accuracy of a logistic-regression probe reading each binary attribute (the
    oracle's label) from h_t at each of ``h_steps``, against the majority rate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = h.shape[0]
    cut = int(n * train_frac)
    out: dict = {}
    for a in BINARY:
        y = scores[:, names.index(a)] > 0.5
        row = {"majority": float(max(y[cut:].mean(), 1 - y[cut:].mean()))}
        for k, s in enumerate(h_steps):
            if y[:cut].all() or not y[:cut].any():
                row[f"step{s}"] = None
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
            clf.fit(h[:cut, k], y[:cut])
            row[f"step{s}"] = float(clf.score(h[cut:, k], y[cut:]))
        out[a] = row
    return out
