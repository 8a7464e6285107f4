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
- HDAE's hierarchy (Lu et al. 2024; the reading note's sec. IX, Fig. 17): with ``levels`` the
  encoder also projects its shallower stages' features (global average pooled, finest first)
  into codes of those sizes, appended to the deepest one; the decoder reads level l's code at its
  own level l (its down block l and the up block of the same resolution: each resnet's time
  embedding gains a linear map of the code, zero at initialisation), the deepest code at every
  level as DiffAE's. The code of a hierarchical autoencoder is the concatenation, so every
  edit of z_sem reads it unchanged.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


class SemanticEncoder(nn.Module):
    """x_0 (B, 3, R, R) in [-1, 1] -> z_sem (B, z_dim)."""

    def __init__(self, z_dim: int = 128, channels: tuple[int, ...] = (32, 64, 128), image_size: int = 32,
                 levels: tuple[int, ...] = ()):  # fmt: skip
        super().__init__()
        if len(levels) >= len(channels):
            raise ValueError(f"levels {levels}: at most {len(channels) - 1} stages above the deepest")
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.head = nn.Linear(c_in * side * side, z_dim)
        self.level_heads = nn.ModuleList(nn.Linear(channels[i], d) for i, d in enumerate(levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z_sem: the deepest code, then (HDAE) each shallower stage's code, finest first."""
        stages, h = [], x
        for i, layer in enumerate(self.body):
            h = layer(h)
            if i % 3 == 2:
                stages.append(h)
        codes = [head(f.mean((2, 3))) for head, f in zip(self.level_heads, stages, strict=False)]
        return torch.cat([self.head(h.flatten(1)), *codes], 1) if codes else self.head(h.flatten(1))


class DiffAE(nn.Module):
    """The encoder, the map of z_sem into the decoder's time embedding, and the decoder."""

    def __init__(self, encoder: SemanticEncoder, unet, z_dim: int, levels: tuple[int, ...] = ()):
        super().__init__()
        self.encoder, self.unet = encoder, unet
        self.z_dim, self.levels = z_dim, tuple(levels)
        emb = unet.config.block_out_channels[0] * 4
        self.z_to_emb = nn.Linear(z_dim, emb)
        self.level_to_emb = nn.ModuleList(nn.Linear(d, emb) for d in self.levels)
        for lin in self.level_to_emb:  # a hierarchical decoder starts as the flat one
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if len(self.levels) >= len(unet.config.block_out_channels):
            raise ValueError(f"levels {self.levels}: the decoder has {len(unet.config.block_out_channels)} levels")

    @property
    def code_dim(self) -> int:
        return self.z_dim + sum(self.levels)

    def code_parts(self) -> dict[str, slice]:
        """The code's parts by the encoder stage they come from: {"4px (deepest)": slice,
        "16px": slice, ...} (one part for a flat code)."""
        size = self.unet.config.sample_size
        stages = len(self.encoder.body) // 3
        parts, start = {f"{size >> stages}px (deepest)": slice(0, self.z_dim)}, self.z_dim
        for i, d in enumerate(self.levels):
            parts[f"{size >> (i + 1)}px"] = slice(start, start + d)
            start += d
        return parts

    def decoder(self, x_t: torch.Tensor, t, z: torch.Tensor):
        """The decoder's output (``.sample``: eps) for x_t at t under the code z (B, code_dim):
        the deepest code through the time embedding; each level's code added to the time
        embedding of its own level's resnets, by forward pre-hooks held for this call only."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"a code of {z.shape[-1]} dimensions for an autoencoder of {self.code_dim}")
        handles = []
        start = self.z_dim
        try:
            for level, (size, lin) in enumerate(zip(self.levels, self.level_to_emb, strict=True)):
                emb = lin(z[:, start : start + size])
                start += size
                for resnet in level_resnets(self.unet, level):
                    handles.append(resnet.register_forward_pre_hook(partial(_add_to_temb, emb), with_kwargs=True))
            return self.unet(x_t, t, class_labels=self.z_to_emb(z[:, : self.z_dim]))
        finally:
            for handle in handles:
                handle.remove()

    def eps(self, x_t: torch.Tensor, t, z: torch.Tensor) -> torch.Tensor:
        """The decoder's eps(x_t, t, z_sem)."""
        return self.decoder(x_t, t, z).sample

    def loss(self, x0: torch.Tensor, scheduler, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (sec. V-D): || eps - eps(x_t, t, Enc(x_0)) ||^2 at a uniform t, end to end."""
        n = len(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        return F.mse_loss(self.eps(x_t, t, self.encoder(x0)), noise)


def level_shares(w, parts: dict[str, slice]) -> dict[str, float]:
    """HDAE's Fig. 18 in numbers: the share of a hyperplane normal's squared weight on each part
    of the code (``DiffAE.code_parts``)."""
    total = float((w**2).sum()) or 1.0
    return {name: float((w[part] ** 2).sum()) / total for name, part in parts.items()}


def level_resnets(unet, level: int) -> list[nn.Module]:
    """The resnets of a UNet2DModel's resolution level ``level`` (0: the finest): its down block
    ``level`` and the up block of the same resolution."""
    ups = unet.up_blocks[len(unet.up_blocks) - 1 - level]
    return [*unet.down_blocks[level].resnets, *ups.resnets]


def _add_to_temb(emb: torch.Tensor, module, args: tuple, kwargs: dict):
    """A resnet's forward pre-hook: its time embedding (second argument) plus ``emb``."""
    if len(args) >= 2:
        return (args[0], args[1] + emb.to(args[1].dtype), *args[2:]), kwargs
    return args, {**kwargs, "temb": kwargs["temb"] + emb.to(kwargs["temb"].dtype)}


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
        return self.model.decoder(x_t, t, self.z.to(x_t.dtype))


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
