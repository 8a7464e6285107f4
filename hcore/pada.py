"""Pluralistic Aging Diffusion Autoencoder (PADA; the reading note's sec. IV) on a diffusion
autoencoder's z_sem (hcore/diffae.py), with a CLIP for the age text and image (toy-clip).

- The probabilistic aging embedding (eqs. (8)-(9)): from a text-image pair, the target age's
  CLIP text feature e_txt and a reference image of that age's CLIP image feature, an MLP gives
  (mu, log sigma); e_age = mu + sigma * eps (eq. (9)), and eq. (8)'s
  KL(N(e_txt, I) || N(mu, sigma^2 I)) ties the distribution to the text.
- eq. (10): Delta z_age = MLP(e_age).
- eq. (11): z_age = Gamma(Delta z; theta_1) (z_src - mu_src) / sigma_src + Gamma(Delta z;
  theta_2), mu_src and sigma_src the mean and standard deviation of z_src over its dimensions
  (AdaIN-like), Gamma linear maps; here on z_sem normalised per dimension by the autoencoder's
  statistics.
- The losses (PADA's four, each as a weight of ``PadaLosses``): age fidelity, a triplet-like
  margin between the edited image's CLIP cosine to the target age text and to the other age's;
  identity, the L1 distance of the edited image to the unedited one; normalisation, z_age's
  per-vector mean and spread kept at the code's (0 and 1 in normalised units); reconstruction,
  z_age = z_src where the target age is the source's own. PADA decodes the whole DDIM chain for
  the losses; here the edited image is the decoder's one-step prediction P_t (eq. (3) of Haas et
  al.) at ``t_loss`` from the source image noised with a fixed eps: one U-Net pass with
  gradients per step, on a CPU (README's fidelity table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class AgingEmbedding(nn.Module):
    """eqs. (8)-(9): (CLIP text feature, CLIP image feature) -> (mu, log sigma), both (B, D)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * dim))

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.net(torch.cat([F.normalize(text, dim=-1), F.normalize(image, dim=-1)], -1)).chunk(2, -1)
        return F.normalize(text, dim=-1) + mu, log_sigma.clamp(-6, 2)


def kl_to_text(text: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """eq. (8) per sample (B,): KL(N(e_txt, I) || N(mu, sigma^2 I)) summed over dimensions,
    e_txt the unit text feature."""
    e = F.normalize(text, dim=-1)
    var = (2 * log_sigma).exp()
    return (log_sigma + (1 + (e - mu) ** 2) / (2 * var) - 0.5).sum(-1)


class Pada(nn.Module):
    """The aging embedding, eq. (10)'s MLP and eq. (11)'s fusion into a z_sem of ``z_dim``."""

    def __init__(self, clip_dim: int, z_dim: int, hidden: int = 256):
        super().__init__()
        self.clip_dim, self.z_dim, self.hidden = clip_dim, z_dim, hidden
        self.embedding = AgingEmbedding(clip_dim, hidden)
        self.to_delta = nn.Sequential(nn.Linear(clip_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))  # eq. (10)
        self.scale = nn.Linear(hidden, z_dim)  # Gamma(.; theta_1)
        self.shift = nn.Linear(hidden, z_dim)  # Gamma(.; theta_2)
        for layer, bias in ((self.scale, 1.0), (self.shift, 0.0)):  # at first z_age = IN(z_src)
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, bias)

    def forward(self, z_src: torch.Tensor, text: torch.Tensor, image: torch.Tensor, generator=None):
        """(z_age (B, z_dim), eq. (8)'s KL (B,)) for source codes ``z_src`` (normalised) and the
        target age's CLIP text and reference-image features; eps from ``generator``."""
        mu, log_sigma = self.embedding(text, image)
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        e_age = mu + log_sigma.exp() * eps  # eq. (9)
        delta = self.to_delta(e_age)  # eq. (10)
        mean, std = z_src.mean(-1, keepdim=True), z_src.std(-1, keepdim=True).clamp_min(1e-6)
        z_age = self.scale(delta) * (z_src - mean) / std + self.shift(delta)  # eq. (11)
        return z_age, kl_to_text(text, mu, log_sigma)


