"""The editors that learn from CLIP (hcore/clip_guidance.py for the losses), trained on a run's
own samples:

- DiffusionCLIP (the reading note's sec. III; Kim et al. 2022): the denoiser fine-tuned for
  one text edit with the directional CLIP loss and the L1 identity term (eq. (6) = eq. (3) +
  eq. (7)), from the training images' latents x_{t0}, generating with deterministic DDIM from
  t0 and taking the loss on each step's P_t (the authors' GPU-efficient scheme: one optimiser
  step per denoising step, the latent then detached). Fine-tuned here as a LoRA (peft) on the
  U-Net's convolutions and attention projections: ``train_diffusionclip``.
- Asyrp as its authors train it (Kwon et al. 2023, sec. 3.3): a small network
  f(h_t, t) -> Delta h_t at the bottleneck, on the P_t-only path (the edited eps in P_t, the
  unedited one in D_t), trained over the editing interval [T, t_edit] with the directional
  CLIP loss between the edited and the unedited P_t plus an L1 term: ``train_asyrp``.
- DeltaSpace / DeltaEdit (the note's sec. VIII, eq. (22)): a mapper from (a source image's CLIP
  feature, a CLIP-space delta) to Delta h, trained on image pairs with image deltas Delta i
  only; at inference a text delta Delta t ("a person" -> "a smiling person") takes Delta i's
  place, so no attribute is ever trained for: ``train_deltaspace``.

DiffusionCLIP and Asyrp train on latent (Stable Diffusion-shaped) models too: a ``Space`` holds
the text setup, each training sample's prompt (the U-Net's conditioning, guided as the run
samples) and the VAE decoder, differentiable, that turns every P_t into the image CLIP sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hspace.hcore.clip_guidance import ClipGuide, direction_loss, identity_loss
from hspace.hcore.conditioning import unet_output
from hspace.hcore.hooks import HSpaceHook
from hspace.hcore.sampler import ddim_scheduler, ddim_step

LORA_TARGETS = ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")


@dataclass
class Space:
    """Where the training samples live. Pixel models: the default (no text, P_t is the image).
    Latent models: ``text`` (hcore.generator.TextSetup: its VAE and text encoders, guidance)
    and ``prompts``, the prompt of every training sample in the order of the tensors trained
    on."""

    text: object | None = None
    prompts: Sequence[str] | None = None

    def __post_init__(self):
        if self.text is not None and not self.prompts:
            raise ValueError("a latent model's Space needs the training samples' prompts")

    @property
    def guided(self) -> bool:
        return self.text is not None and self.text.guided

    def conditioning(self, rows: torch.Tensor):
        """The U-Net's conditioning for the training samples ``rows`` (None for a pixel model)."""
        if self.text is None:
            return None
        return self.text.conditioning([self.prompts[int(i)] for i in rows])

    def image(self, p: torch.Tensor) -> torch.Tensor:
        """The image of P_t (B, 3, R, R) in [-1, 1], differentiable in ``p``: P_t itself for a
        pixel model, the VAE's decoding of it for a latent one."""
        return p if self.text is None else self.text.decode(p, grad=True)


