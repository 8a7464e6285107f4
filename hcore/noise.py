"""The sampler's randomness and its eta schedule, shared by the DDIM sampler (hcore.sampler) and
the flow-matching one (hcore.flow): one standard normal draw per sample generator, and the paper's
eta_t of eq. (5) per step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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
