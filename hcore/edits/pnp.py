"""Plug-and-Play (Tumanyan et al. 2023, "Plug-and-play diffusion features for text-driven
image-to-image translation", sec. 4; the reading note's sec. VII): the source image is
generated again (a run's sample replayed, or a photo from its inverted x_T) in the same batch
as its translation under the target prompt; for the first tau_f of the steps the translation's
decoder features (the output of ``up_blocks.1.resnets.1``, the authors' layer 4) are the
source's, and for the first tau_a its decoder self-attention maps are (the source's queries
and keys: the same attention probabilities, applied to the translation's own values).

The strength is tau_f, the share of the steps with injected features; tau_a = ``attention_share``
x tau_f (the authors' defaults 0.8 and 0.5 give 5/8). 0 gives the plain target-prompt
generation. Departures from the authors' code (also in the README's fidelity table): the source
runs with its own prompt and guidance and each half of the guided batch takes the source's same
half (the authors run the source unconditioned, once, into both halves); the self-attention of
every up block is injected (theirs skips the first attention layer of the decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hspace.hcore.edits import register
from hspace.hcore.edits.attention import InjectionMethod, Paired


class FeatureInjection(Paired):
    def __init__(self, method: PlugAndPlay, taus):
        super().__init__(taus)
        self.method = method

    def paired(self, prompts: Sequence[str]) -> list[str]:
        return [self.method.target] * len(prompts)

    def window(self, name: str, cross: bool) -> torch.Tensor | None:
        if cross or not any(name.startswith(p) for p in self.method.attention) or ".attn1." not in name:
            return None
        return self.taus * self.method.attention_share

    def feature_layers(self) -> list[str]:
        return list(self.method.features)

    def feature_window(self) -> torch.Tensor:
        return self.taus


@register
class PlugAndPlay(InjectionMethod):
    """target: the prompt of the translation; features: U-Net modules whose outputs are
    injected; attention: name prefixes of the attention layers whose self-attention is."""

    name = "pnp"
    unit = "the share of the steps with the source's decoder features (self-attention: attention_share of it)"
    reference = "Tumanyan et al. 2023 (Plug-and-Play), sec. 4: decoder features for tau_f, self-attention for tau_a"

    def __init__(
        self,
        target: str,
        features: Sequence[str] = ("up_blocks.1.resnets.1",),
        attention: Sequence[str] = ("up_blocks.",),
        attention_share: float = 0.625,
    ):
        if not 0 <= attention_share <= 1:
            raise ValueError(f"pnp attention_share must be in [0, 1], got {attention_share}")
        self.target, self.features, self.attention = target, tuple(features), tuple(attention)
        self.attention_share = float(attention_share)

    def action(self, strength):
        return FeatureInjection(self, strength)
