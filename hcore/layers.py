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


def gram_scores(step, steps: int, k: int) -> np.ndarray:
    """(N, k') principal-axis scores of N samples' h_{T:1} flattened, k' = min(k, N - 1): the top
    eigenvectors of the centred Gram matrix X X^T times their singular values, X X^T summed over
    the steps (``step(t)``: the samples' h_t as (N, D)), so that no more than one step is held."""
    gram = None
    for t in range(steps):
        x = np.asarray(step(t), dtype=np.float64)
        x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(0, keepdims=True)
        gram = x @ x.T if gram is None else gram + x @ x.T
    values, vectors = np.linalg.eigh(gram)
    n = len(gram)
    order = np.argsort(values)[::-1][: max(1, min(k, n - 1))]
    return vectors[:, order] * np.sqrt(np.clip(values[order], 0.0, None))


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
        x = np.asarray(step(t), np.float64)
        n = len(x)
        centred = x.reshape(n, -1) - x.reshape(n, -1).mean(0)
        values, vectors = np.linalg.eigh(centred @ centred.T)
        order = np.argsort(values)[::-1][: min(k, n - 1)]
        sv = np.sqrt(np.clip(values[order], 1e-24, None))
        axes.append((centred.T @ vectors[:, order] / sv).T.astype(np.float32))  # unit principal axes in h
        std.append((sv / np.sqrt(max(n - 1, 1))).astype(np.float32))
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