@dataclass
class PadaLosses:
    """The losses' weights and the age margin. Chosen on the toy run (160 samples, 300 steps):
    age 1 / identity 3 / margin 0.05 moved the code 0.1 along the Young hyperplane's normal, age
    10 / identity 0.3 / margin 0.3 at t_loss 600 moved it +3.4 toward "young" and -2.3 toward
    "old" (README: what PADA reaches)."""

    age: float = 10.0
    identity: float = 0.3
    normalisation: float = 0.1
    reconstruction: float = 1.0
    kl: float = 0.01
    margin: float = 0.3


def one_step_image(model, scheduler, x_t: torch.Tensor, t: int, z_raw: torch.Tensor) -> torch.Tensor:
    """The decoder's P_t: x_0 predicted from x_t at t conditioned on z_sem (differentiable)."""
    a = scheduler.alphas_cumprod[t].to(x_t.device)
    eps = model.eps(x_t, torch.full((len(x_t),), t, device=x_t.device), z_raw)
    return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)


def train_pada(
    pada: Pada,
    model,
    scheduler,
    guide,
    images: torch.Tensor,
    z: torch.Tensor,
    stats: dict,
    ages: torch.Tensor,
    texts: torch.Tensor,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 16,
    t_loss: int = 600,
    weights: PadaLosses | None = None,
    seed: int = 0,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``pada`` on source ``images`` (n, 3, R, R) in [-1, 1], their normalised codes ``z``
    (n, z_dim) and ages ``ages`` (n,) (1: the age of ``texts[1]``, 0: of ``texts[0]``; the
    oracle's reading), toward a target age drawn per sample; ``texts`` (2, D): the two age
    texts' CLIP features. Each age's reference image: a random training image of that age.
    Returns the last step's losses."""
    w = weights or PadaLosses()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.requires_grad_(False)
    pada.to(device).train()
    opt = torch.optim.Adam(pada.parameters(), lr=lr)
    with torch.no_grad():
        feats = torch.cat([guide.image(images[i : i + 64].to(device)) for i in range(0, len(images), 64)])
        text_unit = F.normalize(texts.to(device), dim=-1)
    by_age = [torch.nonzero(ages == a).flatten() for a in (0, 1)]
    if any(len(g) == 0 for g in by_age):
        raise ValueError("PADA needs training images of both ages (the reference images of eq. (8)'s text-image pair)")
    mean, std = stats["mean"].to(device), stats["std"].to(device)
    last = {}
    for step in range(steps):
        b = torch.randint(len(images), (batch_size,), generator=gen)
        target = torch.randint(2, (batch_size,), generator=gen)
        ref = torch.stack([by_age[int(a)][torch.randint(len(by_age[int(a)]), (1,), generator=gen)][0] for a in target])
        x0, z_src = images[b].to(device), z[b].to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        a = scheduler.alphas_cumprod[t_loss].to(device)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        z_age, kl = pada(z_src, texts.to(device)[target], feats[ref], generator=gen)
        edited = one_step_image(model, scheduler, x_t, t_loss, z_age * std + mean)
        with torch.no_grad():
            plain = one_step_image(model, scheduler, x_t, t_loss, z_src * std + mean)
        cos = F.normalize(guide.image(edited), dim=-1) @ text_unit.T  # (B, 2)
        own, other = cos.gather(1, target.view(-1, 1).to(device)), cos.gather(1, (1 - target).view(-1, 1).to(device))
        losses = {
            "age": F.relu(w.margin - (own - other)).mean(),
            "identity": (edited - plain).abs().mean(),
            "normalisation": (z_age.mean(-1) ** 2 + (z_age.std(-1) - z_src.std(-1)) ** 2).mean(),
            "reconstruction": (((z_age - z_src) ** 2).mean(-1) * (target.to(device) == ages[b].to(device))).mean(),
            "kl": kl.mean() / pada.clip_dim,
        }
        total = sum(getattr(w, k) * v for k, v in losses.items())
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = {k: float(v.detach()) for k, v in losses.items()}
        if on_step is not None:
            on_step(step + 1, last)
    pada.eval()
    return last
