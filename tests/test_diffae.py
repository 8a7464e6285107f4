"""toy-diffae (hcore/diffae.py, data/toy/train_diffae.py, data/diffae.py): training resumes to the
weights of an unbroken run; the folder it writes loads through diffusers' own U-Net loader; the
decoder conditioned on z_sem, run by hspace's sampler, equals a DDIM loop written against
diffusers' DDIMScheduler; bad folders are refused with one line."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from hspace.data.catalog import RunError
from hspace.data.diffae import load_diffae
from hspace.data.toy.train_diffae import DiffAERecipe, train_diffae
from hspace.hcore.diffae import decode

TINY = {"batch_size": 4, "checkpoint_every": 2, "latent_n": 512, "encoder_channels": (8, 8, 8),
        "block_out_channels": (8, 16, 16), "attention": False, "z_dim": 16}  # fmt: skip


def test_training_resumes_to_the_weights_of_an_unbroken_run(tmp_path):
    quiet = lambda line: None  # noqa: E731
    full = DiffAERecipe(**TINY, steps=4, latent_steps=4)
    train_diffae(tmp_path / "a", tmp_path / "out_a", full, report=quiet)
    train_diffae(tmp_path / "b", tmp_path / "out_b", DiffAERecipe(**TINY, steps=2, latent_steps=4), report=quiet)
    state = train_diffae(tmp_path / "b", tmp_path / "out_b", full, report=quiet)
    assert state["step"] == 4 and state["stats_at"] == 4  # the codes' statistics taken again after phase 1 went on
    for name in ("encoder.safetensors", "latent.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "out_a" / name), load_file(tmp_path / "out_b" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name} {key}")
    with pytest.raises(RunError, match="holds a toy-diffae run of another recipe"):
        train_diffae(tmp_path / "b", tmp_path / "out_c", DiffAERecipe(**{**TINY, "z_dim": 8}, steps=6), report=quiet)


def test_the_conditioned_decoder_is_ddim_as_diffusers_steps_it(tmp_path):
    recipe = DiffAERecipe(**TINY, steps=2, latent_steps=2)
    train_diffae(tmp_path / "ck", tmp_path / "out", recipe, report=lambda line: None)
    model, scheduler, latent, stats = load_diffae(tmp_path / "out")
    assert stats["mean"].shape == (16,) and latent.z_dim == 16
    gen = torch.Generator().manual_seed(0)
    x_T, z = torch.randn(3, 3, 32, 32, generator=gen), torch.randn(3, 16, generator=gen)
    ours = decode(model, scheduler, x_T, z, 5)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(5)
    x = x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            eps = model.unet(x, t, class_labels=model.z_to_emb(z)).sample
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)
    other = decode(model, scheduler, x_T, torch.zeros_like(z), 5)
    assert (other - ours).abs().max() > 1e-3  # z_sem reaches the decoder


def test_a_folder_that_is_no_diffusion_autoencoder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="is no diffusion-autoencoder folder"):
        load_diffae(tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy-diffae", "toy-hdae"])
def test_the_shipped_toy_diffae_reconstructs_held_out_renders_keeping_their_factors(name):
    """Encode, invert conditioned on z_sem (eq. (14)), decode: 32 held-out renders come back at
    PSNR >= 28 dB and the oracle reads every binary factor of at least 30 of them the same way,
    pose within 2 degrees on average (quality.json: the figures on 128); toy-diffae and the
    hierarchical toy-hdae (its code 128 + 32 + 32)."""
    import json

    from hspace.data.diffae import SHIPPED
    from hspace.data.toy.diffae_quality import measure

    q = measure(name, n=32, steps=20)
    assert q["reconstruction"]["psnr_db"] >= 28, q["reconstruction"]
    for factor, value in q["reconstruction"]["oracle_agreement"].items():
        assert value <= 2.0 if factor in ("yaw", "pitch", "roll") else value >= 30 / 32, (factor, value)
    shipped = json.loads((SHIPPED[name] / "quality.json").read_text())
    assert abs(q["reconstruction"]["psnr_db"] - shipped["reconstruction"]["psnr_db"]) < 2.0
    model, _, _, _ = load_diffae(name)
    assert model.encoder.head.out_features == 128 and model.code_dim == {"toy-diffae": 128, "toy-hdae": 192}[name]


@pytest.fixture(scope="module")
def tiny_diffae(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffae") / "out"
    train_diffae(out.parent / "ck", out, DiffAERecipe(**TINY, steps=2, latent_steps=2), report=lambda line: None)
    return out


def test_a_zsem_edit_is_the_moved_code_decoded_from_the_images_own_stochastic_code(tiny_diffae):
    """zsem at gamma: encode, x_T by inversion conditioned on z_sem (eq. (14)), decode
    z + gamma n (normalised units): written out by hand; per-sample strengths; a run's render
    (Replay.render) hands the images over; a pipeline and a wrong size are refused."""
    from hspace.hcore.diffae import stochastic_code
    from hspace.hcore.edits import get
    from hspace.hcore.edits.zsem import CodeDirection
    from hspace.hcore.generator import Replay
    from tests.conftest import tiny_scheduler, tiny_unet

    model, scheduler, _, stats = load_diffae(tiny_diffae)
    normal = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    direction = CodeDirection(normal, model, scheduler, stats, 4)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    method = get("zsem").from_images(images, direction, "Smiling")
    with torch.no_grad():
        raw = model.encoder(images)
        x_T = stochastic_code(model, scheduler, images, raw, 4)
        moved = raw + 3.0 * normal * stats["std"]  # gamma 3 in normalised units is 3 std per unit of n
        by_hand = decode(model, scheduler, x_T, moved, 4)
        recon = decode(model, scheduler, x_T, raw, 4)
    torch.testing.assert_close(method.action(3.0).images(), by_hand, rtol=0, atol=1e-4)
    torch.testing.assert_close(method.action(0.0).images(), recon, rtol=0, atol=1e-4)
    rows = method.action(torch.tensor([0.0, 3.0, 0.0])).images()
    torch.testing.assert_close(rows[1], by_hand[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(rows[0], recon[0], rtol=0, atol=1e-4)
    assert (by_hand - recon).abs().max() > 1e-3
    import copy

    with pytest.raises(ValueError, match="a direction of another autoencoder"):
        method.with_edit(CodeDirection(normal, copy.deepcopy(model), scheduler, stats, 4))
    flipped = method.with_edit(CodeDirection(-normal, model, scheduler, stats, 4))  # the same encoding, reused
    moved_back = raw - 3.0 * normal * stats["std"]
    with torch.no_grad():
        torch.testing.assert_close(flipped.action(3.0).images(), decode(model, scheduler, x_T, moved_back, 4),
                                   rtol=0, atol=1e-4)  # fmt: skip
    # a run's samples: Replay.render gives the method's images, the run's model is not sampled
    unet, sched = tiny_unet(sample_size=32), tiny_scheduler()
    replay = Replay(seed=0, steps=3, eta=0.0)
    made = get("zsem").from_replay(replay, unet, sched, [0, 1], direction, "Smiling")
    own = replay.render(unet, sched, [0, 1])
    again = get("zsem").from_images(own, direction).action(2.0).images()
    torch.testing.assert_close(replay.render(unet, sched, [0, 1], edit=made.action(2.0)), again, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="gives finished images only, not stop_before"):
        replay.render(unet, sched, [0, 1], edit=made.action(2.0), stop_before=1)
    with pytest.raises(ValueError, match="encodes 3 x 32 x 32 images, got"):
        get("zsem").from_images(torch.zeros(1, 3, 16, 16), direction)
    from diffusers import DDIMPipeline

    import hspace

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
    with pytest.raises(hspace.DirectionMismatch, match="decodes with a model of its own"):
        with hspace.apply(pipe, method=made, gamma=1.0):
            pipe(batch_size=1, num_inference_steps=3)


def test_a_zsem_file_is_refused_on_another_autoencoder(tiny_diffae, tmp_path):
    """The file records its autoencoder's fingerprint: retrained weights in that folder are
    refused with one line; a run's model is not asked (any model's images are encoded)."""
    import shutil

    from hspace.data import directions as dirfile
    from hspace.data.diffae import diffae_fingerprint

    folder = tmp_path / "ae"
    shutil.copytree(tiny_diffae, folder)
    path = tmp_path / "zsem" / "Male.safetensors"
    meta = {"method": "zsem", "attribute": "Male", "diffae": str(folder), "diffae_steps": 4,
            "diffae_fingerprint": diffae_fingerprint(folder), "model": "f" * 64}  # fmt: skip
    dirfile.save_trained(path, {"normal": torch.ones(16) / 4}, meta)
    cls, trained, _ = dirfile.load_trained(path, "0" * 64, 10)  # another run's model: fine
    assert cls.name == "zsem" and trained.steps == 4 and float(trained.normal.norm()) == pytest.approx(1.0)
    enc = load_file(folder / "encoder.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in enc.items()}, folder / "encoder.safetensors")
    with pytest.raises(RunError, match="a direction in the code of another autoencoder"):
        dirfile.load_trained(path, None, None)


@pytest.fixture(scope="module")
def coded(prefect_server, tmp_path_factory):
    """The shipped toy model, 64 samples of 10 steps, annotated by the oracle; `hspace diffae`
    with the shipped toy-diffae (20 steps) on the first 48 (Wearing_Hat; PADA for Young, 100 steps),
    scored on the last 16."""
    from tests.test_toy_pipeline import hspace as cli

    out = tmp_path_factory.mktemp("diffae-run") / "run"
    cli("sample", "--model", "toy", "--n", "64", "--steps", "10", "--batch-size", "64", "--device", "cpu",
        "--out", out)  # fmt: skip
    cli("annotate", out, "--device", "cpu")
    r = cli("diffae", out, "--samples", "48", "--held-out", "16", "--attributes", "Wearing_Hat", "--k", "8,128",
            "--pada-steps", "100", "--device", "cpu")  # fmt: skip
    return out, r.output


MARGIN = {"Wearing_Hat": 0.4}  # oracle, mean own change on the 16 held-out samples at gamma 16 or 32 (the better)


@pytest.mark.slow
def test_zsem_directions_move_their_attribute_on_held_out_seeds(coded, tmp_path):
    """DiffAE's normal and HDAE's sparse one, found on the run's labelled samples, each move its
    attribute on held-out seeds by MARGIN; gamma 0 (the reconstruction) keeps it within 0.1; PADA
    trains and edits; the probes of z_sem and h are written; `hspace compare` finds the methods."""
    import json

    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.catalog import RunFolder
    from hspace.tasks.compare import findings

    run, output = coded
    assert "diffae: done" in output and "z_sem directions at gamma 16: Wearing_Hat (" in output, output
    for name, margin in MARGIN.items():
        for method in ("zsem", "zsem-sparse"):
            path = run / "directions" / method / f"{name}.safetensors"
            cls, trained, meta = dirfile.load_trained(path, None, None)
            sweep = json.loads(meta["gamma_sweep"])
            assert cls.name == method and max(sweep[g][name] for g in ("16", "32")) >= margin, (method, name, sweep)
            assert abs(sweep["0"][name]) <= 0.1, (method, name, sweep["0"])
            assert path.with_suffix(".png").stat().st_size > 1000
        k_sweep = json.loads(meta["k_sweep"])
        assert set(k_sweep) == {"8", "128"} and int(meta["k"]) in (8, 128)
        assert int((trained.normal != 0).sum()) == int(meta["k"])
    cls, age, meta = dirfile.load_trained(run / "directions" / "pada" / "Young.safetensors", None, None)
    sweep = json.loads(meta["gamma_sweep"])  # PADA trained, loads with its CLIP, and its edit changes the image
    assert cls.name == "pada" and meta["target"] == "A young person" and set(sweep) == {"0", "1", "2", "4"}
    assert max(abs(v) for s in ("1", "2", "4") for v in sweep[s].values()) > 0.01, sweep
    probe = json.loads(dirfile.code_probe_file(RunFolder(run)).read_text())
    assert set(probe["probe_accuracy"]) == {"z_sem", "h"} and probe["probe_accuracy"]["z_sem"]["Wearing_Hat"] > 0.7
    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta)
    # a photo (a held-out render saved as PNG) edited in the code: no --model, the autoencoder is the model
    from PIL import Image

    from hspace.hcore.sampler import to_uint8
    from tests.test_toy_pipeline import hspace as cli

    photo = tmp_path / "face.png"
    image = to_uint8(models.replay_for_run(meta).render(unet, scheduler, [60]))[0].numpy().transpose(1, 2, 0)
    Image.fromarray(image).save(photo)
    hat = f"zsem:weights={run}/directions/zsem/Wearing_Hat"
    r = cli("edit", "--image", photo, "--edit-method", hat, "--scales", "0,16", "--out", tmp_path / "p.png")
    assert "reconstruction without edit (toy-diffae: encoded, DDIM-inverted" in r.output, r.output
    cells = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    assert cells == ["face__zsem__gamma+0.png", "face__zsem__gamma+16.png"], cells
    from typer.testing import CliRunner

    from hspace.flows.cli import app

    r = CliRunner().invoke(app, ["edit", "--image", str(photo), "--model", "toy", "--edit-method", hat])
    assert r.exit_code != 0 and "brings its own model (an autoencoder): drop --model" in r.output, r.output
    found = findings(RunFolder(run), meta, "Wearing_Hat", models.replay_for_run(meta), unet, scheduler)
    assert {"zsem", "zsem-sparse"} <= set(found) and "pada" not in found  # PADA edits Young only


@pytest.mark.slow
def test_diffae_bad_input_is_one_line_before_any_work(coded, tmp_path):
    from typer.testing import CliRunner

    from hspace.flows.cli import app

    run, _ = coded
    before = sorted(p.name for p in (run / "directions").rglob("*"))
    r = CliRunner().invoke(app, ["diffae", str(run), "--samples", "60", "--device", "cpu"])
    assert r.exit_code != 0 and "exceed the run's 64 samples" in r.output, r.output
    r = CliRunner().invoke(app, ["diffae", str(run), "--model", str(tmp_path), "--samples", "8", "--device", "cpu"])
    assert r.exit_code != 0 and "is no diffusion-autoencoder folder" in r.output, r.output
    r = CliRunner().invoke(app, ["diffae", str(run), "--attributes", "Beard", "--samples", "8", "--device", "cpu"])
    assert r.exit_code != 0 and "Beard not in the run's annotations" in r.output, r.output
    assert sorted(p.name for p in (run / "directions").rglob("*")) == before


def test_pada_kl_is_eq_8_and_its_edit_decodes_z_age(tiny_diffae, clip_dir):
    """eq. (8)'s closed form against torch.distributions; at initialisation eq. (11) is the
    source code's instance normalisation; a few training steps move the networks; the pada
    method at strength 1 decodes z_age from the image's own x_T, at 0 the reconstruction."""
    from torch.distributions import Normal, kl_divergence

    from hspace.data.annotators import load_clip_guide
    from hspace.hcore.diffae import stochastic_code
    from hspace.hcore.edits import get
    from hspace.hcore.edits.zsem import AgeEdit
    from hspace.hcore.pada import Pada, kl_to_text, train_pada

    gen = torch.Generator().manual_seed(0)
    text, mu, log_sigma = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(3, 8) * 0.3
    e = torch.nn.functional.normalize(text, dim=-1)
    expected = kl_divergence(Normal(e, torch.ones_like(e)), Normal(mu, log_sigma.exp())).sum(-1)
    torch.testing.assert_close(kl_to_text(text, mu, log_sigma), expected, rtol=1e-5, atol=1e-5)

    model, scheduler, _, stats = load_diffae(tiny_diffae)
    guide = load_clip_guide(str(clip_dir))
    texts = guide.text(["an old person", "a young person"])
    pada = Pada(texts.shape[1], 16, hidden=32)
    z = torch.randn(6, 16, generator=gen)
    z_age, kl = pada(z, texts[[1] * 6], torch.randn(6, texts.shape[1], generator=gen), generator=gen)
    torch.testing.assert_close(z_age, (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True), rtol=1e-5, atol=1e-5)
    images = torch.rand(6, 3, 32, 32, generator=gen) * 2 - 1
    before = {k: v.clone() for k, v in pada.state_dict().items()}
    losses = train_pada(pada, model, scheduler, guide, images, z, stats, torch.tensor([0, 1, 0, 1, 1, 0]), texts,
                        steps=3, batch_size=4)  # fmt: skip
    assert set(losses) == {"age", "identity", "normalisation", "reconstruction", "kl"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any((pada.state_dict()[k] - v).abs().max() > 0 for k, v in before.items())
    edit = AgeEdit(pada, texts[1], torch.randn(texts.shape[1], generator=gen), model, scheduler, stats, 4)
    made = get("pada").from_images(images[:2], edit, "Young")
    with torch.no_grad():
        raw = model.encoder(images[:2])
        x_T = stochastic_code(model, scheduler, images[:2], raw, 4)
        by_hand = decode(model, scheduler, x_T, made.z_age * stats["std"] + stats["mean"], 4)
    torch.testing.assert_close(made.action(1.0).images(), by_hand, rtol=0, atol=1e-4)
    torch.testing.assert_close(made.action(0.0).images(), decode(model, scheduler, x_T, raw, 4), rtol=0, atol=1e-4)
    other = get("pada").from_images(images[:2], AgeEdit(**{**vars(edit), "seed": 1}), "Young")
    assert (other.z_age - made.z_age).abs().max() > 0  # another e_age draw (eq. (9)): another plausible age


def test_the_run_config_check_finds_a_bad_diffae_section(tmp_path):
    """`hspace run`'s whole-config check: too many samples, an autoencoder of another image
    size, a folder that is none, a PADA text toy-clip does not know: one line each."""
    from hspace.tasks.config import RunConfig
    from hspace.tasks.diffae import config_problems

    def found(section, size=32):
        return config_problems(RunConfig.model_validate({"sample": {"n": 64}, "diffae": section}), size)

    assert found({"samples": 48}) == []
    assert any("exceed the run's 64 samples" in p for p in found({"samples": 60}))
    assert any("encodes 32 px images, the run's are 64 px" in p for p in found({"samples": 48}, 64))
    assert any("is no diffusion-autoencoder folder" in p for p in found({"samples": 48, "model": str(tmp_path)}))
    assert any("diffae.clip:" in p for p in found({"samples": 48, "pada_texts": ["a person", "a zebra person"]}))
    assert found({"samples": 48, "pada_attribute": "none", "pada_texts": ["a zebra", "a yak"]}) == []


@pytest.fixture(scope="module")
def hier_coded(coded):
    """`hspace diffae` on the same run with the shipped hierarchical toy-hdae (no PADA)."""
    from tests.test_toy_pipeline import hspace as cli

    run, _ = coded
    r = cli("diffae", run, "--model", "toy-hdae", "--pada-attribute", "none", "--samples", "48", "--held-out", "16",
            "--attributes", "Wearing_Hat", "--k", "8,160", "--device", "cpu")  # fmt: skip
    return run, r.output


@pytest.mark.slow
def test_hdae_directions_read_the_hierarchical_code_and_move_their_attribute(hier_coded):
    """HDAE (toy-hdae: codes of three encoder levels): the dense normal and HDAE's sparse one
    are saved as hdae-dense and hdae beside the flat autoencoder's files, move Wearing_Hat on
    held-out seeds by MARGIN, record how the normal's weight falls on the levels (shares summing
    to 1) and where the kept k sit; the probe reads each level alone; compare finds both; PADA
    on the hierarchical code is refused with one line before any work."""
    import json

    from typer.testing import CliRunner

    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.catalog import RunFolder
    from hspace.flows.cli import app
    from hspace.tasks.compare import findings

    run, output = hier_coded
    assert "diffae: done" in output and "Wearing_Hat (" in output, output
    for method in ("hdae-dense", "hdae"):
        path = run / "directions" / method / "Wearing_Hat.safetensors"
        cls, trained, meta = dirfile.load_trained(path, None, None)
        sweep = json.loads(meta["gamma_sweep"])
        assert cls.name == method and meta["diffae"] == "toy-hdae" and trained.normal.shape == (192,)
        assert max(sweep[g]["Wearing_Hat"] for g in ("16", "32")) >= MARGIN["Wearing_Hat"], (method, sweep)
        assert abs(sweep["0"]["Wearing_Hat"]) <= 0.1, sweep["0"]
        shares = json.loads(meta["level_shares"])
        assert set(shares) == {"4px (deepest)", "16px", "8px"} and abs(sum(shares.values()) - 1) < 1e-6
    kept = json.loads(meta["kept_per_level"])
    assert sum(kept.values()) == int(meta["k"]) == int((trained.normal != 0).sum())
    assert (run / "directions" / "zsem" / "Wearing_Hat.safetensors").exists()  # the flat autoencoder's stay
    probe = json.loads(dirfile.code_probe_file(RunFolder(run), "hdae").read_text())
    assert {"z_sem", "h", "z_sem 16px", "z_sem 8px", "z_sem 4px (deepest)"} == set(probe["probe_accuracy"])
    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta)
    found = findings(RunFolder(run), meta, "Wearing_Hat", models.replay_for_run(meta), unet, scheduler)
    assert {"hdae", "hdae-dense", "zsem"} <= set(found)
    before = sorted(p.name for p in (run / "directions").rglob("*"))
    r = CliRunner().invoke(app, ["diffae", str(run), "--model", "toy-hdae", "--samples", "8", "--device", "cpu"])
    assert r.exit_code != 0 and "PADA edits a flat z_sem (toy-diffae)" in r.output, r.output
    assert sorted(p.name for p in (run / "directions").rglob("*")) == before
