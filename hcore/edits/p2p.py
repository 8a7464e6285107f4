"""Prompt-to-Prompt (Hertz et al. 2022, "Prompt-to-prompt image editing with cross attention
control", sec. 3.2; the reading note's sec. II): the source prompt's generation and the target
prompt's run in one batch from the same x_T; for the first tau of the steps the target's
cross-attention maps are the source's, so the layout stays and the words change.

- word swap (``mode="replace"``): the prompts have as many tokens; every map is the source's
  (M_t* = M_t);
- refinement (``"refine"``): words added or removed; each target token that the source also has
  takes the source's map (aligned in order, difflib's matching blocks), new words keep their own;
- reweighting (``reweight={"word": c}``): that word's injected map times c (the paper's
  equalizer), on top of either.

The self-attention maps of the target are the source's for the first ``self_share * tau`` of the
steps, in layers of at most ``self_max_tokens`` query positions (the authors' code: 16 x 16).
As in the authors' code, only the conditional half of a guided batch is injected. The strength
is tau, the share of the steps injected: 0 gives the plain target-prompt generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hspace.hcore.edits import register
from hspace.hcore.edits.attention import InjectionMethod, Paired, token_map, word_positions

MODES = ("auto", "replace", "refine")


class CrossAttentionControl(Paired):
    cond_only = True

    def __init__(self, method: PromptToPrompt, taus):
        super().__init__(taus)
        self.method = method
        self.maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def paired(self, prompts: Sequence[str]) -> list[str]:
        m = self.method
        if m.source is not None and any(p != m.source for p in prompts):
            raise ValueError(f"p2p was made for the source {m.source!r}; the samples have {sorted(set(prompts))}")
        if prompts:
            self.maps = m.maps(list(prompts))
        return [m.target] * len(prompts)

    def check(self, steps: int, guided: bool) -> None:
        super().check(steps, guided)
        if self.maps is None:  # a plain pipeline called with prompt=[source, target]
            if self.method.source is None:
                raise ValueError("p2p in a plain pipeline needs its source prompt: make it with source=...")
            self.maps = self.method.maps([self.method.source])

    def window(self, name: str, cross: bool) -> torch.Tensor:
        return self.taus if cross else self.taus * self.method.self_share

    def probs(self, name, cross, src, edit):
        if not cross:
            return src if src.shape[-2] <= self.method.self_max_tokens else edit
        index, alpha, scale = (t.to(src.device, src.dtype if t.is_floating_point() else t.dtype) for t in self.maps)
        k = src.shape[-1]
        if index.shape[-1] != k:
            raise ValueError(f"p2p's token maps have {index.shape[-1]} positions, the cross-attention {k}")
        n, heads, q = src.shape[0], src.shape[1], src.shape[2]
        index = index.reshape(-1, 1, 1, k).expand(n, heads, q, k)
        mapped = src.gather(-1, index)
        alpha = alpha.reshape(-1, 1, 1, k)
        return (mapped * alpha + edit * (1 - alpha)) * scale.reshape(-1, 1, 1, k)


@register
class PromptToPrompt(InjectionMethod):
    """tokenizer: the model's (the first, for SDXL); target: the edited prompt; source: the
    source prompt (None: each sample's own, in ``hspace edit`` and the comparison; needed in a
    plain pipeline, which is called with ``prompt=[source, target]``)."""

    name = "p2p"
    unit = "the share of the steps with the source's cross-attention maps (self-attention: self_share of it)"
    reference = "Hertz et al. 2022 (Prompt-to-Prompt), sec. 3.2: word swap, refinement, reweighting"

    def __init__(
        self,
        tokenizer,
        target: str,
        source: str | None = None,
        mode: str = "auto",
        reweight: dict[str, float] | None = None,
        self_share: float = 0.5,
        self_max_tokens: int = 256,
    ):
        if mode not in MODES:
            raise ValueError(f"p2p mode must be one of {MODES}, got {mode!r}")
        if not 0 <= self_share <= 1:
            raise ValueError(f"p2p self_share must be in [0, 1], got {self_share}")
        self.tokenizer, self.target, self.source, self.mode = tokenizer, target, source, mode
        self.reweight = dict(reweight or {})
        self.self_share, self.self_max_tokens = float(self_share), int(self_max_tokens)
        for word in self.reweight:
            word_positions(tokenizer, target, word)  # refused now if the word is not in the target
        if source is not None:
            self.maps([source])  # a word swap of prompts of unequal lengths: refused before any work

    @classmethod
    def from_prompt(cls, target: str, tokenizer) -> PromptToPrompt:
        return cls(tokenizer, target)

    def maps(self, sources: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per source: the target positions' source positions, whether each has one, and the
        reweighting scale: (n, L) each, L the tokenizer's length."""
        index, alpha, scale = [], [], []
        for source in sources:
            count = (len(self.tokenizer(source).input_ids), len(self.tokenizer(self.target).input_ids))
            if self.mode == "replace" and count[0] != count[1]:
                raise ValueError(
                    f"p2p word swap needs prompts of as many tokens: {source!r} has {count[0]}, {self.target!r} "
                    f"{count[1]}; use mode='refine' for added or removed words"
                )
            if self.mode == "replace" or (self.mode == "auto" and count[0] == count[1]):
                i = torch.arange(self.tokenizer.model_max_length)
                a = torch.ones(len(i))
            else:
                i, a = token_map(self.tokenizer, source, self.target)
            s = torch.ones(len(i))
            for word, c in self.reweight.items():
                s[word_positions(self.tokenizer, self.target, word)] = float(c)
            index.append(i)
            alpha.append(a)
            scale.append(s)
        return torch.stack(index), torch.stack(alpha), torch.stack(scale)

    def action(self, strength):
        return CrossAttentionControl(self, strength)
