"""Attribute Vector Integration (Wang et al. 2025, arXiv 2502.02225, sec. 3.2): one prompt pair,
a small network that predicts singular values, one intervention at one step.

Per channel (the paper's Fig. 1: "the SVD is performed channel-wise"), with x_org the latent at
step ``org_step`` under the original prompt A and x_tar the same seed's latent at the later step
``tar_step`` (further along the denoising) under the target prompt B, and their top-k SVDs
(U_o, s_o, Vh_o), (U_t, s_t, Vh_t):

- the attribute vectors (sec. 3.2.1): U_attr = [U_o, flip(U_t)] (columns: x_org's top k, then
  x_tar's top k in reverse order), Vh_attr = [Vh_o; flip(Vh_t)] (rows, likewise);
- the predictor f (sec. 3.2.2, sec. 5): three Linear + ReLU layers on the flattened channel of
  x_org (width H*W, the paper's 4096 for 64 x 64), then two one-layer heads of 2k outputs: the
  singular values sigma and a small adjustment delta;
- the output y = U_attr diag(sigma) Vh_attr, which replaces x_org, and the sampler continues
  under prompt A; with the user's strength alpha the target block's columns are scaled,
  U_attr(alpha) = [U_o, alpha flip(U_t)] (the paper's Fig. 7: "linearly controlling the strength
  of the singular vector column construction"; alpha 1 is what was trained);
- the losses: L_tar = ||y~ - x_tar||_F^2 with y~ = flip(U_attr) diag(flip(sigma) + delta)
  flip(Vh_attr) (the reverse-ordered reconstruction, = y + the adjustment's part), L_org =
  ||y - x_org||_F^2 (the block dominated by x_org), and the two squared-Frobenius regularisers
  ||flip(sigma) + delta - s_t^(2k)||^2 and ||sigma - s_o^(2k)||^2 (x_tar's and x_org's own 2k
  largest singular values, which keeps the predictions in decreasing order), weighted by
  ``weights`` (lambda_1..4).

The paper's equations were lost from its text as extracted and it has no released code: the
reading above (which reconstruction each loss takes, the input of f, alpha on the columns only)
is hspace's, stated in the README's fidelity table; each choice is a setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AviSpec:
    """What a predictor is for: its latent's channels and side, k, the steps of the sampler and
    the two steps (step indices, 0 = x_T), the prompt pair."""

    channels: int
    side: int
    k: int
    steps: int
    org_step: int
    tar_step: int
    prompt_a: str
    prompt_b: str
    hidden: int

    def check(self) -> None:
        if not 0 < 2 * self.k <= self.side:
            raise ValueError(f"AVI: 2k = {2 * self.k} singular vectors must fit a {self.side} x {self.side} channel")
        if not 0 <= self.org_step < self.tar_step < self.steps:
            raise ValueError(
                f"AVI: need 0 <= org_step < tar_step < steps (x_tar further along the denoising), got "
                f"org_step {self.org_step}, tar_step {self.tar_step}, steps {self.steps}"
            )


class Predictor(nn.Module):
    """f: a channel of x_org (flattened) -> (sigma (2k,), delta (2k,))."""

    def __init__(self, spec: AviSpec):
        super().__init__()
        spec.check()
        self.spec = spec
        d, h = spec.side * spec.side, spec.hidden
        self.trunk = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.sigma = nn.Linear(h, 2 * spec.k)
        self.delta = nn.Linear(h, 2 * spec.k)

    def forward(self, x_org: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x_org.flatten(-2))
        return self.sigma(z), self.delta(z)


def top(x: torch.Tensor, n: int):
    """(U (..., H, n), s (..., n), Vh (..., n, W)) of the matrices x (..., H, W), float32."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u[..., :n].float(), s[..., :n].float(), vh[..., :n, :].float()


def attribute_vectors(x_org: torch.Tensor, x_tar: torch.Tensor, k: int):
    """(U_attr (..., H, 2k), Vh_attr (..., 2k, W)): x_org's top-k vectors, then x_tar's in
    reverse order (sec. 3.2.1)."""
    uo, _, vho = top(x_org, k)
    ut, _, vht = top(x_tar, k)
    return torch.cat([uo, ut.flip(-1)], -1), torch.cat([vho, vht.flip(-2)], -2)


def compose(u: torch.Tensor, values: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """u diag(values) vh, batched."""
    return (u * values.unsqueeze(-2)) @ vh


def losses(f: Predictor, x_org: torch.Tensor, x_tar: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four terms for channels x_org, x_tar (N, H, W) (module docstring), each a mean over N."""
    k = f.spec.k
    u, vh = attribute_vectors(x_org, x_tar, k)
    sigma, delta = f(x_org)
    y = compose(u, sigma, vh)
    y_tar = compose(u.flip(-1), sigma.flip(-1) + delta, vh.flip(-2))
    s_o, s_t = top(x_org, 2 * k)[1], top(x_tar, 2 * k)[1]
    per = lambda a: a.pow(2).flatten(1).sum(1).mean()  # noqa: E731 (the squared Frobenius norm)
    return {
        "target": per(y_tar - x_tar),
        "source": per(y - x_org),
        "target_values": per(sigma.flip(-1) + delta - s_t),
        "source_values": per(sigma - s_o),
    }


def train(
    f: Predictor,
    x_org: torch.Tensor,
    x_tar: torch.Tensor,
    weights: tuple[float, float, float, float] = (10.0, 10.0, 1.0, 1.0),
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch=None,
) -> list[dict]:
    """Adam on lambda_1 L_tar + lambda_2 L_org + lambda_3 L_tar-values + lambda_4 L_org-values
    over the channels of the pairs (B, C, H, W) (each channel one example); returns each
    epoch's mean terms. ``on_epoch(epoch, terms)`` after each epoch."""
    org = x_org.flatten(0, 1).float()
    tar = x_tar.flatten(0, 1).float()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(f.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(org), generator=g)
        sums: dict[str, float] = {}
        for start in range(0, len(org), batch_size):
            idx = order[start : start + batch_size]
            terms = losses(f, org[idx], tar[idx])
            total = sum(w * terms[n] for w, n in zip(weights, TERMS, strict=True))
            opt.zero_grad()
            total.backward()
            opt.step()
            for n, v in terms.items():
                sums[n] = sums.get(n, 0.0) + float(v.detach()) * len(idx)
        history.append({n: v / len(org) for n, v in sums.items()})
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history


TERMS = ("target", "source", "target_values", "source_values")


@torch.no_grad()
def integrate(f: Predictor, x_org: torch.Tensor, x_tar: torch.Tensor, alpha=1.0) -> torch.Tensor:
    """y_pred for latents x_org, x_tar (B, C, H, W) (x_tar may have one row for all): every
    channel's U_attr(alpha) diag(sigma) Vh_attr, sigma predicted from x_org's channel."""
    x_tar = x_tar.expand_as(x_org) if len(x_tar) == 1 else x_tar
    dtype = x_org.dtype
    org, tar = x_org.float(), x_tar.to(x_org.device).float()
    a = torch.as_tensor(alpha, dtype=torch.float32, device=org.device)
    a = a.reshape(-1, 1, 1, 1) if a.dim() else a  # one per latent, the same for its channels
    u, vh = attribute_vectors(org, tar, f.spec.k)
    k = f.spec.k
    u = torch.cat([u[..., :k], a * u[..., k:]], -1)
    sigma, _ = f(org)
    return compose(u, sigma, vh).to(dtype)
