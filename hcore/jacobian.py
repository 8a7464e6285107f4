"""Image-specific directions: top right singular vectors of J_t = d eps(x_t, h_t) / d h_t
(paper sec. 4.2, eq. (6)-(9), Alg. 1; sequential variant SM Alg. 2; region of interest
from the early version: f(h) = mask * eps(x_t, h)).

f is evaluated through the sampler's own hook (HSpaceHook in replace mode): the U-Net runs
its own forward, skips come from x_t, only h varies. J V is forward-mode AD (eq. (8), all
vectors as one batch of dual tensors), J^T U reverse mode (eq. (9)).

Real models: attention runs on PyTorch's math SDPA backend inside f (the fused flash and
memory-efficient kernels have no forward-mode AD), and the U-Net runs in its own dtype
(float16/bfloat16 as the run samples) while h, the vectors and every QR/SVD/solve stay in
float32: f casts h in and eps out.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from hspace.hcore.hooks import HSpaceHook

log = logging.getLogger(__name__)

BatchedF = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) h -> (B, ...) output


def _unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision U-Nets (QR/SVD/solves have no half kernels and too few
    bits), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def precision_tol(tol: float, dtype: torch.dtype) -> float:
    """The tolerance Alg. 1/2 can reach when the U-Net runs in ``dtype``: a half-precision
    J v carries relative errors near the dtype's machine epsilon, so singular values never
    settle closer than that (measured on a six-level UNet with attention: in bfloat16 the
    iteration never reached 1e-4 in 60 iterations; at eps = 2^-7 it stopped after 9, its
    vectors within cos 0.993 of float32's; float16 reached them at 2^-10 in 12)."""
    return max(tol, torch.finfo(dtype).eps) if dtype in (torch.float16, torch.bfloat16) else tol


def eps_of_h(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: int,
    mask: torch.Tensor | None = None,
    h_point: str = "output",
    conditioning=None,
    h0: torch.Tensor | None = None,
) -> BatchedF:
    """f(h) = mask * eps_theta(x_t, h) for a batch of h at one (x_t, t). x_t: (C, R, R);
    mask broadcastable to eps (1 inside the region of interest). h may be float32 (also as
    dual or requires-grad tensors): it is cast to the U-Net's dtype on the way in and eps
    comes back as float32 (float64 for a float64 U-Net), so J v and J^T u are float32
    whatever the U-Net runs in.

    ``conditioning`` (a text-conditioned model, hcore.conditioning): f is the prediction
    the sampler uses, out_u + s (out_c - out_u) under guidance, and h moves both branches
    by the same h - h0 (the edit branch "both"), each from its own activation; ``h0`` is
    the conditional branch's h_t at this point (``h_at``), so J is the Jacobian of the
    guided output with respect to an h-space edit there."""
    dtype = _unet_dtype(unet)
    out_dtype = linalg_dtype(dtype)
    if conditioning is not None:
        from hspace.hcore.conditioning import unet_output

        if h0 is None:
            raise ValueError("a conditioned f(h) needs h0, the h it is linearised at")

        def guided(h: torch.Tensor) -> torch.Tensor:
            with HSpaceHook(unet, point=h_point) as hs, sdpa_kernel([SDPBackend.MATH]):
                hs.guided = conditioning.guided
                hs.delta = (h - h0.to(h.dtype)).to(dtype)
                x = x_t.unsqueeze(0).expand(h.shape[0], *x_t.shape)
                out = unet_output(unet, x, t, conditioning).to(out_dtype)
            return out if mask is None else out * mask

        return guided

    def f(h: torch.Tensor) -> torch.Tensor:
        # the math backend: forward-mode AD through attention (flash / mem-efficient have none)
        with HSpaceHook(unet, point=h_point) as hs, sdpa_kernel([SDPBackend.MATH]):
            hs.replace = h.to(dtype)
            eps = unet(x_t.to(dtype).unsqueeze(0).expand(h.shape[0], *x_t.shape), t).sample.to(out_dtype)
        return eps if mask is None else eps * mask

    return f


@torch.no_grad()
def h_at(unet: torch.nn.Module, x_t: torch.Tensor, t: int, h_point: str = "output", conditioning=None) -> torch.Tensor:
    """h_t (C, H, W) in float32 (float64 for a float64 U-Net): the bottleneck activation of
    one U-Net pass at (x_t, t), the point J is taken at (the conditional branch's, for a
    text-conditioned model)."""
    from hspace.hcore.conditioning import unet_output

    dtype = _unet_dtype(unet)
    with HSpaceHook(unet, point=h_point) as hs:
        unet_output(unet, x_t[None], t, conditioning)
        return hs.last_h[-1].detach().to(linalg_dtype(dtype)).clone()


def jvp(f: BatchedF, h0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J v for each row of v (eq. (8)), one batched forward pass with dual numbers.
    h0: (C, H, W); v: (k, C, H, W). Returns (k, d_out)."""
    with fwAD.dual_level():
        dual = fwAD.make_dual(h0.unsqueeze(0).expand_as(v).contiguous(), v.contiguous())
        out = f(dual)
        tangent = fwAD.unpack_dual(out).tangent
    return tangent.reshape(v.shape[0], -1)


def vjp(f: BatchedF, h0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J^T u for each row of u (eq. (9)), reverse mode. u: (k, d_out). Returns (k, C, H, W)."""
    h = h0.unsqueeze(0).expand(u.shape[0], *h0.shape).clone().requires_grad_(True)
    with torch.enable_grad():
        out = f(h)
        (grad,) = torch.autograd.grad(out, h, grad_outputs=u.reshape(out.shape))
    return grad


@dataclass
class JacobianSVD:
    """Top-k singular triplets of J: singular_values (k,), vectors (k, C, H, W) right
    singular vectors (unit), outputs (k, d_out) left singular vectors (unit)."""

    singular_values: torch.Tensor
    vectors: torch.Tensor
    outputs: torch.Tensor
    iterations: int
    converged: bool


IterationCallback = Callable[[int, float], None]  # (iteration, relative residual: the stop rule's measure)


def ritz_residual(phi: torch.Tensor, phi_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The relative residuals of the Ritz pairs of A = J^T J on span(phi): with phi (d, b)
    orthonormal and phi_hat = A phi, the Rayleigh-Ritz pairs (theta_i, y_i = phi w_i) of
    H = phi^T A phi = W diag(theta) W^T have residuals r_i = A y_i - theta_i y_i =
    phi_hat w_i - theta_i phi w_i; returns (||r_i|| / theta_i (b,), W in ascending theta). For symmetric A an
    eigenvalue lies within ||r_i|| of theta_i, so a relative residual below tol bounds the
    relative error of sigma_i^2 by tol (of sigma_i by tol / 2), however close two singular
    values are; a vector's angle to its singular vector is at most ||r_i|| / gap_i."""
    h = phi.T @ phi_hat
    theta, w = torch.linalg.eigh((h + h.T) / 2)
    r = phi_hat @ w - (phi @ w) * theta
    return r.norm(dim=0) / theta.abs().clamp_min(torch.finfo(theta.dtype).tiny), w


def _iterate(f, h0, phi, found, tol, max_iters, on_iteration=None) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Subspace iteration on J^T J for the block phi (d, b), kept orthogonal to ``found``
    (d, m). Stops when every Ritz pair's relative residual ||J^T J y - theta y|| / theta
    is below ``tol`` (``ritz_residual``): unlike the change of the singular values between
    iterations, which stalls long before they are accurate where two are close, the
    residual bounds the error it promises. Returns (phi, sigma, iterations, converged);
    on_iteration(it, residual) reports progress."""
    shape = h0.shape
    for it in range(1, max_iters + 1):
        if found is not None:  # Phi <- [I - V (V^T V)^-1 V^T] Phi, by a solve (Alg. 2)
            coef = torch.linalg.solve(found.T @ found, found.T @ phi)
            phi, _ = torch.linalg.qr(phi - found @ coef)
        psi = jvp(f, h0, phi.T.reshape(-1, *shape))  # (b, d_out) = (J Phi)^T
        phi_hat = vjp(f, h0, psi).reshape(psi.shape[0], -1).T  # (d, b) = J^T J Phi
        deflated = phi_hat  # Alg. 2: the operator restricted to the complement of ``found``
        if found is not None:
            deflated = phi_hat - found @ torch.linalg.solve(found.T @ found, found.T @ phi_hat)
        residuals, w = ritz_residual(phi, deflated)
        residual = float(residuals.max())
        new_phi, s2, _ = torch.linalg.svd(phi_hat, full_matrices=False)
        sigma = s2.clamp_min(0).sqrt()
        if on_iteration is not None:
            on_iteration(it, residual)
        if residual < tol:
            # the Ritz vectors of the span whose residual was measured (``new_phi`` is one
            # more power step, and its residual was not)
            return phi @ w.flip(1), sigma, it, True
        phi = new_phi
    return phi, sigma, max_iters, False


def _finish(f, h0, v: torch.Tensor, iterations: int, converged: bool, max_iters: int) -> JacobianSVD:
    """U <- J V, singular values = |J v_i|, each column of U normalised (end of Alg. 1;
    at convergence the columns are orthogonal, as left singular vectors are). A singular
    vector's sign is arbitrary: each is turned so that its largest entry is positive, the
    same whatever the LAPACK build or the number of iterations."""
    peak = v.gather(0, v.abs().argmax(0, keepdim=True))
    v = v * torch.where(peak < 0, -1.0, 1.0).to(v.dtype)
    u = jvp(f, h0, v.T.reshape(-1, *h0.shape))
    sigma = u.norm(dim=1)
    order = torch.argsort(sigma, descending=True)
    if not converged:
        warnings.warn(
            f"Jacobian subspace iteration stopped at max_iters={max_iters} before reaching the tolerance",
            RuntimeWarning,
            stacklevel=3,
        )
    return JacobianSVD(
        sigma[order],
        v.T[order].reshape(-1, *h0.shape),
        (u / sigma[:, None].clamp_min(1e-12))[order],
        iterations,
        converged,
    )


def subspace_iteration(
    f: BatchedF,
    h0: torch.Tensor,
    k: int,
    tol: float = 1e-4,
    max_iters: int = 100,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
    on_iteration: IterationCallback | None = None,
) -> JacobianSVD:
    """Alg. 1: all k vectors at once. init: optional (k, C, H, W) starting vectors;
    on_iteration(it, change): progress."""
    d = h0.numel()
    phi = torch.randn(d, k, generator=generator, dtype=h0.dtype) if init is None else init.reshape(k, -1).T
    phi, _ = torch.linalg.qr(phi.to(h0.device))  # reduced QR: V^T V = I
    phi, _, iters, ok = _iterate(f, h0, phi, None, tol, max_iters, on_iteration)
    return _finish(f, h0, phi, iters, ok, max_iters)


def sequential_subspace_iteration(
    f: BatchedF,
    h0: torch.Tensor,
    k: int,
    block: int = 1,
    tol: float = 1e-4,
    max_iters: int = 100,
    generator: torch.Generator | None = None,
    on_iteration: IterationCallback | None = None,
) -> JacobianSVD:
    """SM Alg. 2: blocks of b vectors, each kept orthogonal to those already found, so
    memory is bounded by b (b = 1 finds them one by one). on_iteration(it, change): progress
    (it counts within each block)."""
    d = h0.numel()
    found, total_iters, all_ok = None, 0, True
    for start in range(0, k, block):
        b = min(block, k - start)
        phi, _ = torch.linalg.qr(torch.randn(d, b, generator=generator, dtype=h0.dtype).to(h0.device))
        phi, _, iters, ok = _iterate(f, h0, phi, found, tol, max_iters, on_iteration)
        if found is not None:  # keep the basis orthogonal even when a block stopped early
            phi, _ = torch.linalg.qr(phi - found @ torch.linalg.solve(found.T @ found, found.T @ phi))
        total_iters, all_ok = total_iters + iters, all_ok and ok
        found = phi if found is None else torch.cat([found, phi], 1)
    return _finish(f, h0, found, total_iters, all_ok, max_iters)


@dataclass
class LocalDirections:
    """Directions whose change of eps falls inside a region: vectors (k, C, H, W) unit,
    share (k,) = sum_i m_i (J v)_i^2 / |J v|^2 (the fraction of the change inside the region),
    gain (k,) = |J v| (how strongly eps moves per unit of h)."""

    vectors: torch.Tensor
    share: torch.Tensor
    gain: torch.Tensor


def localize(f: BatchedF, h0: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor, k: int) -> LocalDirections:
    """The k directions in span(basis) whose change of eps lies most inside ``mask``.

    An extension of the ROI Jacobian (early version of the paper, f(h) = mask * eps): the
    masked Jacobian's top singular vector maximises the change inside the region but
    says nothing about the change outside it, which on small models is larger (the 8x8
    bottleneck sees the whole image). Here the share of the change inside,
    R(v) = sum_i m_i (J v)_i^2 / |J v|^2, is maximised over span(basis) (e.g. the top-r right
    singular vectors of the unmasked J, from Alg. 1): with Y = J V (one batched JVP),
    A = Y M Y^T and B = Y Y^T, R is a generalised Rayleigh quotient and its maximisers
    are the top eigenvectors c of A c = mu B c (Rayleigh-Ritz; B = L L^T by Cholesky),
    v = V^T c. f: unmasked eps(h); basis: (r, C, H, W) orthonormal; mask broadcastable
    to f's output; k <= r."""
    r = basis.shape[0]
    if not 1 <= k <= r:
        raise ValueError(f"k={k} must be between 1 and the basis size {r}")
    y = jvp(f, h0, basis).double()  # (r, d_out): rows J v_i
    with torch.no_grad():
        out_shape = f(h0.unsqueeze(0)).shape[1:]
    m = torch.broadcast_to(mask.to(y.device, y.dtype), (1, *out_shape)).reshape(1, -1)
    a = (y * m) @ y.T
    b = y @ y.T
    b = b + 1e-12 * b.diagonal().max() * torch.eye(r, dtype=b.dtype, device=b.device)
    chol = torch.linalg.cholesky(b)
    c_small = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, a, upper=False).T, upper=False)
    mu, w = torch.linalg.eigh((c_small + c_small.T) / 2)
    order = torch.argsort(mu, descending=True)[:k]
    coef = torch.linalg.solve_triangular(chol.T, w[:, order], upper=True)  # (r, k)
    v = coef.T.to(basis.dtype) @ basis.reshape(r, -1)
    v = v / v.norm(dim=1, keepdim=True)
    jv = jvp(f, h0, v.reshape(k, *h0.shape))
    gain = jv.norm(dim=1)
    share = (jv**2 * m.to(jv.dtype)).sum(1) / (jv**2).sum(1).clamp_min(1e-30)
    return LocalDirections(v.reshape(k, *h0.shape), share, gain)


def roi_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """A (1, 1, H, W) mask, 1 inside the rectangle x0,y0,x1,y1 (pixels, end exclusive)."""
    x0, y0, x1, y1 = box
    mask = torch.zeros(1, 1, *shape)
    mask[..., y0:y1, x0:x1] = 1
    return mask
