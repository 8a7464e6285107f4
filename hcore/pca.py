"""Global semantic directions by PCA of h_t, per timestep (paper sec. 4.1, Fig. 5-6).

For every timestep t the n vectorised activations h_t (n, D) are decomposed; direction j
is the concatenation over t of the j-th principal component, sign-aligned across t (chained
step to step, ``align_signs``) and
scaled by that component's standard deviation, so that gamma is in units of sigma.

Two streaming engines, both fed by a callable that yields row batches (B, D) of one
timestep, so memory never grows with n:

- ``fit_ipca``: scikit-learn's IncrementalPCA (the early version of the paper and the
  design card name it). Each partial_fit is a full SVD of a (K + B) x D matrix.
- ``fit_randomized``: randomized block Krylov iteration on the covariance (Halko,
  Martinsson & Tropp 2011; Musco & Musco 2015) with a Rayleigh-Ritz step: the first pass
  accumulates the mean and total variance together with C Q_0 (no separate mean pass),
  each further pass one Z = C Q block, all with O(D (K + p)) memory per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

BatchSource = Callable[[], Iterable[np.ndarray]]  # each call re-reads the data from the start


@dataclass
class TimestepPCA:
    """PCA of one timestep: mean (D,), components (K, D) unit rows, explained_variance (K,)
    (unbiased, divided by n - 1, as scikit-learn), total_variance (scalar), n samples."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    total_variance: float
    n: int
    passes: int = 1  # passes over the data (randomized engine)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / self.total_variance


def fit_ipca(batches: BatchSource, n_components: int, batch_size: int) -> TimestepPCA:
    """sklearn IncrementalPCA over the stream; batches are cast to float32 (it would
    upcast fp16 to float64) and re-cut to ``batch_size`` rows. A tail shorter than K rows
    (partial_fit refuses it) is merged into the block before it, so at most two blocks
    are held at once."""
    from sklearn.decomposition import IncrementalPCA

    if batch_size < n_components:
        raise ValueError(f"batch_size {batch_size} must be >= n_components {n_components}")
    ipca = IncrementalPCA(n_components=n_components, batch_size=batch_size)
    held, pending, buffered = None, [], 0
    for x in batches():
        pending.append(np.asarray(x, np.float32))
        buffered += x.shape[0]
        while buffered >= batch_size:
            rows = np.concatenate(pending)
            block, rest = rows[:batch_size], rows[batch_size:]
            if held is not None:
                ipca.partial_fit(held)
            held, pending, buffered = block, [rest], rest.shape[0]
    tail = np.concatenate(pending) if buffered else None
    if tail is not None and held is not None and tail.shape[0] < n_components:
        held, tail = np.concatenate([held, tail]), None
    for block in (held, tail):
        if block is not None:
            ipca.partial_fit(block)
    n = int(ipca.n_samples_seen_)
    total_var = float(ipca.var_.sum() * n / (n - 1))
    return TimestepPCA(
        ipca.mean_.astype(np.float32),
        ipca.components_.astype(np.float32),
        ipca.explained_variance_.astype(np.float32),
        total_var,
        n,
    )


def fit_randomized(
    batches: BatchSource,
    n_components: int,
    n_iter: int | None = None,
    oversample: int = 10,
    seed: int = 0,
    tol: float = 1e-4,
    max_iter: int = 30,
) -> TimestepPCA:
    """Randomized block Krylov iteration on C = X_c^T X_c / (n - 1), streamed (Halko et
    al. 2011; Musco & Musco 2015): the paper's sec. 4.1 PCA, out of core.

    Pass i applies C to the newest block Q_i of r = K + oversample orthonormal vectors,
    Z_i = C Q_i, accumulated batch by batch as sum_b S_b^T (S_b Q_i) - n mu (mu^T Q_i) over
    the rows shifted by the first batch's mean, S_b = X_b - shift (products in float32,
    sums in float64); the first pass also accumulates the mean and total variance, so
    there is no separate pass for them. The Krylov basis [Q_0 .. Q_i] and the products
    [Z_0 .. Z_i] give the Rayleigh quotient B = Q^T C Q without another pass, and its top
    eigenpairs (Ritz pairs) estimate the PCA; the next block is Z_i orthogonalised
    against the basis. Stops when the top-K Ritz values change by less than ``tol``
    (relative; a Ritz value's error is the square of its vector's), when the basis holds
    the whole range of C (it lies in span(Q_0) + range(C), of dimension <= r + n - 1: then
    the Ritz pairs are exact, so small n is solved exactly), after ``max_iter`` passes,
    or after exactly ``n_iter`` when given.
    Memory: the basis, d x r per pass, never anything of size n. Converging in about the
    square root of the passes plain subspace iteration needs, it matches the exact top-K
    subspace to 0.03 deg in 6 passes at tol 1e-4 where eigengaps are moderate (bench_pca.py).
    """
    rng = np.random.default_rng(seed)
    shift = s1 = q = q32 = z = None
    s2, n = 0.0, 0
    for x in batches():  # pass 1: mean, total variance and C Q_0 together (shifted sums)
        x = np.asarray(x, np.float32)
        if shift is None:
            shift = x.mean(0)
            d = shift.shape[0]
            s1 = np.zeros(d)
            q = np.linalg.qr(rng.standard_normal((d, n_components + oversample)))[0]
            q32 = q.astype(np.float32)
            z = np.zeros((d, q.shape[1]))
        xc = x - shift
        s1 += xc.sum(0, dtype=np.float64)
        s2 += float(np.einsum("ij,ij->", xc, xc, dtype=np.float64))
        z += xc.T @ (xc @ q32)
        n += x.shape[0]
    if n < 2:
        raise ValueError(f"PCA needs at least 2 samples, got {n}")
    mu = s1 / n  # mean of the shifted data
    total_var = (s2 - n * float(mu @ mu)) / (n - 1)
    # The Krylov space lies in span(Q_0) + range(C), and rank(C) <= n - 1: once the basis
    # has that many columns it holds range(C) and the Ritz pairs are exact, not before.
    full = min(d, q.shape[1] + n - 1)
    passes = max(1, n_iter) if n_iter is not None else max(2, max_iter)
    basis, products, previous = np.zeros((d, 0)), np.zeros((d, 0)), None
    for it in range(passes):
        if it > 0:
            z = np.zeros((d, q.shape[1]))
            q32 = q.astype(np.float32)
            for x in batches():
                xc = np.asarray(x, np.float32) - shift
                z += xc.T @ (xc @ q32)
        z = (z - n * np.outer(mu, mu @ q)) / (n - 1)  # C q, centred without forming X - mu
        basis, products = np.hstack([basis, q]), np.hstack([products, z])
        ritz = basis.T @ products  # Rayleigh quotient B = Q^T C Q over the whole Krylov basis
        evals, evecs = np.linalg.eigh((ritz + ritz.T) / 2)
        top = evals[::-1][:n_components]
        converged = previous is not None and np.max(np.abs(top - previous) / np.maximum(np.abs(top), 1e-30)) < tol
        exhausted = basis.shape[1] >= full  # the basis holds range(C): exact
        if (n_iter is None and (converged or exhausted)) or it == passes - 1:
            break
        previous = top
        w = z - basis @ (basis.T @ z)
        w -= basis @ (basis.T @ w)  # twice: Gram-Schmidt loses orthogonality once
        q, r = np.linalg.qr(w)
        keep = np.abs(np.diag(r)) > 1e-10 * max(np.abs(r).max(), 1e-300)
        q = q[:, keep][:, : full - basis.shape[1]]
        if q.shape[1] == 0:
            break  # C maps the basis into itself: an invariant subspace, the Ritz pairs are exact
    order = np.argsort(evals)[::-1][:n_components]
    components = (basis @ evecs[:, order]).T
    mean = (shift.astype(np.float64) + mu).astype(np.float32)
    return TimestepPCA(mean, components.astype(np.float32), evals[order].astype(np.float32), total_var, n, it + 1)


