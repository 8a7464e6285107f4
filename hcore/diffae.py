"""Diffusion autoencoders (Preechakul et al. 2022; the reading note's sec. V): a semantic
encoder z_sem = Enc(x_0) and a conditional DDIM decoder eps(x_t, t, z_sem).

- The semantic encoder: a small CNN (stride-2 convolutions, GroupNorm, SiLU) and a linear map
  to z_sem.
- The decoder: a diffusers ``UNet2DModel`` whose time embedding carries z_sem: z_sem -> a linear
  map -> added to the time embedding (diffusers' class-embedding slot, ``class_embed_type=
  "identity"``) -> each resnet's GroupNorm scale and shift (``resnet_time_scale_shift=
  "scale_shift"``). DiffAE's adaptive group norm multiplies by a separate z_s instead:
  AdaGN(h, t, z) = z_s (t_s GN(h) + t_b); here (t + z) sets (t_s, t_b) jointly.
- The stochastic code x_T: deterministic DDIM inversion conditioned on z_sem (sec. V-C,
  eq. (14)), and decoding is DDIM from x_T conditioned on z_sem.
- The latent DDPM (sec. V-E): a small MLP eps(z_t, t) over normalised z_sem, so that z_sem can
  be sampled without an image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SemanticEncoder(nn.Module):
    """x_0 (B, 3, R, R) in [-1, 1] -> z_sem (B, z_dim)."""

    def __init__(self, z_dim: int = 128, channels: tuple[int, ...] = (32, 64, 128), image_size: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.head = nn.Linear(c_in * side * side, z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class DiffAE(nn.Module):
    """The encoder, the map of z_sem into the decoder's time embedding, and the decoder."""

    def __init__(self, encoder: SemanticEncoder, unet, z_dim: int):
        super().__init__()
        self.encoder, self.unet = encoder, unet
        self.z_to_emb = nn.Linear(z_dim, unet.config.block_out_channels[0] * 4)

    def eps(self, x_t: torch.Tensor, t, z: torch.Tensor) -> torch.Tensor:
        """The decoder's eps(x_t, t, z_sem)."""
        return self.unet(x_t, t, class_labels=self.z_to_emb(z)).sample

    def loss(self, x0: torch.Tensor, scheduler, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (sec. V-D): || eps - eps(x_t, t, Enc(x_0)) ||^2 at a uniform t, end to end."""
        n = len(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        return F.mse_loss(self.eps(x_t, t, self.encoder(x0)), noise)


class Conditioned(nn.Module):
    """The decoder as an unconditional-looking U-Net for a batch whose z_sem is fixed: forward
    (x_t, t) -> an object with ``.sample``, as hspace's sampler and inversion call a U-Net; the
    decoder's config, dtype and mid block stay reachable (``unet``), so h-space hooks find it."""

    def __init__(self, model: DiffAE, z: torch.Tensor):
        super().__init__()
        self.model, self.z = model, z
        self.config = model.unet.config
        self.mid_block = model.unet.mid_block

    def forward(self, x_t, t, *args, **kwargs):
        out = self.model.unet(x_t, t, class_labels=self.model.z_to_emb(self.z.to(x_t.dtype)))
        return out


class LatentDDPM(nn.Module):
    """eps(z_t, t) for normalised z_sem: an MLP with a sinusoidal timestep embedding (sec. V-E)."""

    def __init__(self, z_dim: int, hidden: int = 512, layers: int = 4):
        super().__init__()
        self.z_dim, self.hidden = z_dim, hidden
        self.time = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(z_dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                    for _ in range(layers))  # fmt: skip
        self.out = nn.Linear(hidden, z_dim)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = 32
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=z_t.device) / half)
        angles = t.float().view(-1, 1) * freqs.view(1, -1)
        emb = self.time(torch.cat([angles.sin(), angles.cos()], -1))
        h = self.inp(z_t)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


@torch.no_grad()
def sample_z(latent: LatentDDPM, scheduler, n: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """n normalised z_sem from the latent DDPM by deterministic DDIM (``scheduler``: a
    DDIMScheduler over the latent DDPM's training timesteps)."""
    scheduler.set_timesteps(steps)
    z = torch.randn(n, latent.z_dim, generator=generator)
    for t in scheduler.timesteps:
        eps = latent(z, torch.full((n,), int(t)))
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z


def stochastic_code(model: DiffAE, scheduler, x0: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
    """x_T of images ``x0`` by deterministic DDIM inversion conditioned on their z_sem (sec. V-C,
    eq. (14)), with hspace's inversion (hcore.inversion.ddim_invert, no fixed-point refinement:
    the paper's plain inversion)."""
    from hspace.hcore.inversion import ddim_invert

    with torch.no_grad():
        return ddim_invert(Conditioned(model, z), scheduler, x0, steps, refine=0)


def decode(model: DiffAE, scheduler, x_T: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
    """Images (B, 3, R, R) in [-1, 1]: deterministic DDIM from ``x_T`` conditioned on ``z``."""
    from hspace.hcore.sampler import make_generators, sample

    return sample(Conditioned(model, z), scheduler, make_generators(0, range(len(x_T))), steps, 0.0, x_T=x_T)
