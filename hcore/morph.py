"""DiffMorpher (Zhang et al. 2024, "DiffMorpher: unleashing the capability of diffusion models for
image morphing"; the reading note's sec. VI): a smooth morph between two images from a
text-conditioned latent model.

1. A LoRA per image (peft, on every attention's q, k, v and output projection; fitted with the
   model's own denoising loss on that image's latent and prompt): ``fit_lora``.
2. LoRA interpolation (eq. (17)): the LoRA parameters (A and B of every layer) mixed linearly,
   (1 - a) theta_0 + a theta_1, as the authors' code mixes them: ``set_lora``.
3. Latent interpolation: each image DDIM-inverted with its own LoRA (hcore.inversion.ddim_invert),
   the frames' initial noise the slerp of the two (eq. (18)), the text embeddings mixed
   linearly (eq. (19)).
4. AdaIN (eq. (20)): the slerped noise renormalised per channel to the linear mix of the two
   noises' channel means and standard deviations (the authors' code applies it to z_T).
5. Self-attention interpolation: for the first ``lam`` of the steps, the self-attention of the
   decoder (up blocks) takes its keys and values from the linear mix of the end frames' inputs
   to that layer at that step (recorded while the end frames are generated): ``KVMix``.
6. Rescheduling: the morph rendered once at uniform a, the cumulative distance between
   neighbouring frames normalised, and the a of each frame chosen so that the frames are evenly
   spaced along it (``reschedule``); the authors use LPIPS, hspace the RMS pixel distance (no
   LPIPS weights here; their code has it as the alternative).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def slerp(z0: torch.Tensor, z1: torch.Tensor, a: float, adain: bool = True) -> torch.Tensor:
    """eq. (18) on the whole tensors (float64 inside), then eq. (20)'s AdaIN per channel."""
    p0, p1 = z0.double(), z1.double()
    cos = ((p0 * p1).sum() / (p0.norm() * p1.norm())).clamp(-1 + 1e-7, 1 - 1e-7)
    phi = torch.arccos(cos)
    out = (torch.sin(phi * (1 - a)) * p0 + torch.sin(phi * a) * p1) / torch.sin(phi)
    if adain:
        mean = (1 - a) * _mean(p0) + a * _mean(p1)
        std = (1 - a) * _std(p0) + a * _std(p1)
        out = (out - _mean(out)) / _std(out) * std + mean
    return out.to(z0.dtype)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(-2, -1), keepdim=True)


def _std(x: torch.Tensor) -> torch.Tensor:
    return (x.var(dim=(-2, -1), keepdim=True) + 1e-5).sqrt()


def add_lora(unet, rank: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA adapter (peft) on every attention projection of ``unet``; returns its initial
    parameters (so a second image starts from the same ones)."""
    from peft import LoraConfig

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS))
        unet.add_adapter(config)
    return lora_state(unet)


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def set_lora(unet, states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> None:
    """The LoRA parameters set to sum_i w_i theta_i (eq. (17) with weights (1 - a, a))."""
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name in states[0]:
            params[name].copy_(sum(w * s[name].to(params[name]) for w, s in zip(weights, states, strict=True)))


def fit_lora(
    unet,
    scheduler,
    latent: torch.Tensor,
    conditioning,
    steps: int = 200,
    lr: float = 2e-4,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit the U-Net's LoRA parameters (already added, ``add_lora``) to one image: its VAE
    latent (1, C, R, R) and its prompt (a ``Conditioning`` without guidance; SDXL's added
    embeddings included), the model's training loss (eps or v
    at a random timestep of the whole schedule), AdamW (weight decay 0.01) at a constant lr,
    as the authors' code. Returns the fitted parameters."""
    g = torch.Generator().manual_seed(seed)
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    T = scheduler.config.num_train_timesteps
    device, dtype = latent.device, next(unet.parameters()).dtype
    kwargs = conditioning.unet_kwargs(1, device, dtype)
    unet.train()
    try:
        for step in range(steps):
            noise = torch.randn(latent.shape, generator=g).to(device)
            t = torch.randint(0, T, (1,), generator=g).to(device)
            noisy = scheduler.add_noise(latent, noise, t)
            eps = scheduler.config.prediction_type == "epsilon"
            target = noise if eps else scheduler.get_velocity(latent, noise, t)
            out = unet(noisy.to(dtype), t, **kwargs).sample
            loss = torch.nn.functional.mse_loss(out.float(), target.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step, loss.item())
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
    return lora_state(unet)


class KVMix:
    """Attention processors for the decoder's self-attention: ``record`` keeps each layer's input
    at each step (an end frame); ``mix(a, lam, steps)`` gives the layer, for steps < lam * steps,
    keys and values from (1 - a) input_0 + a input_1. The U-Net's calls are counted by a
    forward pre-hook (one per step)."""

    def __init__(self, unet, prefix: str = "up_blocks."):
        self.unet, self.prefix = unet, prefix
        self.stores: list[dict] = []
        self.step = -1

    def _processors(self, make):
        from hspace.hcore.edits.attention import swapped_processors

        self.step = -1
        chosen = lambda k, p: make(k, p) if k.startswith(self.prefix) and ".attn1." in k else p  # noqa: E731
        return swapped_processors(self.unet, chosen, lambda: setattr(self, "step", self.step + 1))

    def record(self):
        store: dict = {}
        self.stores.append(store)

        def make(name, original):
            def call(attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
                store[(name, self.step)] = hidden_states.detach().clone()
                return original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

            return call

        return self._processors(make)

    def mix(self, a: float, lam: float, steps: int):
        if len(self.stores) != 2:
            raise ValueError("record both end frames before mixing their attention")
        s0, s1 = self.stores

        def make(name, original):
            def call(attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
                if self.step < int(lam * steps) and encoder_hidden_states is None:
                    key = (name, self.step)
                    encoder_hidden_states = (1 - a) * s0[key] + a * s1[key]
                return original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

            return call

        return self._processors(make)


def reschedule(images: torch.Tensor) -> list[float]:
    """The a of each of n frames spacing them evenly by cumulative neighbour distance, from a
    first pass rendered at uniform a (images (n, C, H, W)): the inverse of the piecewise-linear
    map from a to the normalised cumulative RMS distance (the authors' AlphaScheduler)."""
    n = len(images)
    flat = images.double().reshape(n, -1)
    steps = ((flat[1:] - flat[:-1]) ** 2).mean(1).sqrt()
    cum = [0.0] + torch.cumsum(steps, 0).tolist()
    if cum[-1] <= 0:
        return [i / (n - 1) for i in range(n)]
    cum = [c / cum[-1] for c in cum]
    out = []
    for y in [i / (n - 1) for i in range(n)]:
        k = min(max(bisect.bisect_left(cum, y) - 1, 0), n - 2)
        lo, hi = cum[k], cum[k + 1]
        frac = 0.0 if hi == lo else (y - lo) / (hi - lo)
        out.append((k + frac) / (n - 1))
    return out


def spacing_spread(images: torch.Tensor) -> float:
    """Coefficient of variation (std / mean) of the RMS distances between neighbouring frames:
    0 for evenly spaced frames."""
    flat = images.double().reshape(len(images), -1)
    d = ((flat[1:] - flat[:-1]) ** 2).mean(1).sqrt()
    return float(d.std(unbiased=False) / d.mean()) if float(d.mean()) > 0 else 0.0
