"""HDAE's sparse directions (the reading note's sec. IX: most entries of an attribute's
hyperplane are near 0 and add entanglement, so only its top-k entries are kept and the others
set to 0), applied to h-space directions: at every step t the k entries of v_t largest in
magnitude are kept, the others zeroed, and the edit is then Haas et al.'s eq. (6) with the
sparse direction (the edited eps in P_t and D_t). The kept entries keep their values (no
rescaling, as HDAE), so a sparse direction is shorter than its source: compare methods at a
calibrated strength, not at the same gamma."""

from __future__ import annotations

import torch

from hspace.hcore.edits import register
from hspace.hcore.edits.directions import HDirection


def sparsify(v: torch.Tensor, k: int) -> torch.Tensor:
    """v (T, C, H, W) with, at every step, only its k entries of largest magnitude kept
    (ties: the lower index); k >= C*H*W returns v unchanged."""
    if k < 1:
        raise ValueError(f"hdae-sparse keeps k >= 1 entries per step, got k={k}")
    flat = v.reshape(len(v), -1)
    if k >= flat.shape[1]:
        return v
    keep = flat.abs().topk(k, dim=1, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, keep, True)
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(v.shape)


@register
class SparseH(HDirection):
    """v: (T, C, H, W); k: the entries kept per step (default 64); window: (first, stop) steps."""

    name = "hdae-sparse"
    unit = "a length in h per step, of the sparse direction (shorter than its source)"
    reference = "HDAE (reading note sec. IX): the top-k entries kept per step, the rest 0; then eq. (6)"
    k = 64

    def __init__(self, v: torch.Tensor, window: tuple[int, int] | None = None, k: int | None = None):
        self.k = int(k if k is not None else type(self).k)
        super().__init__(sparsify(v, self.k), window)
