"""Jacobian subspace iteration (Alg. 1, SM Alg. 2, ROI) against the explicit Jacobian of
a tiny U-Net and torch.linalg.svd."""

from __future__ import annotations

import pytest
import torch

from hcore.hspace import HSpace
from hcore.jacobian import eps_of_h, jvp, roi_mask, sequential_subspace_iteration, subspace_iteration, vjp

K = 4


@pytest.fixture(scope="module")
def point(loaded_model):
    unet, _ = loaded_model
    unet = unet.double()
    x_t = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad(), HSpace(unet) as hs:
        unet(x_t[None], 40)
        h0 = hs.last_h[0].clone()
    yield unet, x_t, h0
    unet.float()


def explicit_svd(f, h0):
    single = lambda h: f(h[None])[0].reshape(-1)  # noqa: E731
    jac = torch.autograd.functional.jacobian(single, h0, vectorize=True).reshape(-1, h0.numel())
    _, s, vh = torch.linalg.svd(jac, full_matrices=False)
    return jac, s, vh


@pytest.fixture(scope="module")
def reference(point):
    unet, x_t, h0 = point
    return explicit_svd(eps_of_h(unet, x_t, 40), h0)


def check(result, s, vh, k=K):
    torch.testing.assert_close(result.singular_values, s[:k], rtol=1e-3, atol=0)
    cos = (result.vectors.reshape(k, -1) * vh[:k]).sum(1).abs()
    assert (cos >= 0.99).all(), cos


def test_jvp_and_vjp_equal_the_explicit_jacobian(point, reference):
    unet, x_t, h0 = point
    f = eps_of_h(unet, x_t, 40)
    jac, _, _ = reference
    v = torch.randn(2, *h0.shape, dtype=torch.float64)
    torch.testing.assert_close(jvp(f, h0, v), v.reshape(2, -1) @ jac.T)
    u = torch.randn(2, jac.shape[0], dtype=torch.float64)
    torch.testing.assert_close(vjp(f, h0, u).reshape(2, -1), u @ jac)


def test_alg1_matches_explicit_svd(point, reference):
    unet, x_t, h0 = point
    f = eps_of_h(unet, x_t, 40)
    _, s, vh = reference
    result = subspace_iteration(f, h0, K, tol=1e-7, max_iters=300, generator=torch.Generator().manual_seed(1))
    check(result, s, vh)
    assert result.converged


@pytest.mark.parametrize("block", [1, 2])
def test_alg2_matches_explicit_svd(point, reference, block):
    unet, x_t, h0 = point
    f = eps_of_h(unet, x_t, 40)
    _, s, vh = reference
    result = sequential_subspace_iteration(
        f, h0, K, block=block, tol=1e-7, max_iters=300, generator=torch.Generator().manual_seed(2)
    )
    check(result, s, vh)


def test_roi_matches_masked_jacobian(point, reference):
    unet, x_t, h0 = point
    mask = roi_mask((16, 16), (2, 3, 9, 12)).double()
    f = eps_of_h(unet, x_t, 40, mask=mask)
    _, s, vh = explicit_svd(f, h0)
    _, s_full, _ = reference
    assert s[0] < s_full[0]  # the region is part of the image
    result = subspace_iteration(f, h0, K, tol=1e-7, max_iters=300, generator=torch.Generator().manual_seed(3))
    check(result, s, vh)


def test_max_iters_warns(point):
    unet, x_t, h0 = point
    with pytest.warns(RuntimeWarning, match="max_iters=2"):
        result = subspace_iteration(eps_of_h(unet, x_t, 40), h0, 2, tol=1e-12, max_iters=2)
    assert not result.converged and result.iterations == 2
