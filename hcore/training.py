"""DDPM training, as used for the toy-faces model: the simple epsilon-prediction loss
of Ho et al. (the paper's eq. (1): x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) n, and the
network is trained to predict n) and an exponential moving average of the weights.

Pure: no file IO. The caller supplies batches, generators and does the checkpointing.
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers import DDPMScheduler, UNet2DModel


def ddpm_loss(
    unet: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared error between the true and predicted noise at random timesteps.

    x0: (B, C, H, W) in [-1, 1]. Timesteps and noise come from ``generator`` alone, so a
    resumed run draws exactly what an uninterrupted one would have.
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)  # eq. (1)
    eps = unet(x_t, t).sample
    return torch.nn.functional.mse_loss(eps, noise)


class EMA:
    """Exponential moving average of a model's parameters with the usual warm-up
    decay min(decay, (1 + step) / (10 + step)), so early averages are not stuck at init."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - d)


def lr_at(step: int, base_lr: float, warmup: int, decay_from: int | None = None, total: int | None = None) -> float:
    """Linear warm-up, then constant; with ``decay_from``, a cosine decay from that step to
    zero at ``total`` (a constant rate leaves the weights jittering around fine details)."""
    lr = base_lr * min(1.0, (step + 1) / max(1, warmup))
    if decay_from is not None and total is not None and step >= decay_from:
        frac = (step - decay_from) / max(1, total - decay_from)
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return lr


class SkipDropout:
    """Skip-connection dropout near the bottleneck: a training choice of the toy world v2,
    not of the paper.

    Each up block of a diffusers UNet2DModel reads the level below it together with the
    skip connections of its own resolution. A small model trained for hours rather than
    weeks decodes from the skips and ignores h: on a four-level toy (32x32 -> 4x4),
    zeroing h changed the predicted noise by 0.1-0.4% and an eq. (10) edit did nothing even
    at gamma = 50 (the three-level v1 model: 2.4-14%). With probability ``p`` per
    sample, the skips read by the ``levels`` deepest up blocks are zeroed during training,
    so that what those levels decide must come through h.

    Forward pre-hooks on ``unet.up_blocks[:levels]`` (UNet2DModel passes an up block its
    skips as the second positional argument, UNet2DConditionModel as
    ``res_hidden_states_tuple``); inactive in eval mode and until ``draw`` is
    called: sampling and saved weights are those of a plain UNet2DModel.
    """

    def __init__(self, unet: UNet2DModel, p: float, levels: int = 1):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"skip dropout must be in [0, 1), got {p}")
        if not 1 <= levels < len(unet.up_blocks):
            raise ValueError(f"skip dropout levels must be in [1, {len(unet.up_blocks) - 1}], got {levels}")
        self.p = p
        self.keep: torch.Tensor | None = None
        self.handles = [
            block.register_forward_pre_hook(self._hook, with_kwargs=True) for block in unet.up_blocks[:levels]
        ]

    def draw(self, batch: int, generator: torch.Generator) -> None:
        """The per-sample keep mask of the next training forward pass (all levels share it)."""
        self.keep = (torch.rand(batch, generator=generator) >= self.p).float()

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        if not module.training or self.keep is None or self.p == 0.0:
            return None
        # UNet2DModel passes an up block its skips positionally, UNet2DConditionModel by keyword
        skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
        if not isinstance(skips, tuple):
            raise RuntimeError(
                "this diffusers version passes the skip connections to up blocks in a way hspace does not know; "
                "skip dropout cannot be applied (train with skip_dropout 0)"
            )
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        keep = self.keep.to(hidden.device, hidden.dtype).view(-1, 1, 1, 1)
        dropped = tuple(r * keep for r in skips)
        if "res_hidden_states_tuple" in kwargs:
            return args, {**kwargs, "res_hidden_states_tuple": dropped}
        return (args[0], dropped, *args[2:]), kwargs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def train_step(
    unet: UNet2DModel,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    step: int,
    generator: torch.Generator,
    base_lr: float,
    warmup: int,
    grad_clip: float = 1.0,
    decay_from: int | None = None,
    total: int | None = None,
) -> float:
    """One optimisation step of ``ddpm_loss``; returns the loss value."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, base_lr, warmup, decay_from, total)
    unet.train()
    loss = ddpm_loss(unet, scheduler, x0, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
    optimizer.step()
    ema.update(unet, step)
    return float(loss.detach())