def add_edit_lora(unet, rank: int = 4, seed: int = 0, name: str = "diffusionclip") -> None:
    """A LoRA adapter ``name`` (peft's ``inject_adapter_in_model``: any diffusers U-Net, with or
    without diffusers' adapter mixin; B zero-initialised, so the fine-tuned model starts as the
    original) on every resnet convolution and attention projection of ``unet``."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(config, unet, adapter_name=name)


def lora_layers(unet) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


def enable_lora(unet, enabled: bool) -> None:
    """Every LoRA layer of ``unet`` on (the fine-tuned model) or off (the original)."""
    for _, m in lora_layers(unet):
        m.enable_adapters(enabled)


def remove_lora(unet) -> None:
    """The LoRA layers replaced by the layers they wrap: ``unet`` as it was before
    ``add_edit_lora``."""
    for name, m in lora_layers(unet):
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, m.get_base_layer())
    config = getattr(unet, "peft_config", None)  # what inject_adapter_in_model recorded on the model
    if isinstance(config, dict):
        for name in [k for k, c in config.items() if set(getattr(c, "target_modules", ())) == set(LORA_TARGETS)]:
            del config[name]
        if not config and "peft_config" in vars(unet):
            del unet.peft_config


def lora_weights(unet) -> dict[str, torch.Tensor]:
    """The LoRA parameters of ``unet`` (what a fine-tuned edit ships), detached, on the CPU."""
    return {n: p.detach().cpu().clone().contiguous() for n, p in unet.named_parameters() if "lora_" in n}


def set_lora_weights(unet, weights: dict[str, torch.Tensor]) -> None:
    """The LoRA parameters of ``unet`` set to ``weights`` (names as ``lora_weights`` gives them);
    ValueError where they do not fit the adapter."""
    params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    if set(params) != set(weights):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(f"the LoRA weights do not fit this U-Net: {len(missing)} missing, {len(extra)} unknown")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise ValueError(f"the LoRA weight {n} has shape {tuple(weights[n].shape)}, the U-Net {tuple(p.shape)}")
            p.copy_(weights[n].to(p.device, p.dtype))


def clip_step(opt, guide: ClipGuide, p_gen, features_ref, text_delta, x_ref, l1: float, sums: dict) -> None:
    """One optimiser step on eq. (6): eq. (3) between ``p_gen`` (a P_t, with gradients) and the
    reference's CLIP features, plus ``l1`` times eq. (7)'s L1 distance to ``x_ref``; the batch's
    summed losses added to ``sums``."""
    d = direction_loss(guide.image(p_gen), features_ref, text_delta).mean()
    i_loss = identity_loss(p_gen, x_ref).mean()
    (d + l1 * i_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sums["direction"] += d.item() * len(p_gen)
    sums["l1"] += i_loss.item() * len(p_gen)


def train_diffusionclip(
    unet,
    scheduler,
    guide: ClipGuide,
    x_start: torch.Tensor,
    x_ref: torch.Tensor,
    steps: int,
    start_step: int,
    text_delta: torch.Tensor,
    epochs: int = 2,
    lr: float = 4e-4,
    l1: float = 3.0,
    batch_size: int = 8,
    on_step: Callable[[int, dict], None] | None = None,
    space: Space | None = None,
) -> list[dict]:
    """Fine-tune the LoRA of ``unet`` (``add_edit_lora`` first; only its parameters train) so
    that deterministic DDIM from ``x_start`` (the training samples' x at step ``start_step`` of
    ``steps``, i.e. t0; latents for a latent model) ends at the text edit of ``x_ref`` (their
    images, [-1, 1]). Each epoch visits every training sample once; returns the per-epoch mean
    losses. ``space``: a latent model's text and VAE (``Space``)."""
    space = space or Space()
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError("train_diffusionclip: the U-Net has no LoRA adapter (add_edit_lora)")
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.Adam(params, lr=lr)
    device = params[0].device
    with torch.no_grad():
        ref_features = torch.cat([guide.image(x_ref[i : i + 64].to(device)) for i in range(0, len(x_ref), 64)])
    delta_t = text_delta.to(device)
    history, done = [], 0
    gen = torch.Generator().manual_seed(0)
    unet.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_start), generator=gen)
        sums = {"direction": 0.0, "l1": 0.0}
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            x, ref, feats = x_start[b].to(device), x_ref[b].to(device), ref_features[b]
            cond = space.conditioning(b)
            for t in sched.timesteps[start_step:]:
                eps = unet_output(unet, x, int(t), cond)
                x_prev, p_t = ddim_step(sched, x, int(t), eps, eps, 0.0, torch.zeros_like(x))
                clip_step(opt, guide, space.image(p_t), feats, delta_t, ref, l1, sums)
                x = x_prev.detach()
            done += 1
            if on_step is not None:
                seen = min(len(order), i + batch_size) * (len(sched.timesteps) - start_step)
                on_step(done, {k: v / seen for k, v in sums.items()})
        n = len(order) * (len(sched.timesteps) - start_step)
        history.append({k: v / n for k, v in sums.items()})
    unet.eval().requires_grad_(False)
    return history


class DeltaNet(nn.Module):
    """Asyrp's f_t: Delta h_t = f(h_t, t), 1x1 convolutions around a learnt embedding of the
    sampling step (the authors' DeltaBlock), the last layer zero-initialised (no edit at first)."""

    def __init__(self, channels: int, steps: int, hidden: int = 64):
        super().__init__()
        self.channels, self.steps, self.hidden = channels, steps, hidden
        self.inp = nn.Conv2d(channels, hidden, 1)
        self.step = nn.Embedding(steps, hidden)
        self.norm = nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden)
        self.out = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, step: int) -> torch.Tensor:
        z = self.inp(h.float()) + self.step.weight[step].view(1, -1, 1, 1)
        return self.out(F.silu(self.norm(z)))


