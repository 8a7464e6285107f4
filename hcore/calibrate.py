"""Edit-strength calibration (``hspace evaluate --gamma auto``).

The paper hand-picks the edit strength gamma of eq. (6)-style edits h + gamma * v for
every direction (sec. 5, Table 1). Here gamma is found per direction: the gamma at which
the target attribute's mean change, effect(gamma), reaches a requested value.

effect is assumed increasing on [0, gamma_max] with effect(0) = 0 (a direction built by
eq. (10) raises its attribute), possibly flat or noisy near 0; the root is bracketed by
doubling from gamma0 and then found by bisection (a false-position step is taken instead
where it falls well inside the bracket; it converges faster on smooth effects). Every call
of effect is an edit-and-score pass, so the number of calls is what costs; it is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class CalibrationError(ValueError):
    """The target cannot be reached (wrong sign, or not even at gamma_max). ``gamma`` is the
    strength of the largest effect seen (None where no gamma raised the attribute)."""

    def __init__(self, message: str, gamma: float | None = None):
        super().__init__(message)
        self.gamma = gamma


@dataclass(frozen=True)
class Calibration:
    gamma: float
    effect: float  # effect(gamma) actually reached
    target: float
    evaluations: int
    converged: bool  # |effect - target| <= rtol * |target|


def calibrate_gamma(
    effect: Callable[[float], float],
    target: float,
    gamma0: float = 1.0,
    gamma_max: float = 64.0,
    rtol: float = 0.05,
    max_evaluations: int = 16,
) -> Calibration:
    """gamma > 0 with effect(gamma) ~= target, within rtol (bracketing, then bisection)."""
    if not target > 0:
        raise CalibrationError(f"the target change must be positive, got {target}")
    if not 0 < gamma0 <= gamma_max:
        raise CalibrationError(f"need 0 < gamma0 <= gamma_max, got {gamma0} and {gamma_max}")
    calls = 0

    def f(g: float) -> float:
        nonlocal calls
        calls += 1
        return float(effect(g))

    lo, f_lo = 0.0, 0.0
    hi, f_hi = gamma0, f(gamma0)
    peak = (hi, f_hi)  # the largest effect seen while bracketing
    while f_hi < target:  # small or noisy effects at small gamma: keep doubling
        if hi >= gamma_max or calls >= max_evaluations:
            if peak[1] <= 0:
                raise CalibrationError(
                    f"the direction moves the attribute by {f_hi:+.4g} at gamma {hi:.4g}: it does not raise it "
                    "(a direction of the opposite sign?)"
                )
            raise CalibrationError(
                f"the attribute moves by at most {peak[1]:.4g} (at gamma {peak[0]:.4g}; {f_hi:+.4g} at gamma "
                f"{hi:.4g}); the target {target} is out of reach: ask for less (--target)",
                gamma=peak[0],
            )
        if f_hi > 0:
            lo, f_lo = hi, f_hi
        hi = min(2 * hi, gamma_max)
        f_hi = f(hi)
        if f_hi > peak[1]:
            peak = (hi, f_hi)
    best = (hi, f_hi)
    while abs(best[1] - target) > rtol * target and calls < max_evaluations:
        # secant step inside the bracket where it falls well inside, else bisection
        mid = lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo) if f_hi > f_lo else (lo + hi) / 2
        if not (lo + 0.1 * (hi - lo) < mid < hi - 0.1 * (hi - lo)):
            mid = (lo + hi) / 2
        f_mid = f(mid)
        if abs(f_mid - target) < abs(best[1] - target):
            best = (mid, f_mid)
        if f_mid < target:
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    return Calibration(best[0], best[1], target, calls, abs(best[1] - target) <= rtol * target)
