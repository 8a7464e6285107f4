"""Singular-value editing of the latent code (Wang et al. 2025, arXiv 2502.02225, sec. 4.1-4.2,
Fig. 2-4): at one step k, the ``index``-th singular value of every channel of x_t (or of the
flattened (C*H) x W matrix, ``variant="flat"``) is scaled, x_t + s sigma_i u_i v_i^T, and the
sampler continues. The strength s is the relative change of sigma_i (0: no edit, -1: the
component removed, 1: doubled); the step and the index are settings
(``hspace edit --edit-method "sv-scale:index=1:step=2"``)."""

from __future__ import annotations

import torch

from hspace.hcore.edits import Action, EditMethod, register
from hspace.hcore.latent_svd import scale_singular_values


class ScaleAt(Action):
    def __init__(self, method: SingularValueScale, strength):
        self.method, self.strength = method, strength

    def check(self, steps: int, guided: bool) -> None:
        if not 0 <= self.method.step < steps:
            raise ValueError(f"sv-scale: step {self.method.step} is not a step of {steps} (0 = the first)")
        s = torch.as_tensor(self.strength, dtype=torch.float64).reshape(-1)
        if bool((s < -1).any()):
            raise ValueError(f"sv-scale's strength s must be >= -1 (sigma_i (1 + s) >= 0), got {s.min().item():g}")

    def x_t(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if step != self.method.step:
            return x
        factor = 1 + torch.as_tensor(self.strength, dtype=torch.float64).reshape(-1)
        if factor.numel() not in (1, len(x)):
            raise ValueError(f"sv-scale: {factor.numel()} strengths for a batch of {len(x)}")
        return scale_singular_values(x, self.method.index, factor.to(x.device), self.method.variant)


@register
class SingularValueScale(EditMethod):
    name = "sv-scale"
    needs = ()
    strength = "s"
    unit = "relative change of sigma_i at the step (0: none, -1: removed, 1: doubled)"
    acts_on = "x_t"
    reference = "Wang et al. 2025 (SVD of latent codes), sec. 4.1-4.2: x_t + s sigma_i u_i v_i^T at one step"
    strength_start, strength_max = 0.5, 8.0

    def __init__(self, index: int = 0, step: int = 0, variant: str = "channel", attribute: str | None = None):
        if variant not in ("channel", "flat"):
            raise ValueError(f"sv-scale: variant must be 'channel' or 'flat', got {variant!r}")
        if index < 0 or step < 0:
            raise ValueError(f"sv-scale: index and step are >= 0, got index {index}, step {step}")
        self.index, self.step, self.variant, self.attribute = int(index), int(step), variant, attribute

    @classmethod
    def strength_problem(cls, value: float) -> str | None:
        return None if value >= -1 else f"sv-scale's strength s must be >= -1 (sigma_i (1 + s) >= 0), got {value:g}"

    def action(self, strength):
        return ScaleAt(self, strength)