def train_asyrp(
    net: DeltaNet,
    unet,
    scheduler,
    guide: ClipGuide,
    x_T: torch.Tensor,
    steps: int,
    stop_step: int,
    text_delta: torch.Tensor,
    h_point: str = "output",
    epochs: int = 2,
    lr: float = 2e-3,
    l1: float = 3.0,
    batch_size: int = 8,
    on_step: Callable[[int, dict], None] | None = None,
    space: Space | None = None,
) -> list[dict]:
    """Train ``net`` over the editing interval (steps 0 .. ``stop_step`` - 1 of ``steps``, i.e.
    [T, t_edit]) from the training samples' x_T, deterministic DDIM: at each step the edited
    pass (h_t + f(h_t, t)) gives P_t^edit, the unedited pass P_t and D_t; the loss is eq. (3)
    between P_t^edit and P_t plus ``l1`` times their L1 distance; x_{t-1} follows the P_t-only
    edit, detached (both halves of a guided batch edited). ``space``: a latent model's text and
    VAE (``Space``; the losses then on the decoded P_t). Returns the per-epoch mean losses."""
    space = space or Space()
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(steps)
    unet.requires_grad_(False)
    device = next(unet.parameters()).device
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    delta_t = text_delta.to(device)
    history, done = [], 0
    gen = torch.Generator().manual_seed(0)
    with HSpaceHook(unet, point=h_point) as hs:
        hs.guided = space.guided
        for _ in range(epochs):
            order = torch.randperm(len(x_T), generator=gen)
            sums = {"direction": 0.0, "l1": 0.0}
            for i in range(0, len(order), batch_size):
                b = order[i : i + batch_size]
                x, cond = x_T[b].to(device), space.conditioning(b)
                for step, t in enumerate(sched.timesteps[:stop_step]):
                    with torch.no_grad():
                        hs.delta = None
                        eps = unet_output(unet, x, int(t), cond)
                        _, p_ref = ddim_step(sched, x, int(t), eps, eps, 0.0, torch.zeros_like(x))
                        image_ref = space.image(p_ref)
                        ref = guide.image(image_ref)
                    hs.delta = lambda h, step=step: net(h, step).to(h.dtype)
                    eps_edit = unet_output(unet, x, int(t), cond)
                    hs.delta = None
                    x_prev, p_edit = ddim_step(sched, x, int(t), eps_edit, eps, 0.0, torch.zeros_like(x))
                    clip_step(opt, guide, space.image(p_edit), ref, delta_t, image_ref, l1, sums)
                    x = x_prev.detach()
                done += 1
                if on_step is not None:
                    on_step(done, {k: v / min(len(order), i + batch_size) / stop_step for k, v in sums.items()})
            history.append({k: v / (len(order) * stop_step) for k, v in sums.items()})
    net.eval()
    return history


class DeltaMapper(nn.Module):
    """DeltaEdit's mapper: (the source image's CLIP feature, a unit CLIP-space delta), both
    (B, D), -> Delta h_{T:1} as coefficients on ``basis`` (m, T*C*H*W; the top principal axes
    of the training samples' h), an MLP."""

    def __init__(self, dim: int, basis: torch.Tensor, h_shape: tuple[int, ...], hidden: int = 256):
        super().__init__()
        self.dim, self.h_shape, self.hidden = dim, tuple(h_shape), hidden
        self.register_buffer("basis", basis.float())
        self.net = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, len(basis))
        )

    def coefficients(self, source: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([F.normalize(source.float(), dim=-1), F.normalize(delta.float(), dim=-1)], -1))

    def forward(self, source: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Delta h (B, *h_shape)."""
        return (self.coefficients(source, delta) @ self.basis).view(-1, *self.h_shape)


def h_basis(h: torch.Tensor, m: int) -> torch.Tensor:
    """The top ``m`` principal axes (m, d) of the samples' flattened h (n, d), as rows."""
    centred = h.float() - h.float().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return vh[:m]


def train_deltaspace(
    mapper: DeltaMapper,
    features: torch.Tensor,
    h: torch.Tensor,
    pairs: int = 20000,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit ``mapper`` on ``pairs`` random ordered pairs (i, j) of the training samples: from
    (f_i, Delta i = f_j - f_i) (eq. (22), image features ``features`` (n, D)) to the coefficients
    of h_j - h_i (``h``: (n, d), flattened h_{T:1}) on the mapper's basis; MSE. Returns the
    per-epoch losses."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(len(features), (pairs,), generator=gen)
    j = torch.randint(len(features), (pairs,), generator=gen)
    keep = i != j
    i, j = i[keep], j[keep]
    coeff = (h.float() - h.float().mean(0)) @ mapper.basis.T  # (n, m)
    target = coeff[j] - coeff[i]
    src, delta = features[i].float(), features[j].float() - features[i].float()
    opt = torch.optim.Adam(mapper.parameters(), lr=lr)
    history = []
    mapper.train()
    for epoch in range(epochs):
        order = torch.randperm(len(i), generator=gen)
        total = 0.0
        for k in range(0, len(order), batch_size):
            b = order[k : k + batch_size]
            loss = F.mse_loss(mapper.coefficients(src[b], delta[b]), target[b])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item() * len(b)
        history.append(total / len(order))
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    mapper.eval()
    return history
