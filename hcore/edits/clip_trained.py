"""The CLIP-trained editors as editing methods (their training: hcore/clip_editors.py).

- ``diffusionclip``: from t0 on, the U-Net's eps mixed with its fine-tuned copy's (a LoRA):
  eps = eps_theta + gamma (eps_theta_hat - eps_theta): DiffusionCLIP's noise combination (Kim et
  al. 2022 mix fine-tuned models' eps with weights gamma_i for several attributes and a smooth
  transition) with the original as the other model: gamma 0 the original, 1 the fine-tuned one. The fine-tuned
  pass is the same U-Net with its adapter enabled, called from a forward hook (no copy of the
  weights, no forward of our own). On a run's own sample x_{t0} is its own point at t0, which
  DDIM inversion (the paper's step 1) only approximates.
- ``asyrp-net``: Asyrp's trained f(h_t, t) (Kwon et al. 2023, sec. 3.3): h_t + gamma f(h_t, t)
  on the editing interval [T, t_edit], the edited eps in P_t only.
- ``deltaspace``: DeltaEdit's mapper (the reading note's sec. VIII): Delta h_{T:1} from the
  sample's CLIP image feature and the CLIP text delta of a prompt pair (Delta t in the place of
  the Delta i it was trained on), added as eq. (6) does, times gamma.

Each is made from what its training wrote (``load_weights``: the tensors and metadata of one
safetensors file) and, for a run's samples, by ``from_replay``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from hspace.hcore.edits import Action, EditMethod, register

ADAPTER = "diffusionclip"  # the adapter name in the LoRA weights' keys, as training saves them


def _per_row(gamma, rows: int, device) -> torch.Tensor:
    """gamma (a number or (B,)) as (rows, 1, 1, 1); a guided batch has 2B rows ([uncond; cond])."""
    g = torch.as_tensor(gamma, dtype=torch.float32, device=device).reshape(-1)
    if g.numel() > 1 and rows == 2 * g.numel():
        g = torch.cat([g, g])
    return g.view(-1, 1, 1, 1)


@dataclass
class FineTuned:
    """A DiffusionCLIP edit: the LoRA weights, their rank, and t0 (a timestep of the training
    schedule: the fine-tuned model runs at timesteps <= t0)."""

    weights: dict
    rank: int
    t0: int


class MixFineTuned(Action):
    def __init__(self, edit: FineTuned, gamma):
        self.edit, self.gamma = edit, gamma

    @contextlib.contextmanager
    def session(self, unet):
        from hspace.hcore.clip_editors import add_edit_lora, enable_lora, lora_layers, remove_lora, set_lora_weights

        if lora_layers(unet):
            raise ValueError("diffusionclip: this U-Net already carries LoRA layers (one fine-tuned edit at a time)")
        add_edit_lora(unet, self.edit.rank, name=ADAPTER)
        inner = {"running": False}

        def mix(module, args, kwargs, output):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if inner["running"] or float(torch.as_tensor(t).reshape(-1)[0]) > self.edit.t0:
                return None
            inner["running"] = True
            enable_lora(module, True)
            try:
                tuned = module(*args, **kwargs)
            finally:
                enable_lora(module, False)
                inner["running"] = False
            out, new = (output[0], tuned[0]) if isinstance(output, tuple) else (output.sample, tuned.sample)
            mixed = out + _per_row(self.gamma, out.shape[0], out.device).to(out.dtype) * (new - out)
            if isinstance(output, tuple):
                return (mixed, *output[1:])
            output.sample = mixed
            return output

        try:
            set_lora_weights(unet, self.edit.weights)
            enable_lora(unet, False)
            handle = unet.register_forward_hook(mix, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()
        finally:
            remove_lora(unet)


@register
class DiffusionCLIP(EditMethod):
    name = "diffusionclip"
    trainer = "hspace clip-edits RUN (clip_edits.prompt_pairs: ATTR)"
    needs = ("weights",)
    strength = "gamma"
    unit = "the share of the fine-tuned model's eps from t0 on (0: the original; 1: the fine-tuned)"
    acts_on = "weights"
    reference = "Kim et al. 2022 (DiffusionCLIP), the reading note's sec. III, eqs. (3)-(7); its noise combination"
    strength_start, strength_max = 1.0, 4.0

    def __init__(self, edit: FineTuned, attribute: str | None = None):
        self.edit, self.attribute = edit, attribute

    @classmethod
    def load_weights(cls, state: dict, meta: dict, **loaded) -> FineTuned:
        return FineTuned(state, int(meta["rank"]), int(meta["t0"]))

    @classmethod
    def from_replay(cls, replay, unet, scheduler, indices, trained: FineTuned, attribute=None) -> DiffusionCLIP:
        return cls(trained, attribute)

    @classmethod
    def strength_problem(cls, value: float) -> str | None:
        return None if value >= 0 else f"diffusionclip's gamma must be >= 0, got {value:g}"

    def action(self, strength):
        return MixFineTuned(self.edit, strength)


class NetDelta(Action):
    asyrp = True  # Asyrp: the edited eps in P_t only

    def __init__(self, net, stop_step: int, gamma):
        self.net, self.stop_step, self.gamma = net, stop_step, gamma

    def check(self, steps: int, guided: bool) -> None:
        if steps != self.net.steps:
            raise ValueError(f"asyrp-net: f was trained for {self.net.steps} sampling steps, the sampler runs {steps}")

    def delta(self, step: int):
        if step >= self.stop_step:
            return None
        net, gamma = self.net, self.gamma

        def shift(h):
            with torch.no_grad():
                net.to(h.device)
                return (_per_row(gamma, h.shape[0], h.device) * net(h, step)).to(h.dtype)

        return shift


@register
class AsyrpNet(EditMethod):
    name = "asyrp-net"
    trainer = "hspace clip-edits RUN (clip_edits.prompt_pairs: ATTR)"
    needs = ("weights",)
    strength = "gamma"
    unit = "multiples of the trained f's Delta h_t"
    acts_on = "h"
    reference = "Kwon et al. 2023 (Asyrp), sec. 3.3: Delta h_t = f_t(h_t) trained with the directional CLIP loss"
    strength_start, strength_max = 1.0, 8.0

    def __init__(self, net, stop_step: int, attribute: str | None = None):
        self.net, self.stop_step, self.attribute = net.eval(), stop_step, attribute

    @classmethod
    def load_weights(cls, state: dict, meta: dict, **loaded):
        from hspace.hcore.clip_editors import DeltaNet

        net = DeltaNet(int(meta["channels"]), int(meta["steps"]), int(meta["hidden"]))
        net.load_state_dict(state)
        return net.eval(), int(meta["stop_step"])

    @classmethod
    def from_replay(cls, replay, unet, scheduler, indices, trained, attribute=None) -> AsyrpNet:
        net, stop = trained
        return cls(net, stop, attribute)

    def action(self, strength):
        return NetDelta(self.net, self.stop_step, strength)


class MappedDelta(Action):
    def __init__(self, dh: torch.Tensor, gamma):
        self.dh, self.gamma = dh, gamma  # (B, T, C, H, W)

    def check(self, steps: int, guided: bool) -> None:
        if steps != self.dh.shape[1]:
            raise ValueError(f"deltaspace: the mapper gives {self.dh.shape[1]} steps of h, the sampler runs {steps}")

    def delta(self, step: int):
        dh = self.dh[:, step]
        g = torch.as_tensor(self.gamma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return g * dh


@register
class DeltaSpace(EditMethod):
    name = "deltaspace"
    trainer = "hspace clip-edits RUN (clip_edits.prompt_pairs: ATTR)"
    needs = ("weights",)
    strength = "gamma"
    unit = "multiples of the mapped Delta h (a unit CLIP-space delta in)"
    acts_on = "h"
    reference = "Lyu et al. 2023 (DeltaEdit / DeltaSpace), the reading note's sec. VIII, eq. (22)"
    strength_start, strength_max = 1.0, 16.0

    def __init__(self, mapper, text_delta: torch.Tensor, features: torch.Tensor, attribute: str | None = None):
        with torch.no_grad():
            delta = text_delta.float().reshape(1, -1).expand(len(features), -1)
            self.dh = mapper(features.float(), delta)
        self.attribute = attribute

    @classmethod
    def load_weights(cls, state: dict, meta: dict, guide=None, **loaded):
        from hspace.hcore.clip_editors import DeltaMapper

        if guide is None:
            raise ValueError("deltaspace needs the CLIP it was trained with (its text delta and image features)")
        shape = tuple(int(s) for s in meta["h_shape"].split(","))
        mapper = DeltaMapper(int(meta["dim"]), state["basis"], shape, int(meta["hidden"]))
        mapper.load_state_dict(state)
        return mapper.eval(), guide, guide.text_delta(meta["prompt_a"], meta["prompt_b"])

    @classmethod
    def from_replay(cls, replay, unet, scheduler, indices, trained, attribute=None) -> DeltaSpace:
        """For samples ``indices``: their CLIP image features from their unedited renders."""
        mapper, guide, text_delta = trained
        with torch.no_grad():
            features = guide.image(replay.render(unet, scheduler, list(indices)))
        return cls(mapper, text_delta, features, attribute)

    def action(self, strength):
        return MappedDelta(self.dh, strength)
