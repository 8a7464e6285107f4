"""The layer map (hcore/layers.py, tasks/layers.py, data/layers.py): the Gram-matrix PCA against
numpy's SVD; the strength read off the grid by hand; `hspace layers` on a U-Net with attention,
as users run it: h captured at every point equals what the sampler stored (the mid block) and
has each point's probed shape, each point's eq. (10) file is the mean difference of the stored h
by hand and edits through `hspace edit` at its point, the table, CSV and figure reload; bad input
one line before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hspace.hcore import layers as science


def test_gram_scores_and_step_pca_are_numpys_pca():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 40)) @ np.diag(np.linspace(3, 0.1, 40)) + 1.5
    flat = x.reshape(12, -1) - x.reshape(12, -1).mean(0)
    u, s, vt = np.linalg.svd(flat, full_matrices=False)
    ours = science.gram_scores(lambda t: x[:, t], 3, 4)  # summed step by step
    np.testing.assert_allclose(np.abs(ours), np.abs(u[:, :4] * s[:4]), rtol=1e-6, atol=1e-8)
    assert science.gram_scores(lambda t: x[:, t], 3, 64).shape == (12, 11)  # at most N - 1 axes
    axes, std = science.step_pca(lambda t: x[:, t], 3, 3)
    for t in range(3):
        c = x[:, t] - x[:, t].mean(0)
        _, st, vtt = np.linalg.svd(c, full_matrices=False)
        np.testing.assert_allclose(np.abs(axes[t]), np.abs(vtt[:3]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(std[t], st[:3] / np.sqrt(11), rtol=1e-5)


def test_the_strength_is_read_off_the_grid_by_hand():
    assert science.interpolate_gamma([1, 2, 4], [0.1, 0.3, 0.5], 0.25) == pytest.approx(1.75)
    assert science.interpolate_gamma([1, 2, 4], [0.5, 0.6, 0.7], 0.25) == pytest.approx(0.5)  # between 0 and 1
    assert science.interpolate_gamma([1, 2, 4], [0.1, 0.15, 0.2], 0.25) is None
    assert science.probe(np.zeros((6, 2)), np.array([1, 0, 0, 0, 0, 0])) is None  # one positive: no 2 folds


@pytest.fixture(scope="module")
def mapped(prefect_server, oracle_dir, tmp_path_factory):
    """A 24-sample run of a U-Net with attention, annotated by a random oracle, mapped at three
    points with `hspace layers`."""
    from tests.conftest import tiny_scheduler
    from tests.test_h_points import attention_unet
    from tests.test_sd import hspace as cli

    root = tmp_path_factory.mktemp("layers")
    attention_unet().save_pretrained(root / "model" / "unet")
    tiny_scheduler().save_pretrained(root / "model" / "scheduler")
    run = root / "run"
    r = cli("sample", "--model", root / "model", "--n", "24", "--steps", "3", "--batch-size", "12", "--device", "cpu",
            "--out", run)  # fmt: skip
    assert r.exit_code == 0, r.output
    oracle = f"oracle:{oracle_dir}"
    assert cli("annotate", run, "--annotator", oracle, "--device", "cpu").exit_code == 0
    r = cli("layers", run, "--points", "down_blocks.1,mid_block,up_blocks.1", "--attributes", "Smiling,Male",
            "--samples", "12", "--components", "2", "--n", "4", "--calibration-n", "4", "--evaluator", oracle,
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    return run, r.output, root


@pytest.mark.slow
def test_layers_store_every_point_and_its_direction_edits_there(mapped, tmp_path):
    from PIL import Image

    from hspace.data import directions as dirfile
    from hspace.data.catalog import RunFolder
    from hspace.data.layers import LayerStore, layer_file
    from hspace.data.stores import AnnotationStore, SampleStore
    from hspace.hcore.hooks import h_shape
    from tests.test_h_points import attention_unet
    from tests.test_sd import hspace as cli

    run, output, root = mapped
    assert "layers: done" in output and "most readable" in output, output
    store = LayerStore(run / "layers" / "h.zarr")
    assert store.points == ["down_blocks.1", "mid_block", "up_blocks.1"]
    unet = attention_unet()
    for point in store.points:
        assert store.group[point].shape == (12, 3, *h_shape(unet, point))
    stored = np.asarray(SampleStore(run / "samples.zarr").h[:12], np.float32)  # the sampler's own h, mid block
    np.testing.assert_allclose(store.read("mid_block"), stored, rtol=0, atol=2e-3)

    scores, names = AnnotationStore(run / "annotations.zarr").scores()
    order = np.argsort(scores[:12, names.index("Male")], kind="stable")
    x = store.read("up_blocks.1")
    expected = x[np.sort(order[-3:])].mean(0) - x[np.sort(order[:3])].mean(0)  # eq. (10), quarters of 12
    path = layer_file(RunFolder(run), "up_blocks.1", "Male")
    v, meta = dirfile.load(path)
    assert meta["h_point"] == "up_blocks.1"
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6)

    rows = json.loads((run / "layers" / "table.json").read_text())
    assert [r["point"] for r in rows] == store.points
    for r in rows:
        assert r["bytes_per_sample"] == 3 * int(np.prod(r["shape"])) * 2 and set(r["edits"]) == {"Smiling", "Male"}
        assert r["pca_vs_random"] > 0
    assert (run / "layers" / "table.csv").read_text().startswith("point,probe,pca_vs_random")
    assert Image.open(run / "layers" / "layers.png").size[0] > 300

    grid = tmp_path / "g.png"  # the point's direction edits the run's sample at its own point
    r = cli("edit", run, "--sample", "20", "--direction", path, "--scales", "0,4", "--out", grid)
    assert r.exit_code == 0, r.output
    a, b = (np.asarray(Image.open(p)).astype(np.int16) for p in sorted((tmp_path / "g").glob("*.png")))
    assert np.abs(a - b).mean() > 0.5
    mid = layer_file(RunFolder(run), "mid_block", "Male")
    r = cli("edit", run, "--sample", "20", "--direction", path, "--direction", mid, "--out", grid)
    assert r.exit_code != 0 and "directions of several h points (mid_block, up_blocks.1)" in r.output, r.output


@pytest.mark.slow
def test_layers_bad_input_is_one_line_before_any_work(mapped):
    from tests.test_cli import tree_digest
    from tests.test_sd import assert_refused
    from tests.test_sd import hspace as cli

    run, _, root = mapped
    before = tree_digest(run)
    small = ("--samples", "8", "--n", "2", "--calibration-n", "2", "--device", "cpu")
    r = cli("layers", run, "--points", "down_block.1", *small)
    assert_refused(r, "layers.points: h point 'down_block.1'", "nearest: down_blocks.1")
    assert_refused(cli("layers", run, "--samples", "20", "--device", "cpu"), "exceed the run's 24 samples")
    r = cli("layers", run, "--attributes", "Bald", *small)
    assert_refused(r, "layers.attributes: Bald not in the run's annotations")
    assert tree_digest(run) == before
    bare = root / "bare"  # a run not annotated yet
    r = cli("sample", "--model", root / "model", "--n", "12", "--steps", "2", "--device", "cpu", "--out", bare)
    assert r.exit_code == 0, r.output
    assert_refused(cli("layers", bare, *small), "has no annotations; run `hspace annotate")
    assert not (bare / "layers").exists()


@pytest.mark.slow
def test_layers_on_a_guided_sd_run_capture_the_conditional_half(oracle_dir, tmp_path):
    """On the SD 1.x test pipeline under guidance 3, the layer map's h at the mid block is what
    the sampler stored for the run (the conditional half of each [uncond; cond] pass)."""
    from hspace.data.layers import LayerStore
    from hspace.data.stores import SampleStore
    from tests.sd_fixtures import save_tiny_sd
    from tests.test_sd import PROMPTS
    from tests.test_sd import hspace as cli

    folder = save_tiny_sd(tmp_path / "sd1", "sd1")
    run = tmp_path / "run"
    args = ("--n", "12", "--steps", "3", "--batch-size", "6", "--device", "cpu", "--guidance-scale", "3")
    assert cli("sample", "--model", folder, "--prompts", PROMPTS, *args, "--out", run).exit_code == 0
    oracle = f"oracle:{oracle_dir}"
    assert cli("annotate", run, "--annotator", oracle, "--device", "cpu").exit_code == 0
    small = ("--samples", "8", "--components", "1", "--n", "2", "--calibration-n", "2", "--device", "cpu")
    r = cli("layers", run, "--points", "down_blocks.1,mid_block", "--attributes", "Smiling", "--evaluator", oracle,
            *small)  # fmt: skip
    assert r.exit_code == 0, r.output
    stored = np.asarray(SampleStore(run / "samples.zarr").h[:8], np.float32)
    np.testing.assert_allclose(LayerStore(run / "layers" / "h.zarr").read("mid_block"), stored, rtol=0, atol=2e-3)
