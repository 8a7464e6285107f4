"""Linear directions (Haas et al.): h_t + gamma v_t at the bottleneck (sec. 3, eq. (6)), the
edited eps in P_t and D_t; Asyrp's variant (Kwon et al.), the edited eps in P_t only; and a
direction of the initial noise, x_T + gamma v (eq. (10) with q = x_T, the Fig. 8 baseline)."""

from __future__ import annotations

import torch

from hspace.hcore.edits import Action, EditMethod, register
from hspace.hcore.sampler import Edit


@register
class HDirection(EditMethod):
    """v: (T, C, H, W), one h direction per sampling step; window: (first, stop) steps."""

    name = "h"
    needs = ("direction",)
    unit = "a length in h per step (PCA directions: that step's standard deviation of h)"
    acts_on = "h"
    reference = "Haas et al. sec. 3, eq. (6): h^edit = h + gamma v, the edited eps in P_t and D_t"
    asyrp = False

    def __init__(self, v: torch.Tensor, window: tuple[int, int] | None = None):
        self.v, self.window = v, window

    def action(self, strength):
        return Edit(directions=[self.v], gammas=[strength], window=self.window, asyrp=self.asyrp)


@register
class Asyrp(HDirection):
    name = "asyrp"
    reference = "Kwon et al. (Asyrp): the edited eps in P_t only, D_t from the unedited pass"
    asyrp = True


class XTShift(Action):
    """x_T + gamma v (B, C, R, R): the initial noise moved along v, per sample strength."""

    def __init__(self, v: torch.Tensor, gamma):
        self.v, self.gamma = v, gamma

    def start(self, x):
        gamma = torch.as_tensor(self.gamma, dtype=x.dtype).reshape(-1, 1, 1, 1).to(x.device)
        return x + gamma * self.v.to(x.device)


@register
class XTDirection(EditMethod):
    """v: (1, C, R, R), a direction of the initial noise x_T."""

    name = "xT"
    needs = ("direction",)
    unit = "a length in x_T (unit-variance noise)"
    acts_on = "x_T"
    reference = "Haas et al. sec. 5, eq. (10) with q = x_T (the Fig. 8 baseline)"

    def __init__(self, v: torch.Tensor, window: tuple[int, int] | None = None):
        self.v = v  # the initial noise has no steps: a window does not apply

    def action(self, strength):
        return XTShift(self.v, strength)
