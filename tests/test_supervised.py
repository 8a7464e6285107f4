"""Eq. (10) and eq. (11) against hand computations, and the directions/disentangle
commands on an annotated run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hspace.data import directions as dirfile
from hspace.data.catalog import RunFolder
from hspace.data.stores import AnnotationStore, SampleStore
from hspace.flows.cli import app
from hspace.hcore import supervised


def test_top_bottom_and_mean_difference():
    scores = np.array([0.1, 0.9, 0.5, 0.95, 0.0, 0.3])
    pos, neg = supervised.top_bottom(scores, 2)
    assert pos.tolist() == [1, 3] and neg.tolist() == [0, 4]
    q = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) ** 1.5
    acc = supervised.MeanDifference()
    acc.add(q[[1]], True)
    acc.add(q[[3]], True)  # streamed in two batches
    acc.add(q[[0, 4]], False)
    np.testing.assert_allclose(acc.direction(), q[[1, 3]].mean(0) - q[[0, 4]].mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="between 1 and n/2"):
        supervised.top_bottom(scores, 4)


def test_top_bottom_refuses_to_mix_tied_labels():
    """0/1 labels (inverted real images): 6 positives, 14 negatives and k = 8 would put two
    negatives among the "positives"; refused with the counts and the largest safe k."""
    labels = np.array([1.0] * 6 + [0.0] * 14)[np.random.default_rng(0).permutation(20)]
    with pytest.raises(ValueError, match=r"6 samples score above 0, 0 below and 14 equal to it; use k <= 6"):
        supervised.top_bottom(labels, 8)
    pos, neg = supervised.top_bottom(labels, 6)
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    # ties inside one side are fine: the sets are still strictly apart
    pos, neg = supervised.top_bottom(np.array([1.0, 1.0, 1.0, 0.5, 0.0, 0.0]), 2)
    assert len(set(pos) & {0, 1, 2}) == 2 and neg.tolist() == [4, 5]
    with pytest.raises(ValueError, match="do not separate any pair"):
        supervised.top_bottom(np.zeros(6), 1)


def test_disentangle_is_the_hand_projection():
    rng = np.random.default_rng(0)
    v0, a, b = (rng.standard_normal((3, 2, 4, 4)) for _ in range(3))
    v = supervised.disentangle(v0, [a, b])
    big = np.stack([a.ravel(), b.ravel()], 1)
    proj = big @ np.linalg.inv(big.T @ big) @ big.T  # the textbook formula, as a reference only
    np.testing.assert_allclose(v.ravel(), v0.ravel() - proj @ v0.ravel(), atol=1e-5)
    assert abs(v.ravel() @ a.ravel()) < 1e-4 and abs(v.ravel() @ b.ravel()) < 1e-4
    # collinear conditions do not blow up (an explicit inverse of a singular V^T V would)
    v2 = supervised.disentangle(v0, [a, 2 * a])
    np.testing.assert_allclose(v2, supervised.disentangle(v0, [a]), atol=1e-4)
    # keep_norm: the same direction, rescaled to |v0|
    vk = supervised.disentangle(v0, [a, b], keep_norm=True)
    ref = v0.ravel() - proj @ v0.ravel()
    np.testing.assert_allclose(vk.ravel(), ref * np.linalg.norm(v0) / np.linalg.norm(ref), atol=1e-5)
    with pytest.raises(ValueError, match="span of the conditions"):
        supervised.disentangle(a + 2 * b, [a, b], keep_norm=True)


@pytest.fixture()
def annotated_run(tmp_path):
    from tests.test_pca import make_run

    run, h = make_run(tmp_path / "run")
    rng = np.random.default_rng(1)
    scores = np.stack([h[:, 0, 0] + 0.1 * rng.standard_normal(len(h)), rng.random(len(h))], 1).astype(np.float32)
    store = AnnotationStore(run.annotations)
    arr, done = store.annotator_array("fake-0", ["Smiling", "Male"], len(h), 32)
    arr[:] = scores
    done[:] = 1
    store.rebuild_scores()
    return run, h, scores


def test_directions_command_matches_eq10(annotated_run):
    run, h, scores = annotated_run
    result = CliRunner().invoke(
        app, ["directions", str(run.root), "--attribute", "Smiling", "--top", "8", "--held-out", "0"]
    )
    assert result.exit_code == 0, result.output
    v, md = dirfile.load(run.directions / "Smiling.safetensors")
    order = np.argsort(scores[:, 0], kind="stable")
    ref = h[order[-8:]].mean(0) - h[order[:8]].mean(0)
    np.testing.assert_allclose(v.numpy().reshape(ref.shape), ref, atol=1e-4)
    assert md["method"].startswith("mean-difference") and md["attribute"] == "Smiling"
    # x_T variant: noise re-drawn from the stored seeds
    result = CliRunner().invoke(
        app, ["directions", str(run.root), "--attribute", "Smiling", "--top", "8", "--latent", "xT", "--held-out", "0"]
    )
    assert result.exit_code == 0, result.output
    vx, mdx = dirfile.load(run.directions / "Smiling_xT.safetensors")
    assert vx.shape == (1, 3, 8, 8) and mdx["h_point"] == "xT"


def test_disentangle_command(annotated_run):
    run, _, _ = annotated_run
    runner = CliRunner()
    for attr in ("Smiling", "Male"):
        assert (
            runner.invoke(
                app, ["directions", str(run.root), "--attribute", attr, "--top", "8", "--held-out", "0"]
            ).exit_code
            == 0
        )
    result = runner.invoke(app, ["disentangle", str(run.root), "--direction", "Smiling", "--against", "Male"])
    assert result.exit_code == 0, result.output
    v, md = dirfile.load(run.directions / "Smiling_disentangled.safetensors")
    m, _ = dirfile.load(run.directions / "Male.safetensors")
    assert abs(float((v * m).sum())) < 1e-3 * float(v.norm() * m.norm())
    assert md["against"] == "Male" and md["keep_norm"] == "true"
    s0, _ = dirfile.load(run.directions / "Smiling.safetensors")
    assert float(v.norm()) == pytest.approx(float(s0.norm()), rel=1e-5)  # rescaled by default
    raw = ["disentangle", str(run.root), "--direction", "Smiling", "--against", "Male", "--no-keep-norm", "--name", "r"]
    assert runner.invoke(app, raw).exit_code == 0
    r, md = dirfile.load(run.directions / "r.safetensors")
    expected = s0 - (s0 * m).sum() / (m * m).sum() * m  # eq. (11) by hand
    torch.testing.assert_close(r, expected, atol=1e-4, rtol=1e-4)
    assert md["keep_norm"] == "false"


def test_supervised_bad_inputs(annotated_run):
    run, _, _ = annotated_run
    runner = CliRunner()
    before = sorted(p.name for p in run.root.rglob("*"))
    cases = [
        (["directions", str(run.root), "--attribute", "Smilling", "--held-out", "0"], "unknown attribute 'Smilling'"),
        (["directions", str(run.root), "--attribute", "Smiling", "--top", "500", "--held-out", "0"], "--top 500"),
        (["directions", str(run.root), "--attribute", "Smiling", "--latent", "z"], "--latent must be"),
        (["disentangle", str(run.root), "--direction", "nope", "--against", "Male"], "does not exist"),
        (["disentangle", str(run.root), "--direction", "Smiling", "--against", "Smiling"], "itself"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and needle in result.output.replace("\n", " "), result.output
    assert sorted(p.name for p in run.root.rglob("*") if p.name != "run.json") == [n for n in before if n != "run.json"]
    unannotated = RunFolder(run.root.parent / "plain")
    from tests.test_pca import make_run

    make_run(unannotated.root)
    result = runner.invoke(app, ["directions", str(unannotated.root), "--attribute", "Smiling", "--held-out", "0"])
    assert result.exit_code != 0 and "no annotations" in result.output
    assert SampleStore(unannotated.samples).complete()
