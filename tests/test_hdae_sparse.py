"""HDAE's sparse directions (hcore/edits/sparse.py): per step exactly k entries, the largest
in magnitude (a numpy argsort as the reference), their values kept; the edit is the h method
with that sparse vector; k at least the size of h is the h method itself, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from hspace.hcore.edits import get
from hspace.hcore.edits.sparse import sparsify
from hspace.hcore.hooks import h_shape
from hspace.hcore.sampler import make_generators, sample
from tests.test_jacobian import attention_unet

STEPS = 6


@pytest.fixture(scope="module")
def model():
    unet = attention_unet()  # attention at a level and in the mid block, as real U-Nets
    v = torch.randn(STEPS, *h_shape(unet), generator=torch.Generator().manual_seed(1))
    return unet, DDIMScheduler(num_train_timesteps=1000), v


def test_sparsify_keeps_the_k_largest_entries_of_every_step(model):
    _, _, v = model
    k = 7
    got = sparsify(v, k).reshape(STEPS, -1).numpy()
    flat = v.reshape(STEPS, -1).numpy()
    for t in range(STEPS):
        top = np.argsort(-np.abs(flat[t]), kind="stable")[:k]
        want = np.zeros_like(flat[t])
        want[top] = flat[t, top]
        np.testing.assert_array_equal(got[t], want)
    assert sparsify(v, 10**6) is v
    with pytest.raises(ValueError, match="k >= 1"):
        sparsify(v, 0)


def test_the_sparse_method_is_the_h_method_with_the_sparse_vector(model):
    unet, sched, v = model
    sparse, h = get("hdae-sparse"), get("h")
    assert sparse.needs == ("direction",) and sparse.acts_on == "h" and "HDAE" in sparse.reference
    run = lambda method: sample(unet, sched, make_generators(2, [0, 1]), STEPS, 1.0, edit=method.action(3.0))  # noqa: E731
    by_method = run(sparse(v, k=5))
    by_hand = run(h(sparsify(v, 5)))
    torch.testing.assert_close(by_method, by_hand, rtol=0, atol=0)
    assert (by_method - run(h(v))).abs().max() > 1e-3  # sparser: another edit
    torch.testing.assert_close(run(sparse(v, k=v[0].numel())), run(h(v)), rtol=0, atol=0)
    assert sparse.from_direction(v, (1, 4)).k == sparse.k and sparse.from_direction(v, (1, 4)).window == (1, 4)
