"""What the DDIM sampler (hcore.sampler) and the flow-matching one (hcore.flow) share: one standard
normal draw per sample generator, the paper's eta_t of eq. (5) per step, and the checks of the
arguments both take (conditioning, capture, edit, start step)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

CAPTURE = ("cond", "uncond", "both")


def check_arguments(unet, conditioning, capture: str, edit, steps: int, start_at: int) -> tuple[bool, int]:
    """(guided, the first step to run) of a sampling call, or ValueError naming the argument that
    does not fit: the conditioning against the denoiser, ``capture`` (a half needs guidance), the
    edit against the steps, ``start_at`` (moved to the edit's first step where that is later)."""
    guided = conditioning is not None and conditioning.guided
    if conditioning is not None:
        conditioning.check(unet)
    if capture not in CAPTURE:
        raise ValueError(f"capture must be one of {CAPTURE}, got {capture!r}")
    if capture != "cond" and not guided:
        raise ValueError(f"capture={capture!r} needs classifier-free guidance (a conditioning with an uncond branch)")
    if edit is not None:
        edit.check(steps, guided)
        start_at = max(start_at, edit.first_step)  # e.g. SDEdit's restart (hcore.edits.sdedit)
    if not 0 <= start_at < steps:
        raise ValueError(f"start_at must be a step in [0, {steps}), got {start_at}")
    return guided, start_at


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """One standard normal draw of ``shape`` per generator, stacked: (B, *shape), on CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def eta_schedule(eta: float | str | Sequence[float], steps: int) -> list[float]:
    """The paper's eta_t (eq. (5)) for each of ``steps`` steps (step 0 = first denoising step).

    ``eta`` is one number for every step, a list of one number per step, or a window rule
    ``"V@S0:S1"``: V at steps S0 <= s < S1 and 0 elsewhere (e.g. ``"1@0:10"``: stochastic
    for the first ten steps, deterministic after). Raises ValueError naming what is wrong."""
    if isinstance(eta, str):
        value, at, window = eta.partition("@")
        try:
            v = float(value)
            a, b = (int(x) for x in window.split(":")) if at else (0, steps)
        except ValueError:
            raise ValueError(f"eta {eta!r} is not a number, a list or a window rule V@S0:S1 (e.g. 1@0:10)") from None
        if not 0 <= a < b <= steps:
            raise ValueError(f"eta {eta!r}: the window must satisfy 0 <= S0 < S1 <= steps ({steps})")
        etas = [v if a <= s < b else 0.0 for s in range(steps)]
    elif np.isscalar(eta):
        etas = [float(eta)] * steps
    else:
        etas = [float(e) for e in eta]
        if len(etas) != steps:
            raise ValueError(f"eta has {len(etas)} values for {steps} steps: give one per step")
    bad = [e for e in etas if not (np.isfinite(e) and 0 <= e <= 1)]
    if bad:
        raise ValueError(f"eta must be in [0, 1] at every step, got {bad[0]}")
    return etas
