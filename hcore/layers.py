"""The layer map's measures of h at one point of the denoiser, from the h_{T:1} of N samples
(not in any paper: Haas et al. take the bottleneck as the semantic space by assumption, sec. 3;
Kwon et al. (Asyrp) chose it by eye; this measures it against a known truth).

- ``gram_scores``: the samples' principal-axis scores of their flattened h_{T:1} (N x T*D, D up
  to 65,536 at a toy U-Net's last up block, millions at SD's) through the N x N Gram matrix,
  summed step by step: exact, cheap where N << T*D, and one step in memory at a time (the
  centred Gram's eigenvectors scaled by the singular values are the scores).
- ``probe``: a linear probe of each binary factor on those scores (k-fold cross-validated
  logistic regression), the readability of the factor at that point.
- ``step_pca``: per step, the top-k principal axes and standard deviations of h_t (Gram trick
  again), for PCA directions v_j[t] = std_tj c_tj (hcore.pca.directions_from_pca) against their
  norm-matched random baseline (hcore.pca.random_directions; the paper's Fig. 6).
- ``interpolate_gamma``: the strength at which a monotone edit reaches a target own change,
  read off a fixed grid of measured strengths (so that the stage's U-Net passes are counted
  before it runs; linear between the grid points that bracket the target).
"""

from __future__ import annotations

import numpy as np


def _top(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top min(k, N - 1) (at least 1) eigenvectors (N, k') of a Gram matrix and the singular
    values (k') they stand for, largest first."""
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][: max(1, min(k, len(gram) - 1))]
    return vectors[:, order], np.sqrt(np.clip(values[order], 0.0, None))


def _centred(h) -> np.ndarray:
    """The samples' h_t (N, ...) flattened to (N, D), float64, minus their mean."""
    x = np.asarray(h, np.float64)
    x = x.reshape(len(x), -1)
    return x - x.mean(0, keepdims=True)


def gram_scores(step, steps: int, k: int) -> np.ndarray:
    """(N, k') principal-axis scores of N samples' h_{T:1} flattened, k' = min(k, N - 1): the top
    eigenvectors of the centred Gram matrix X X^T times their singular values, X X^T summed over
    the steps (``step(t)``: the samples' h_t as (N, D)), so that no more than one step is held."""
    gram = sum(x @ x.T for x in (_centred(step(t)) for t in range(steps)))
    vectors, sv = _top(gram, k)
    return vectors * sv


def probe(scores: np.ndarray, labels: np.ndarray, folds: int = 5) -> float | None:
    """k-fold cross-validated accuracy of a logistic regression of binary ``labels`` (N,) on
    ``scores`` (N, k), standardised inside each fold; None where one class has fewer samples than
    2 folds need."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=bool)
    fewest = int(min(labels.sum(), (~labels).sum()))
    if fewest < 2:
        return None
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(pipe, scores, labels, cv=min(folds, fewest)).mean())


def step_pca(step, steps: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step t (``step(t)``: the samples' h_t as (N, D)): the top k principal axes (T, k, D)
    and the standard deviation of h_t along each (T, k), by the Gram matrix of the centred h_t."""
    axes, std = [], []
    for t in range(steps):
        centred = _centred(step(t))
        vectors, sv = _top(centred @ centred.T, k)
        sv = np.maximum(sv, 1e-12)
        axes.append((centred.T @ vectors / sv).T.astype(np.float32))  # unit principal axes in h
        std.append((sv / np.sqrt(max(len(centred) - 1, 1))).astype(np.float32))
    return np.stack(axes), np.stack(std)


def interpolate_gamma(gammas, effects, target: float) -> float | None:
    """The strength at which the measured ``effects`` (at increasing ``gammas``) reach
    ``target``: linear between the first pair that brackets it; None where none reaches it."""
    g = [0.0, *map(float, gammas)]
    e = [0.0, *map(float, effects)]
    for i in range(1, len(g)):
        if (e[i] - target) * (e[i - 1] - target) <= 0 and e[i] != e[i - 1]:
            return g[i - 1] + (target - e[i - 1]) * (g[i] - g[i - 1]) / (e[i] - e[i - 1])
    return None
