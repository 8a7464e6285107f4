"""The SVD of latent codes (Wang et al. 2025, "Exploring the latent space of diffusion models
directly through singular value decomposition", arXiv 2502.02225): x_t itself, decomposed at
every step.

Two ways to make matrices of a latent x_t (C, H, W): per channel (the paper's Fig. 1: "the SVD
is performed channel-wise"), C matrices of H x W; and flattened, one (C*H) x W matrix. The
paper's three properties are measured on these:

- small neighbourhood (sec. 4.3, Fig. 5): the subspaces spanned by the top-k singular vectors
  of one trajectory at two steps are close on the Grassmann manifold; the geodesic distance
  d(A, B) = sqrt(sum_i theta_i^2), theta_i the principal angles (arccos of the singular values
  of A^T B for orthonormal bases A, B);
- attributes in singular vectors and values (sec. 4.1-4.2): scaling sigma_i at step t changes
  attributes of the final image (``scale_singular_values``); a vector moved from another seed's
  latent does not carry its attribute along (``transplant``);
- mobility in order (sec. 4.2): which index moves an attribute changes over t.
"""

from __future__ import annotations

import math

import torch

from hspace.hcore.edits import Action


def matrices(x: torch.Tensor, variant: str = "channel") -> torch.Tensor:
    """The matrices of latents x (B, C, H, W): "channel" -> (B, C, H, W) (one H x W matrix per
    channel), "flat" -> (B, 1, C*H, W)."""
    if x.dim() != 4:
        raise ValueError(f"latents must be (B, C, H, W), got {tuple(x.shape)}")
    if variant == "channel":
        return x
    if variant == "flat":
        b, c, h, w = x.shape
        return x.reshape(b, 1, c * h, w)
    raise ValueError(f"variant must be 'channel' or 'flat', got {variant!r}")


def from_matrices(m: torch.Tensor, shape: tuple[int, ...], variant: str = "channel") -> torch.Tensor:
    """Back from ``matrices`` to latents of ``shape`` (B, C, H, W)."""
    return m.reshape(shape) if variant == "flat" else m


def top_svd(x: torch.Tensor, k: int, variant: str = "channel"):
    """(U (B, M, H', k), S (B, M, k), Vh (B, M, k, W)): the top-k singular triplets of every
    matrix of x (float64 inside, float32 out), in descending order. ValueError where k exceeds
    the matrices' rank bound."""
    m = matrices(x, variant).double()
    limit = min(m.shape[-2:])
    if not 0 < k <= limit:
        rows, cols = m.shape[-2:]
        raise ValueError(f"k = {k}: the {variant} matrices are {rows} x {cols}, so k must be in [1, {limit}]")
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[..., :k].float(), s[..., :k].float(), vh[..., :k, :].float()


def scale_singular_values(x: torch.Tensor, index: int, factor, variant: str = "channel") -> torch.Tensor:
    """x with singular value ``index`` (0: the largest) of every matrix multiplied by ``factor``
    (a number or (B,) per latent): x + (factor - 1) sigma_i u_i v_i^T (the paper's Fig. 2-4)."""
    m = matrices(x, variant).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if not 0 <= index < s.shape[-1]:
        raise ValueError(f"singular value index {index} out of range [0, {s.shape[-1]})")
    f = torch.as_tensor(factor, dtype=torch.float64, device=x.device).reshape(-1, *(1,) * (m.dim() - 1))
    rank_one = s[..., index, None, None] * u[..., :, index, None] * vh[..., index, None, :]
    out = m + (f - 1) * rank_one
    return from_matrices(out, tuple(x.shape), variant).to(x.dtype)