WEAK_ALIGNMENT = 0.5  # |cos| between a component and its neighbour below this: the sign is a guess


def align_signs(components: np.ndarray, reference: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sign per direction over t, chained step to step (sec. 4.1: v_j concatenates the
    j-th component of every timestep, and a component's sign is arbitrary).

    The paper does not say how the signs are chosen. Matching every step to one reference
    step by the sign of <c_{t,j}, c_{ref,j}> is a coin toss wherever the components of far
    steps are nearly orthogonal (they reorder or rotate over t). Here the reference keeps
    its sign and each step takes the sign that agrees with its already aligned neighbour
    towards the reference: neighbouring steps see almost the same h, so their components
    are close. The strength |<c_{t,j}, c_{t+-1,j}>| (the cosine; rows are unit vectors)
    says how sure each choice was: 1 at the reference, near 0 where component j of step t
    is not the neighbour's component j (a reordering), see ``weak_alignments``.

    components: (T, K, D). Returns (aligned (T, K, D), flips (T, K) bool, strength (T, K))."""
    steps, k, _ = components.shape
    aligned = components.copy()
    flips = np.zeros((steps, k), bool)
    strength = np.ones((steps, k), np.float32)
    order = [(t, t + 1) for t in range(reference - 1, -1, -1)] + [(t, t - 1) for t in range(reference + 1, steps)]
    for t, neighbour in order:
        dots = np.einsum("kd,kd->k", components[t], aligned[neighbour])
        norms = np.linalg.norm(components[t], axis=1) * np.linalg.norm(aligned[neighbour], axis=1)
        flips[t] = dots < 0
        strength[t] = np.abs(dots) / np.maximum(norms, 1e-30)
        aligned[t] = np.where(flips[t][:, None], -components[t], components[t])
    return aligned, flips, strength


def weak_alignments(strength: np.ndarray, threshold: float = WEAK_ALIGNMENT) -> dict[int, list[int]]:
    """{component j: [steps t whose sign choice had |cos| < threshold]} from ``align_signs``."""
    weak = strength < threshold
    return {j: np.flatnonzero(weak[:, j]).tolist() for j in range(strength.shape[1]) if weak[:, j].any()}


def directions_from_pca(components: np.ndarray, std: np.ndarray) -> np.ndarray:
    """v_j[t] = std_{t,j} c_{t,j}: (T, K, D) x (T, K) -> (K, T, D), gamma in sigma units."""
    return np.transpose(components * std[..., None], (1, 0, 2))


def random_directions(std: np.ndarray, d: int, seed: int = 0) -> np.ndarray:
    """Norm-matched random baseline (Fig. 6): for each j and t a uniformly random unit
    vector scaled to ||v_j[t]|| = std_{t,j}, the norm of the PC direction. (K, T, D)."""
    rng = np.random.default_rng(seed)
    t, k = std.shape
    g = rng.standard_normal((k, t, d))
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    return (g * std.T[..., None]).astype(np.float32)


def principal_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees) between the row spaces of a (K, D) and b (K, D)."""
    qa, _ = np.linalg.qr(a.T.astype(np.float64))
    qb, _ = np.linalg.qr(b.T.astype(np.float64))
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return np.degrees(np.arccos(np.clip(s, -1.0, 1.0)))
