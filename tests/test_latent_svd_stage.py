"""`hspace sample --store-xt` and `hspace latent-svd` through the CLI: x_t stored as the sampler
holds it, the stored SVD against numpy's on the stored x_t, the properties and figures written
and reloaded, bad input refused before any work with nothing written; on toy-sd (latent, text,
guidance) too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from hspace.data.catalog import RunFolder
from hspace.data.stores import LatentSvdStore, SampleStore
from hspace.flows.cli import app

runner = CliRunner()


def hspace(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def toy_run(prefect_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("lsvd") / "run"
    r = hspace("sample", "--model", "toy", "--n", "12", "--steps", "6", "--store-xt", "--out", run, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return run


@pytest.mark.slow  # the module's run takes 15 s to sample: the quick tier keeps hcore's SVD tests
def test_stored_xt_is_the_samplers(toy_run):
    """xt[i, t] is x_t before step t's U-Net pass (step 0: the seed's x_T), float16."""
    from hspace.data import models
    from hspace.hcore.sampler import draw_noise

    meta = RunFolder(toy_run).read()
    assert meta["config"]["store_xt"] is True
    xt = SampleStore(RunFolder(toy_run).samples).group["xt"]
    h = SampleStore(RunFolder(toy_run).samples).h
    assert xt.shape == (12, 6, 3, 32, 32) and xt.dtype == np.float16
    assert (xt.chunks[:2], xt.shards[:2]) == (h.chunks[:2], h.shards[:2]) == ((64, 1), (64, 6))  # chunked like h
    unet, scheduler = models.load_for_run(meta)
    replay = models.replay_for_run(meta)
    for t in (0, 3, 5):
        x_t = replay.render(unet, scheduler, [2, 7], stop_before=t).numpy()
        np.testing.assert_allclose(np.asarray(xt.oindex[[2, 7], t]), x_t, rtol=2e-3, atol=2e-3)
    x_T = draw_noise(replay.generators([2]), (3, 32, 32)).numpy()
    np.testing.assert_allclose(np.asarray(xt[2, 0]), x_T[0], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_latent_svd_stage_on_toy(toy_run):
    r = hspace("latent-svd", toy_run, "--k", "4", "--probe-n", "6", "--probe-indices", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "neighbourhood" in r.output
    store = LatentSvdStore(RunFolder(toy_run).latent_svd)
    xt = np.asarray(SampleStore(RunFolder(toy_run).samples).group["xt"]).astype(np.float64)
    for variant, mats in (("channel", xt), ("flat", xt.reshape(12, 6, 1, 96, 32))):
        s, u, vh = (np.asarray(a) for a in store.arrays(variant))
        ns = np.linalg.svd(mats, compute_uv=False)[..., :4]
        np.testing.assert_allclose(s, ns, rtol=1e-4, atol=1e-4)  # numpy's SVD of the stored x_t
        rebuilt = np.einsum("...ni,...i,...im->...nm", u, s, vh)  # the top-4 part of each matrix
        nu, nss, nvh = np.linalg.svd(mats, full_matrices=False)
        by_numpy = np.einsum("...ni,...i,...im->...nm", nu[..., :4], nss[..., :4], nvh[..., :4, :])
        np.testing.assert_allclose(rebuilt, by_numpy, atol=2e-3)
    props = json.loads(store.file("properties.json").read_text())
    assert props["k"] == 4 and len(props["effects_mean"]) == 6 and len(props["effects_mean"][0]) == 2
    assert len(props["transplant_slopes"]) == 3
    hood = props["neighbourhood"]
    assert len(hood["adjacent"]) == 5 and 0 < hood["random"] < hood["max"]
    np.testing.assert_allclose(np.diag(hood["steps"]), 0, atol=1e-3)  # arccos near 1: float32 bases
    # the largest singular value per step, by numpy, averaged over samples and channels
    np.testing.assert_allclose(props["sigma_max"], np.linalg.svd(xt, compute_uv=False)[..., 0].mean((0, 2)), rtol=1e-3)
    for name in ("neighbourhood.png", "effects.png"):
        assert Image.open(store.file(name)).size[0] > 300
    assert zarr.open_group(store.zarr, mode="r").attrs["k"] == 4
    from hspace.tasks.report import write_report  # the report shows it

    page = write_report(RunFolder(toy_run)).read_text()
    assert "id='latent-svd'" in page and "small neighbourhood" in page


@pytest.mark.slow
def test_bad_input_is_refused_before_any_work(toy_run, tmp_path):
    before = sorted(p.name for p in RunFolder(toy_run).root.iterdir())
    for args, message in (
        (("--k", "40"), "k must be <= 32"),
        (("--probe-n", "99"), "latent_svd.probe_n = 99: the run has 12 samples"),
        (("--k", "2", "--probe-indices", "3"), "probe_indices = 3 exceeds k = 2"),
    ):
        r = hspace("latent-svd", toy_run, *args, "--device", "cpu")
        assert r.exit_code != 0 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in RunFolder(toy_run).root.iterdir()) == before
    plain = tmp_path / "plain"
    r = hspace("sample", "--model", "toy", "--n", "4", "--steps", "3", "--out", plain, "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = hspace("latent-svd", plain, "--device", "cpu")
    assert r.exit_code != 0 and "holds no x_t: sample with `--store-xt`" in r.output
    assert not RunFolder(plain).latent_svd.exists()


@pytest.mark.slow
def test_latent_svd_on_toy_sd(prefect_server, tmp_path):
    """toy-sd: x_t is the 4 x 8 x 8 latent; the probes continue with the prompt and guidance."""
    run = tmp_path / "sd"
    steps = ("--steps", "4", "--guidance-scale", "4", "--prompt", "a person")
    r = hspace("sample", "--model", "toy-sd", "--n", "6", *steps, "--store-xt", "--out", run, "--device", "cpu")
    assert r.exit_code == 0, r.output
    xt = SampleStore(RunFolder(run).samples).group["xt"]
    assert xt.shape[:3] == (6, 4, 4)
    r = hspace("latent-svd", run, "--k", "3", "--probe-n", "3", "--probe-indices", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    s, _, _ = LatentSvdStore(RunFolder(run).latent_svd).arrays("channel")
    ns = np.linalg.svd(np.asarray(xt).astype(np.float64), compute_uv=False)[..., :3]
    np.testing.assert_allclose(np.asarray(s), ns, rtol=1e-4, atol=1e-4)
    props = json.loads(LatentSvdStore(RunFolder(run).latent_svd).file("properties.json").read_text())
    effects = np.array(props["effects_mean"])
    assert effects.shape[:2] == (4, 2) and np.abs(effects).max() > 0


@pytest.mark.slow
def test_sv_scale_with_settings_in_table_1(toy_run):
    """evaluate.methods ["sv-scale:index=0:step=2"]: a Table 1 row equal to the explicit restart
    (x_2 stopped, sigma_0 scaled by numpy's SVD, resumed), scored by the oracle by hand."""
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.hcore.latent_svd import scale_singular_values
    from hspace.tasks.evaluate import run_evaluation

    spec = "sv-scale:index=0:step=2"
    run_evaluation(str(toy_run), [], methods=[spec], n=4, gamma=0.5, evaluator="oracle", log=lambda line: None)
    table = (RunFolder(toy_run).eval / "leakage_original.csv").read_text().splitlines()
    assert table[1].startswith(spec + ",")
    meta = RunFolder(toy_run).read()
    unet, scheduler = models.load_for_run(meta)
    replay = models.replay_for_run(meta)
    idx = [0, 1, 2, 3]
    start = scale_singular_values(replay.render(unet, scheduler, idx, stop_before=2), 0, 1.5)
    net = load_annotator("oracle")
    edited = net.score(replay.render(unet, scheduler, idx, x_T=start, start_at=2))
    by_hand = (edited - net.score(replay.render(unet, scheduler, idx))).mean(0).numpy()
    np.testing.assert_allclose([float(x) for x in table[1].split(",")[1:]], by_hand, atol=2e-5)
