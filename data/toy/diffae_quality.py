"""toy-diffae's measured quality (the shipped folder's quality.json), judged by the oracle on
held-out renders:

- reconstruction: x_0 -> z_sem = Enc(x_0), x_T by DDIM inversion conditioned on z_sem (eq. (14)),
  DDIM back: PSNR against the render, and the oracle's agreement between render and
  reconstruction (each binary attribute read the same way; pose within degrees);
- z_sem alone: the same z_sem decoded from fresh noise x_T: what the semantic code holds;
- samples: z_sem from the latent DDPM, decoded from fresh noise: the oracle's attribute rates
  against the world's, and its confidence.
"""

from __future__ import annotations

import numpy as np
import torch

from hspace.data.toy.train_diffae import EVAL_SEED, DiffAERecipe, renders


def agreement(oracle, a: torch.Tensor, b: torch.Tensor) -> dict:
    """{binary attribute: share read the same way; pose: mean |difference| in degrees}."""
    pa, pb = oracle.score(a).numpy(), oracle.score(b).numpy()
    degrees = set(getattr(oracle, "degrees", ()))
    return {
        name: float(np.abs(pa[:, j] - pb[:, j]).mean())
        if name in degrees
        else float(((pa[:, j] > 0.5) == (pb[:, j] > 0.5)).mean())
        for j, name in enumerate(oracle.names)
    }


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def measure(folder, n: int = 128, steps: int = 20, recipe: DiffAERecipe | None = None) -> dict:
    from hspace.data.annotators import load_annotator
    from hspace.data.diffae import load_diffae
    from hspace.hcore.diffae import decode, sample_z, stochastic_code

    recipe = recipe or DiffAERecipe()
    model, scheduler, latent, stats = load_diffae(folder)
    oracle = load_annotator("oracle")
    x0 = renders(recipe, EVAL_SEED, n)
    z = model.encoder(x0)
    x_T = stochastic_code(model, scheduler, x0, z, steps)
    rec = decode(model, scheduler, x_T, z, steps)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    z_only = decode(model, scheduler, noise, z, steps)
    from diffusers import DDIMScheduler

    zs = sample_z(latent, DDIMScheduler.from_config(scheduler.config), n, 50, torch.Generator().manual_seed(2))
    samples = decode(model, scheduler, noise, zs * stats["std"] + stats["mean"], steps)
    world, sampled = oracle.score(x0).numpy(), oracle.score(samples).numpy()
    binary = [j for j, name in enumerate(oracle.names) if name not in set(getattr(oracle, "degrees", ()))]
    return {
        "n": n, "steps": steps,
        "reconstruction": {"psnr_db": psnr(rec, x0), "oracle_agreement": agreement(oracle, x0, rec)},
        "z_sem_alone": {"psnr_db": psnr(z_only, x0), "oracle_agreement": agreement(oracle, x0, z_only)},
        "samples": {
            "attribute_rate": {oracle.names[j]: float((sampled[:, j] > 0.5).mean()) for j in binary},
            "world_rate": {oracle.names[j]: float((world[:, j] > 0.5).mean()) for j in binary},
            "oracle_confidence": float(np.abs(sampled[:, binary] - 0.5).mean() * 2),
            "world_confidence": float(np.abs(world[:, binary] - 0.5).mean() * 2),
        },
    }  # fmt: skip


def encoded(model, recipe: DiffAERecipe, first: int, n: int):
    """Renders first .. first + n - 1, their raw codes (n, code) and their true factors."""
    from hspace.data.toy import faces as toyfaces

    x = renders(recipe, first, n)
    z = torch.cat([model.encoder(x[i : i + 256]) for i in range(0, n, 256)])
    return x, z, toyfaces.draw_factors(np.arange(first, first + n))