def transplant(x: torch.Tensor, donor: torch.Tensor, index: int, variant: str = "channel") -> torch.Tensor:
    """x with its ``index``-th singular vector pair replaced by the donor's (its own sigma_i
    kept): x + sigma_i (u'_i v'_i^T - u_i v_i^T) (the paper's claim: the attribute does not
    follow). The sign of the donor's pair is taken to agree with x's (an SVD's signs are
    arbitrary)."""
    m, d = matrices(x, variant).double(), matrices(donor, variant).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    du, _, dvh = torch.linalg.svd(d, full_matrices=False)
    ui, vi = u[..., :, index], vh[..., index, :]
    dui, dvi = du[..., :, index], dvh[..., index, :]
    sign = torch.sign((ui * dui).sum(-1, keepdim=True))
    sign[sign == 0] = 1
    dui, dvi = dui * sign, dvi * sign
    out = m + s[..., index, None, None] * (dui[..., :, None] * dvi[..., None, :] - ui[..., :, None] * vi[..., None, :])
    return from_matrices(out, tuple(x.shape), variant).to(x.dtype)


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The principal angles (..., k) between the column spans of orthonormal a, b (..., n, k)."""
    cos = torch.linalg.svdvals(a.double().transpose(-1, -2) @ b.double()).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def geodesic_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Grassmann geodesic distance sqrt(sum theta_i^2) between the spans of a and b (sec. 4.3)."""
    return principal_angles(a, b).pow(2).sum(-1).sqrt()


def random_frames(n: int, dim: int, k: int, seed: int = 0) -> torch.Tensor:
    """n random orthonormal k-frames in R^dim (Haar: QR of Gaussian matrices): the null of two
    unrelated subspaces."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, dim, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def max_distance(k: int) -> float:
    """The largest geodesic distance between two k-dimensional subspaces: every angle pi/2."""
    return math.sqrt(k) * math.pi / 2


class XtRecorder(Action):
    """An action that changes nothing and hands x_t (B, C, R, R), float32 as the sampler holds
    it, to ``on_x(step, x)`` before each step's U-Net pass (``sample.store_xt``)."""

    def __init__(self, on_x):
        self.on_x = on_x

    @classmethod
    def into(cls, array) -> XtRecorder:
        """The recorder writing x_t into ``array[:, step]`` (a (B, T, C, R, R) numpy array)."""
        return cls(lambda step, x: array.__setitem__((slice(None), step), x.detach().cpu().numpy()))

    def x_t(self, step: int, x: torch.Tensor) -> torch.Tensor:
        self.on_x(step, x)
        return x


def neighbourhood(u: torch.Tensor, pairs: int = 256, seed: int = 0) -> dict:
    """The small-neighbourhood property (sec. 4.3, Fig. 5) for top-k bases ``u`` (N, T, M, n, k)
    of N trajectories (M matrices each): ``steps`` (T, T), the mean geodesic distance between the
    spans at two steps of the same trajectory; ``other_seed`` (T,), at the same step of another
    trajectory (sample j against j + 1); ``random``, two Haar-random k-frames in R^n; ``max``,
    every angle pi/2."""
    n_traj, steps, m, dim, k = u.shape
    a = u.double()
    d = geodesic_distance(a[:, :, None], a[:, None, :])  # (N, T, T, M)
    other = geodesic_distance(a, a.roll(1, 0)).mean((0, 2)) if n_traj > 1 else torch.full((steps,), float("nan"))
    frames = random_frames(2 * pairs, dim, k, seed)
    rand = geodesic_distance(frames[:pairs], frames[pairs:]).mean()
    return {"steps": d.mean((0, 3)), "other_seed": other, "random": float(rand), "max": max_distance(k)}


def transfer_slope(change: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """How much of the gap to the donor a transplant closes, per factor: the least-squares slope
    of the recipient's change on the donor's difference, sum(change * gap) / sum(gap^2) over the
    pairs (P, A) -> (A,): 1, the attribute follows the vector; 0, it does not."""
    return (change * gap).sum(0) / gap.pow(2).sum(0).clamp_min(1e-12)


def spearman(values: torch.Tensor) -> float:
    """Spearman's rank correlation of ``values`` (T,) with their order 0..T-1 (no ties expected)."""
    t = len(values)
    if t < 2:
        return float("nan")
    ranks = values.double().argsort().argsort().double()
    order = torch.arange(t, dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([ranks, order]))[0, 1])
