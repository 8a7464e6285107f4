"""PCA stage against numpy's exact SVD, out-of-core reads, sign alignment, the random
baseline, and 1 vs 2 Dask workers, on a stored run with a planted spectrum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hspace.data import directions as dirfile
from hspace.data.catalog import RunError, RunFolder
from hspace.data.stores import PCAStore, SampleLayout, SampleStore, timestep_batches
from hspace.flows.cli import app
from hspace.hcore import pca as hpca
from hspace.tasks.pca import fit_timestep, run_pca

N, STEPS, H_SHAPE, B = 96, 3, (4, 4, 4), 32
D = 64
SCALES = np.r_[12.0, 9.0, 6.5, 4.5, 3.0, np.full(D - 5, 0.4)]  # eigengaps >= 1.4x for the top 5


def planted_h(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = np.empty((N, STEPS, D), np.float32)
    for t in range(STEPS):
        basis = np.linalg.qr(rng.standard_normal((D, D)))[0]
        h[:, t] = (rng.standard_normal((N, D)) * SCALES) @ basis.T + rng.standard_normal(D) * 2
    return h.astype(np.float16)


def make_run(root, pending: tuple[int, ...] = ()) -> tuple[RunFolder, np.ndarray]:
    run = RunFolder(root)
    run.init(
        {"n": N, "steps": STEPS, "eta": 0.0, "seed": 0, "batch_size": B, "h_point": "output", "dtype": "float32"},
        {"id": "synthetic", "path": "-", "revision": None, "fingerprint": "f" * 64, "scheduler": "linear:100"},
        {},
    )
    h = planted_h()
    store = SampleStore.create(
        run.samples, SampleLayout(N, STEPS, H_SHAPE, (3, 8, 8), B), np.arange(N), np.arange(STEPS)[::-1]
    )
    for k in range(N // B):
        if k not in pending:
            store.write_shard(k, h[k * B : (k + 1) * B].reshape(B, STEPS, *H_SHAPE), np.zeros((B, 3, 8, 8), np.uint8))
    return run, h.astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("pca") / "run")


def exact(h_t: np.ndarray, k: int):
    xc = h_t - h_t.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ev = s**2 / (len(h_t) - 1)
    return ev[:k] / ev.sum(), vt[:k]


@pytest.mark.parametrize("method", ["ipca", "randomized"])
def test_engines_match_exact_svd(synthetic_run, method):
    run, h = synthetic_run
    result = run_pca(str(run.root), 5, method=method, batch_size=B, workers=1)
    assert result["method"] == method
    arrays, attrs = PCAStore(run.root / "pca.zarr").read()
    assert arrays["components"].shape == (STEPS, 5, D) and attrs["n_samples"] == N
    for t in range(STEPS):
        ratio, vt = exact(h[:, t], 5)
        np.testing.assert_allclose(arrays["explained_variance_ratio"][t], ratio, rtol=0.01)
        assert hpca.principal_angles_deg(arrays["components"][t], vt).max() < 1.0
        np.testing.assert_allclose(arrays["mean"][t], h[:, t].mean(0), atol=1e-3)
    np.testing.assert_allclose(arrays["std"], np.sqrt(arrays["explained_variance"]), rtol=1e-6)


def test_signs_aligned_with_reference_and_flips_recorded(synthetic_run):
    run, _ = synthetic_run
    run_pca(str(run.root), 5, method="randomized", batch_size=B, reference_step=1)
    arrays, attrs = PCAStore(run.root / "pca.zarr").read()
    c = arrays["components"]
    assert attrs["reference_step"] == 1
    # chained: every step agrees with its neighbour towards the reference
    assert (np.einsum("tkd,tkd->tk", c[1:], c[:-1]) >= 0).all()
    assert arrays["sign_flips"].dtype == bool and not arrays["sign_flips"][1].any()
    assert arrays["sign_alignment"].shape == (STEPS, 5) and (arrays["sign_alignment"][1] == 1).all()
    comps = np.stack([-c[0], c[1]])  # unaligned input: the flip is found and recorded
    aligned, flips, strength = hpca.align_signs(comps, 1)
    assert flips[0].all() and np.array_equal(aligned[0], c[0])
    np.testing.assert_allclose(strength[0], np.abs(np.einsum("kd,kd->k", c[0], c[1])), rtol=1e-5)


def test_sign_chain_follows_a_rotating_component_and_flags_a_reordering():
    """A component that turns 30 degrees per step: by step 4 it is 120 degrees from step 0,
    so matching every step to the reference flips it there; chaining does not. Random sign
    noise on the input is undone up to the reference's sign. A swap of two components at
    one step is a reordering: its alignment strength is ~0 and it is reported."""
    rng = np.random.default_rng(0)
    angles = np.radians(30 * np.arange(6))
    truth = np.zeros((6, 2, 4))
    truth[:, 0, 0], truth[:, 0, 1] = np.cos(angles), np.sin(angles)
    truth[:, 1, 2], truth[:, 1, 3] = np.cos(angles / 3), np.sin(angles / 3)
    noise = rng.choice([-1.0, 1.0], size=(6, 2))
    noise[0] = 1.0
    aligned, flips, strength = hpca.align_signs(truth * noise[..., None], reference=0)
    np.testing.assert_allclose(aligned, truth, atol=1e-12)
    np.testing.assert_array_equal(flips, noise < 0)
    np.testing.assert_allclose(strength[1:, 0], np.cos(np.radians(30)), rtol=1e-6)
    assert hpca.weak_alignments(strength) == {}
    # the old rule (sign of the dot with the reference step) gets step 4 and 5 wrong
    old = np.einsum("tkd,kd->tk", truth, truth[0]) < 0
    assert old[4:, 0].all()
    swapped = truth.copy()
    swapped[3:, [0, 1]] = truth[3:, [1, 0]]  # components reorder from step 3 on
    _, _, strength = hpca.align_signs(swapped, reference=0)
    assert strength[3].max() < 0.2 and hpca.weak_alignments(strength) == {0: [3], 1: [3]}


def test_directions_and_norm_matched_random_baseline(synthetic_run):
    run, _ = synthetic_run
    run_pca(str(run.root), 3, method="ipca", batch_size=B)
    arrays, _ = PCAStore(run.root / "pca.zarr").read()
    for j in range(3):
        v, meta = dirfile.load(run.directions / f"pc{j:02d}.safetensors")
        r, rmeta = dirfile.load(run.directions / f"random{j:02d}.safetensors")
        assert v.shape == (STEPS, *H_SHAPE) and meta["method"] == "pca" and rmeta["method"] == "random"
        pc_norms = v.flatten(1).norm(dim=1).numpy()
        np.testing.assert_allclose(pc_norms, arrays["std"][:, j], rtol=1e-5)
        np.testing.assert_allclose(r.flatten(1).norm(dim=1).numpy(), pc_norms, rtol=1e-5)
        np.testing.assert_allclose(
            v.flatten(1).numpy(), arrays["components"][:, j] * arrays["std"][:, j, None], rtol=1e-5, atol=1e-6
        )
        cos = torch.nn.functional.cosine_similarity(v.flatten(1), r.flatten(1), dim=1)
        assert cos.abs().max() < 0.6  # random, not the PC


def test_reads_are_chunked_never_whole(synthetic_run):
    run, _ = synthetic_run

    class Spy:
        def __init__(self, arr):
            self.arr, self.rows = arr, []

        def __getitem__(self, key):
            self.rows.append(key[0].stop - key[0].start)
            assert isinstance(key[1], int)  # one timestep per read
            return self.arr[key]

    store = SampleStore(run.samples)
    spy = Spy(store.h)
    store.h = spy
    result = hpca.fit_randomized(timestep_batches(store, 1, 16), 3, n_iter=3)
    # 3 passes (the first also takes the mean), 16 rows at a time
    assert max(spy.rows) <= 16 and sum(spy.rows) == N * 3
    assert result.n == N and result.passes == 3


def test_one_and_two_workers_agree(synthetic_run):
    run, _ = synthetic_run
    run_pca(str(run.root), 4, method="randomized", batch_size=B, workers=1)
    one, _ = PCAStore(run.root / "pca.zarr").read()
    run_pca(str(run.root), 4, method="randomized", batch_size=B, workers=2)
    two, attrs = PCAStore(run.root / "pca.zarr").read()
    assert attrs["workers"] == 2
    for name in ("components", "explained_variance", "mean"):
        np.testing.assert_allclose(one[name], two[name], rtol=1e-5, atol=1e-6)


def test_fit_timestep_direct_matches_exact(synthetic_run):
    run, h = synthetic_run
    res = fit_timestep(str(run.samples), 2, "ipca", 5, B, 0)
    assert hpca.principal_angles_deg(res.components, exact(h[:, 2], 5)[1]).max() < 1.0


@pytest.mark.slow
def test_bad_inputs(tmp_path):
    run, _ = make_run(tmp_path / "partial", pending=(1,))
    with pytest.raises(RunError, match=r"1 unfinished shards \[1\]"):
        run_pca(str(run.root), 3)
    result = run_pca(str(run.root), 3, method="ipca", batch_size=B, complete_only=True)
    assert result["n"] == 2 * B
    with pytest.raises(RunError, match="--components 65 is not allowed"):
        run_pca(str(run.root), 65, method="randomized", complete_only=True)
    with pytest.raises(RunError, match=r"--components 10 is not allowed with ipca.*--batch-size = 8"):
        run_pca(str(run.root), 10, method="auto", batch_size=8, complete_only=True)
    with pytest.raises(RunError, match="cannot reach the Dask scheduler"):
        run_pca(str(run.root), 3, dask_address="tcp://127.0.0.1:9", complete_only=True)
    empty = RunFolder(tmp_path / "empty")
    empty.init({"n": 1}, {"fingerprint": "x"}, {})
    with pytest.raises(RunError, match="no samples.zarr"):
        run_pca(str(empty.root), 3)


def test_pca_command_end_to_end(prefect_server, tmp_path):
    run, _ = make_run(tmp_path / "cli")
    before = (run.root / "samples.zarr" / "h" / "zarr.json").read_bytes()
    result = CliRunner().invoke(app, ["pca", str(run.root), "--components", "3", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert (run.directions / "pc02.safetensors").exists() and (run.directions / "random02.safetensors").exists()
    assert RunFolder(run.root).read()["stages"]["pca"]["state"] == "done"
    assert (run.root / "samples.zarr" / "h" / "zarr.json").read_bytes() == before
    bad = CliRunner().invoke(app, ["pca", str(run.root), "--method", "svd"])
    assert bad.exit_code != 0 and "--method must be" in bad.output


def test_complete_shards_only_reads_no_gap_rows(tmp_path):
    run, h = make_run(tmp_path / "gap", pending=(1,))
    run_pca(str(run.root), 4, method="ipca", batch_size=2 * B, complete_only=True)
    arrays, attrs = PCAStore(run.root / "pca.zarr").read()
    keep = np.r_[0:B, 2 * B : 3 * B]
    assert attrs["n_samples"] == 2 * B
    for t in range(STEPS):
        ratio, vt = exact(h[keep, t], 4)
        assert hpca.principal_angles_deg(arrays["components"][t], vt).max() < 1.0
        np.testing.assert_allclose(arrays["mean"][t], h[keep, t].mean(0), atol=1e-3)


def _stream(x: np.ndarray, rows: int = 16):
    return lambda: (x[i : i + rows] for i in range(0, len(x), rows))


@pytest.mark.parametrize(
    "n,d,k,decay",
    [
        (25, 200, 10, 1.3),  # n < K + oversampling: the old engine stopped after one pass, eigenvalues 92% off
        (100, 2000, 20, 1.0),  # isotropic noise, a flat spectrum: the old engine stopped when its basis outgrew n
        (11, 300, 10, 1.3),  # n = K + 1: exactly K non-zero components
        (40, 20000, 8, 1.3),  # D much larger than n
        (400, 500, 6, 1.3),  # n > D: converges on its own before the space is exhausted
    ],
)
def test_randomized_matches_eigh_for_every_n(n, d, k, decay):
    """fit_randomized stops on convergence or once its Krylov space holds the whole range
    of the covariance (then the Ritz pairs are exact), never earlier: against numpy's eigh."""
    rng = np.random.default_rng(n + d)
    m = min(n, d)
    basis = np.linalg.qr(rng.standard_normal((d, m)))[0]
    x = ((rng.standard_normal((n, m)) * decay ** -np.arange(m)) @ basis.T + rng.standard_normal(d)).astype(np.float32)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    # numpy's eigh of the n x n Gram matrix: the same non-zero spectrum as the d x d covariance
    gram_evals, u = np.linalg.eigh(xc @ xc.T / (n - 1))
    evals, u = gram_evals[::-1][:k], u[:, ::-1][:, :k]
    evecs = (xc.T @ u / np.sqrt(evals * (n - 1))).T
    result = hpca.fit_randomized(_stream(x), k)
    np.testing.assert_allclose(result.explained_variance, evals, rtol=2e-3)
    gaps = np.abs(np.diff(np.r_[np.inf, evals, 0])) / evals.max()
    well_defined = np.minimum(gaps[:-1], gaps[1:]) > 1e-3  # a vector is defined where its eigenvalue is isolated
    cos = np.abs(np.sum(result.components.astype(np.float64) * evecs, 1))
    assert (cos[well_defined] > 0.999).all(), cos
    np.testing.assert_allclose(result.mean, x.astype(np.float64).mean(0), atol=1e-4)