@torch.no_grad()
def probe_and_edit(folder, n_train: int = 2048, n_test: int = 512, n_edit: int = 48, steps: int = 20,
                   gammas=(1.0, 2.0, 4.0), recipe: DiffAERecipe | None = None) -> dict:  # fmt: skip
    """A linear probe of every binary factor from normalised z_sem (logistic regression on
    ``n_train`` renders' true factors, accuracy on ``n_test`` others), and DiffAE's edit with
    its normal: z_sem + gamma * (unit normal, in normalised units), decoded from the render's
    own x_T (eq. (14)); the oracle's mean change of every factor on ``n_edit`` renders."""
    from sklearn.linear_model import LogisticRegression

    from hspace.data.annotators import load_annotator
    from hspace.data.diffae import load_diffae
    from hspace.data.toy import faces as toyfaces
    from hspace.hcore.diffae import decode, stochastic_code

    recipe = recipe or DiffAERecipe()
    model, scheduler, _, stats = load_diffae(folder)
    oracle = load_annotator("oracle")

    def codes(first, n):
        x, z, factors = encoded(model, recipe, first, n)
        return x, ((z - stats["mean"]) / stats["std"]).numpy(), factors

    _, z_tr, f_tr = codes(EVAL_SEED + 10_000, n_train)
    x_te, z_te, f_te = codes(EVAL_SEED + 20_000, n_test)
    probe, normals = {}, {}
    for name in toyfaces.BINARY_ATTRIBUTES:
        clf = LogisticRegression(max_iter=2000).fit(z_tr, np.asarray(getattr(f_tr, name), dtype=bool))
        probe[name] = float(clf.score(z_te, np.asarray(getattr(f_te, name), dtype=bool)))
        w = torch.from_numpy(clf.coef_[0]).float()
        normals[name] = w / w.norm()
    x0, z = x_te[:n_edit], torch.from_numpy(z_te[:n_edit])
    raw = z * stats["std"] + stats["mean"]
    x_T = stochastic_code(model, scheduler, x0, raw, steps)
    base = oracle.score(decode(model, scheduler, x_T, raw, steps)).numpy()
    edits = {}
    for name, n in normals.items():
        edits[name] = {}
        for g in gammas:
            moved = (z + g * n) * stats["std"] + stats["mean"]
            change = (oracle.score(decode(model, scheduler, x_T, moved, steps)).numpy() - base).mean(0)
            edits[name][f"{g:g}"] = dict(zip(oracle.names, change.round(4).tolist(), strict=True))
    return {"probe_accuracy": probe, "probe_n": [n_train, n_test], "normal_edits": edits, "edit_n": n_edit}


@torch.no_grad()
def level_probe(folder, n_train: int = 2048, n_test: int = 512, recipe: DiffAERecipe | None = None) -> dict:
    """What each part of the code holds (HDAE's question, the reading note's sec. IX): from each
    part alone (``DiffAE.code_parts``: the deepest code and, hierarchical, every level's) and
    from the whole code, a logistic probe of every binary factor (held-out accuracy) and a
    ridge regression of the continuous ones (pose, skin, hair and hat colour, background;
    held-out R^2), trained on ``n_train`` renders' true factors."""
    from sklearn.linear_model import LogisticRegression, Ridge

    from hspace.data.diffae import load_diffae
    from hspace.data.toy import faces as toyfaces

    recipe = recipe or DiffAERecipe()
    model = load_diffae(folder)[0]

    _, z_tr, f_tr = encoded(model, recipe, EVAL_SEED + 10_000, n_train)
    _, z_te, f_te = encoded(model, recipe, EVAL_SEED + 20_000, n_test)
    z_tr, z_te = z_tr.numpy(), z_te.numpy()
    mean, std = z_tr.mean(0), z_tr.std(0) + 1e-6
    z_tr, z_te = (z_tr - mean) / std, (z_te - mean) / std
    continuous = ("yaw", "pitch", "roll", "skin", "hair_colour", "hat_colour", "background")
    out = {}
    for part, cols in {**model.code_parts(), "whole code": slice(None)}.items():
        a, b = z_tr[:, cols], z_te[:, cols]
        entry = {"dims": int(a.shape[1])}
        for name in toyfaces.BINARY_ATTRIBUTES:
            clf = LogisticRegression(max_iter=2000).fit(a, np.asarray(getattr(f_tr, name), dtype=bool))
            entry[name] = float(clf.score(b, np.asarray(getattr(f_te, name), dtype=bool)))
        for name in continuous:
            target = np.asarray(getattr(f_tr, name), dtype=np.float64).reshape(n_train, -1)
            reg = Ridge(alpha=1.0).fit(a, target)
            entry[f"{name} R2"] = float(reg.score(b, np.asarray(getattr(f_te, name)).reshape(n_test, -1)))
        out[part] = entry
    return {"n": [n_train, n_test], "parts": out}


if __name__ == "__main__":  # python -m hspace.data.toy.diffae_quality FOLDER: writes FOLDER/quality.json
    import json
    import sys
    from pathlib import Path

    from hspace.data.diffae import diffae_folder

    folder = diffae_folder(sys.argv[1])
    found = measure(folder) | {"probe_and_edit": probe_and_edit(folder), "level_probe": level_probe(folder)}
    (Path(folder) / "quality.json").write_text(json.dumps(found, indent=1))
    print(json.dumps(found["reconstruction"] | {"level_probe": found["level_probe"]}, indent=1))
