"""Supervised directions (paper sec. 5).

- eq. (10): v = mean(q+) - mean(q-), where q+ / q- are the latents (h_{T:1} or x_T) of the
  top-k / bottom-k samples ranked by an annotator's score. Streamed: the caller feeds
  batches of latents, nothing holds all n.
- eq. (11): disentanglement by projection, v = [I - V (V^T V)^-1 V^T] v0, over all
  timesteps jointly, computed with a least-squares solve, never an explicit inverse.
  Optionally rescaled to |v0| (``keep_norm``), the convention of the conditional
  manipulation the paper adopts (Shen et al. [33, 34], whose directions are unit normals):
  gamma then means the same step length for a direction and its disentangled version.
"""

from __future__ import annotations

import numpy as np


def top_bottom(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest and k lowest scores (sorted), the q+ and q- of eq. (10).

    The two sets must be separated by a strict score gap: with tied scores (0/1 labels of
    real images, say) a cut through a tie would put samples of the same label on both
    sides, so that is refused, naming the largest k that keeps them apart. Ties inside
    one set are broken by index."""
    scores = np.asarray(scores, dtype=np.float64)
    if not (1 <= k <= len(scores) // 2):
        raise ValueError(f"top k={k} must be between 1 and n/2 = {len(scores) // 2}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN/Inf; annotate the run completely first")
    order = np.argsort(scores, kind="stable")
    ascending = scores[order]
    if ascending[-k] <= ascending[k - 1]:
        tie = ascending[-k]
        descending = ascending[::-1]
        separable = np.flatnonzero(descending[: len(scores) // 2] > ascending[: len(scores) // 2])
        k_max = int(separable[-1]) + 1 if len(separable) else 0
        above, below = int((scores > tie).sum()), int((scores < tie).sum())
        raise ValueError(
            f"k={k} would put tied scores on both sides: the k-th highest score ({tie:.4g}) is not above the "
            f"k-th lowest ({ascending[k - 1]:.4g}); {above} samples score above {tie:.4g}, {below} below and "
            f"{len(scores) - above - below} equal to it"
            + (f"; use k <= {k_max}" if k_max else "; the scores do not separate any pair")
        )
    return np.sort(order[-k:]), np.sort(order[:k])


class MeanDifference:
    """Accumulates sum(q+) and sum(q-) batch by batch; ``direction()`` is eq. (10)."""

    def __init__(self):
        self.sums = {True: None, False: None}
        self.counts = {True: 0, False: 0}

    def add(self, q: np.ndarray, positive: bool) -> None:
        """q: (B, ...) latents of positive or negative samples."""
        s = np.asarray(q, np.float64).sum(0)
        self.sums[positive] = s if self.sums[positive] is None else self.sums[positive] + s
        self.counts[positive] += q.shape[0]

    def direction(self) -> np.ndarray:
        if not self.counts[True] or not self.counts[False]:
            raise ValueError("eq. (10) needs at least one positive and one negative sample")
        return (self.sums[True] / self.counts[True] - self.sums[False] / self.counts[False]).astype(np.float32)


def disentangle(v0: np.ndarray, conditions: list[np.ndarray], keep_norm: bool = False) -> np.ndarray:
    """eq. (11): remove from v0 its projection on span(conditions), all timesteps jointly.

    v0 and each condition have the same shape (e.g. (T, C, H, W)); they are flattened to
    vectors. Uses lstsq (a QR/SVD solve of V^T V c = V^T v0), so nearly collinear
    conditions do not blow up as an explicit inverse would. ``keep_norm``: rescale the
    result to |v0| (same step length per unit gamma as the original direction)."""
    if not conditions:
        return np.asarray(v0, np.float32).copy()
    shape = np.shape(v0)
    flat0 = np.asarray(v0, np.float64).ravel()
    big_v = np.stack([np.asarray(c, np.float64).ravel() for c in conditions], 1)  # (D, m)
    coef, *_ = np.linalg.lstsq(big_v, flat0, rcond=None)
    v = flat0 - big_v @ coef
    if keep_norm:
        norm = np.linalg.norm(v)
        if norm <= 1e-6 * np.linalg.norm(flat0):
            raise ValueError("the direction lies in the span of the conditions: nothing is left after eq. (11)")
        v *= np.linalg.norm(flat0) / norm
    return v.reshape(shape).astype(np.float32)
