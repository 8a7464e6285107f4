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


def test_localize_maximises_the_share_inside_the_region(point, reference):
    """Against an independent reference: the generalised eigenproblem A c = mu B c on the
    explicit Jacobian restricted to its top-r right singular vectors (scipy.linalg.eigh)."""
    from scipy.linalg import eigh

    from hcore.jacobian import localize

    unet, x_t, h0 = point
    jac, _, vh = reference
    r, k = 12, 2
    mask = roi_mask((16, 16), (2, 3, 9, 12)).double()
    basis = vh[:r].reshape(r, *h0.shape)
    loc = localize(eps_of_h(unet, x_t, 40), h0, basis, mask, k)
    m = torch.broadcast_to(mask, (1, 3, 16, 16)).reshape(-1)
    y = (jac @ vh[:r].T).T.numpy()  # (r, d_out)
    a, b = (y * m.numpy()) @ y.T, y @ y.T
    mu, c = eigh(a, b)
    for j in range(k):
        ref = torch.from_numpy(c[:, -1 - j]) @ vh[:r]
        ref = ref / ref.norm()
        assert abs(float((loc.vectors[j].reshape(-1) * ref).sum())) >= 0.99
        assert float(loc.share[j]) == pytest.approx(mu[-1 - j], rel=1e-6)
        jv = jac @ loc.vectors[j].reshape(-1)
        assert float(loc.gain[j]) == pytest.approx(float(jv.norm()), rel=1e-6)
    # better than any basis vector alone (the masked SVD's answer lies in the same span)
    share_of_basis = ((jac @ vh[:r].T) ** 2 * m[:, None]).sum(0) / ((jac @ vh[:r].T) ** 2).sum(0)
    assert float(loc.share[0]) >= float(share_of_basis.max()) - 1e-9
    with pytest.raises(ValueError, match="between 1 and the basis size"):
        localize(eps_of_h(unet, x_t, 40), h0, basis, mask, r + 1)
