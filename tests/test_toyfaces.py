"""The toy world: renderer determinism, factor ranges, the documented joint distribution,
the oracle annotator interface, and the training flow's checkpoint/resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hspace.data.catalog import RunError
from hspace.data.toy import faces as toyfaces
from hspace.data.toy import recipe as toy


def test_render_is_deterministic_and_batch_independent():
    a, fa = toyfaces.render(1234)
    b, fb = toyfaces.render(1234)
    np.testing.assert_array_equal(a, b)
    assert fa == fb
    batch, factors = toyfaces.render_batch([7, 1234, 99])
    np.testing.assert_array_equal(batch[1], a)
    assert factors.row(1) == fa
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert not np.array_equal(batch[0], batch[2])


def test_factor_ranges():
    f = toyfaces.draw_factors(np.arange(3000))
    for name in toyfaces.POSE_ATTRIBUTES:
        values = getattr(f, name)
        assert np.abs(values).max() <= toyfaces.POSE_LIMIT[name]
        assert values.std() > 0.5 * toyfaces.POSE_STD[name]
    assert ((f.smile >= 0.6) == f.Smiling).all() and f.smile.min() >= 0 and f.smile.max() <= 1
    assert set(np.unique(f.hair_colour)) == set(range(len(toyfaces.HAIR_COLOURS)))
    assert (f.background >= 0).all() and (f.background <= 1).all()
    assert f.labels().shape == (3000, len(toyfaces.ATTRIBUTES))


def test_joint_distribution_on_10k():
    f = toyfaces.draw_factors(np.arange(10_000))  # exactly the factors render_batch paints
    male, young, glasses, hat = f.Male, f.Young, f.Eyeglasses, f.Wearing_Hat
    assert abs(young.mean() - 0.70) < 0.02
    assert abs(glasses.mean() - 0.236) < 0.02 and abs(hat.mean() - 0.265) < 0.02
    assert glasses[~young].mean() / glasses[young].mean() > 5  # documented 7.5
    assert hat[male].mean() / hat[~male].mean() > 4  # documented 5.6
    phi = np.corrcoef(male.astype(float), young.astype(float))[0, 1]
    assert -0.3 < phi < -0.14  # documented -0.22
    assert abs(np.corrcoef(f.Smiling.astype(float), male.astype(float))[0, 1]) < 0.05


def test_attributes_are_visible():
    """Each binary factor changes the pixels: flip it with everything else fixed."""
    f = toyfaces.draw_factors([5])
    base = toyfaces.paint(f)
    for name in toyfaces.BINARY_ATTRIBUTES:
        flipped = toyfaces.Factors(**{**f.__dict__, name: ~getattr(f, name)})
        if name == "Smiling":
            flipped = toyfaces.Factors(**{**flipped.__dict__, "smile": 1.0 - f.smile})
        diff = np.abs(toyfaces.paint(flipped).astype(int) - base).sum(-1)
        assert (diff > 30).sum() >= 6, name


def test_oracle_interface_roundtrip(tmp_path):
    from hspace.data.annotators import load_annotator, save_oracle
    from hspace.hcore.annotators import OracleNet

    torch.manual_seed(0)
    net = OracleNet(list(toyfaces.BINARY_ATTRIBUTES), list(toyfaces.POSE_ATTRIBUTES), width=8).eval()
    save_oracle(net, tmp_path / "oracle")
    loaded = load_annotator(f"oracle:{tmp_path / 'oracle'}")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    scores = loaded.score(x)
    torch.testing.assert_close(scores, net.score(x))
    assert scores.shape == (4, 8) and loaded.names == toyfaces.ATTRIBUTES
    assert ((scores[:, :5] >= 0) & (scores[:, :5] <= 1)).all()
    assert loaded.score(torch.rand(2, 3, 16, 16)).shape == (2, 8)  # resized internally


def test_shipped_oracle_accuracy_on_fresh_renders():
    from hspace.data.annotators import ORACLE_DIR, load_annotator
    from hspace.data.toy.train import oracle_accuracy

    if not (ORACLE_DIR / "oracle.safetensors").exists():
        pytest.fail("the shipped oracle is missing from data/oracle; run `hspace train-toy --oracle-out data/oracle`")
    style = json.loads((ORACLE_DIR / "config.json").read_text()).get("style", "v1")  # the renders it reads
    metrics = oracle_accuracy(load_annotator("oracle"), n=400, first_seed=3 << 40, style=style)  # never seen
    for name in toyfaces.BINARY_ATTRIBUTES:
        assert metrics[name] >= 0.95, metrics
    for name in toyfaces.POSE_ATTRIBUTES:
        assert metrics[f"{name}_mae"] <= 6.0, metrics


TINY = dict(block_out_channels=(8, 16), layers_per_block=1, batch_size=4, checkpoint_every=2, warmup=2)


def test_training_checkpoints_and_resumes_step_for_step(tmp_path):
    from hspace.data.toy.train import train_toy_model

    straight = train_toy_model(tmp_path / "a", toy.ToyRecipe(**TINY, steps=4))
    train_toy_model(tmp_path / "b", toy.ToyRecipe(**TINY, steps=2))
    assert toy.load_checkpoint(tmp_path / "b")[3] == 2
    resumed = train_toy_model(tmp_path / "b", toy.ToyRecipe(**TINY, steps=4))
    assert straight == resumed == 4
    a, b = toy.load_checkpoint(tmp_path / "a"), toy.load_checkpoint(tmp_path / "b")
    for name in ("unet", "ema"):
        sa, sb = (a[0] if name == "unet" else a[1]).state_dict(), (b[0] if name == "unet" else b[1]).state_dict()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=f"{name}.{key}")
    with pytest.raises(ValueError, match=r"another recipe \(block_out_channels"):
        train_toy_model(tmp_path / "b", toy.ToyRecipe(**{**TINY, "block_out_channels": (16, 16)}, steps=6))
    with pytest.raises(ValueError, match="style 'v1' -> 'v2'"):  # other renders: not a resume
        train_toy_model(tmp_path / "b", toy.ToyRecipe(**{**TINY, "style": "v2"}, steps=6))
    # with skip dropout too: the masks are a function of the step, a resume is the same run
    dropped = {**TINY, "skip_dropout": 0.5}
    train_toy_model(tmp_path / "c", toy.ToyRecipe(**dropped, steps=4))
    train_toy_model(tmp_path / "d", toy.ToyRecipe(**dropped, steps=2))
    train_toy_model(tmp_path / "d", toy.ToyRecipe(**dropped, steps=4))
    c, d = toy.load_checkpoint(tmp_path / "c"), toy.load_checkpoint(tmp_path / "d")
    for key, value in c[0].state_dict().items():
        torch.testing.assert_close(value, d[0].state_dict()[key], atol=0, rtol=0, msg=key)
    assert any(not torch.equal(v, a[0].state_dict()[k]) for k, v in c[0].state_dict().items())  # it did something


@pytest.mark.parametrize("shape,dtype", [("levels3", torch.float32), ("attn2", torch.bfloat16)])
def test_skip_dropout_zeroes_the_deepest_skips_of_dropped_samples_only(shape, dtype):
    """SkipDropout (consumer side: pre-hooks on the deepest up blocks) against an
    independent reference: forward hooks on the producers (the down blocks) that zero the
    skip copies those up blocks read, leaving the hidden path intact; on an attention-free
    UNet in float32 and on one with attention at two levels in bfloat16."""
    from diffusers import UNet2DModel

    from hspace.hcore.training import SkipDropout
    from tests.test_real_shapes import ATTN2, LEVELS3  # three levels, one resnet each

    torch.manual_seed(0)
    config = {"levels3": LEVELS3, "attn2": ATTN2}[shape]
    unet = UNet2DModel(**{**config, "sample_size": 16}).to(dtype).train()
    x, t = torch.randn(2, 3, 16, 16, dtype=dtype), torch.tensor([10, 500])
    with torch.no_grad():
        plain = unet(x, t).sample
        # up_blocks[0] reads (down1's downsample, down2's resnet), up_blocks[1] (down0's downsample, down1's resnet)
        zero_all = lambda m, a, out: (out[0], tuple(torch.zeros_like(r) for r in out[1]))  # noqa: E731
        zero_last = lambda m, a, out: (out[0], (*out[1][:-1], torch.zeros_like(out[1][-1])))  # noqa: E731
        handles = [
            unet.down_blocks[2].register_forward_hook(zero_all),
            unet.down_blocks[1].register_forward_hook(zero_all),
            unet.down_blocks[0].register_forward_hook(zero_last),
        ]
        reference = unet(x, t).sample
        for h in handles:
            h.remove()
        drop = SkipDropout(unet, 0.5, levels=2)
        assert torch.equal(unet(x, t).sample, plain)  # no mask drawn yet: a plain forward
        drop.keep = torch.tensor([1.0, 0.0])
        out = unet(x, t).sample
        assert not torch.allclose(reference[1], plain[1])
        torch.testing.assert_close(out[0], plain[0])
        torch.testing.assert_close(out[1], reference[1])
        torch.testing.assert_close(unet.eval()(x, t).sample, plain, atol=0, rtol=0)  # sampling: no dropout
        drop.remove()
    with pytest.raises(ValueError, match="levels must be in"):
        SkipDropout(unet, 0.5, levels=3)
    draws = [SkipDropout(unet, 0.25) for _ in range(2)]
    for d in draws:
        d.draw(4000, torch.Generator().manual_seed(1))
    assert torch.equal(draws[0].keep, draws[1].keep) and abs(draws[0].keep.mean().item() - 0.75) < 0.03


def test_v2_style_changes_only_the_mouth_and_the_glasses():
    """v2 renders differ from v1 only where the mouth or the glasses are drawn, and the
    smiling mouth changes most (it opens 1.6x further)."""
    f = toyfaces.draw_factors(np.arange(400))
    changed = (toyfaces.paint(f, style="v1") != toyfaces.paint(f, style="v2")).any(-1)  # (N, 32, 32)
    upright = (np.abs(f.roll) < 5) & (np.abs(f.pitch) < 5)
    rows = np.nonzero(changed[upright & ~f.Eyeglasses].any(axis=(0, 2)))[0]
    assert rows.min() >= 14, rows  # no glasses: only the mouth (whose smiling corners reach the eye line)
    eye_rows = changed[upright & f.Eyeglasses & ~f.Smiling][:, 9:18].sum(axis=(1, 2))
    assert (eye_rows > 20).all(), eye_rows  # tinted lenses and thicker rims
    count = changed.sum(axis=(1, 2))
    assert count[f.Smiling & ~f.Eyeglasses].mean() > 2 * count[~f.Smiling & ~f.Eyeglasses].mean()
    with pytest.raises(ValueError, match="unknown toy render style 'v3'"):
        toyfaces.paint(f, style="v3")


def test_recipes_v1_reads_back_and_v2_is_shaped_like_a_real_ddpm(tmp_path):
    from hspace.hcore.hooks import h_shape

    shipped = {  # the recipe.json of the v1 model (shipped until v2), older than the attention and style fields
        "image_size": 32,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "batch_size": 32,
        "lr": 0.0005,
        "warmup": 200,
        "ema_decay": 0.999,
        "seed": 0,
        "steps": 5000,
        "checkpoint_every": 250,
    }
    read = toy.recipe_from_dict(shipped)  # an old recipe.json (no attention or style fields) reads as v1
    for field in set(read.__dataclass_fields__) - set(toy.RESUMABLE_FIELDS):
        assert getattr(read, field) == getattr(toy.RECIPES["v1"], field), field
    with pytest.raises(RunError, match="unknown toy recipe field"):
        toy.recipe_from_dict({**shipped, "colour_space": "lab"})
    v2 = toy.RECIPES["v2"]
    unet = toy.build_unet(v2)
    assert h_shape(unet) == (128, 4, 4)  # three downsamplings, as the issue asks
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ]
    assert unet.mid_block.attentions[0] is not None and unet.mid_block.attentions[0].heads == 4
    assert sum(p.numel() for p in unet.parameters()) * 4 <= 30e6  # <= 30 MB of float32 weights
    images = toy.training_batch(toy.ToyRecipe(**{**TINY, "style": "v2"}), 0)
    expected, _ = toyfaces.render_batch(np.arange(4), style="v2")
    assert torch.equal(images, torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 127.5 - 1.0)


def test_train_toy_flow_exports_a_loadable_model(prefect_server, tmp_path):
    from hspace.data import models
    from hspace.flows.train_toy import train_toy_flow
    from hspace.hcore.sampler import make_generators, sample

    recipe = {**toy.ToyRecipe().__dict__, **TINY, "steps": 2}
    result = train_toy_flow(str(tmp_path / "ckpt"), str(tmp_path / "model"), recipe)
    assert result["step"] == 2
    unet, scheduler = models.load(models.resolve(str(tmp_path / "model")))
    x0 = sample(unet, scheduler, make_generators(0, [0]), 3)
    assert x0.shape == (1, 3, 32, 32) and torch.isfinite(x0).all()


def test_shipped_toy_model_loads_like_a_user_folder():
    from hspace.data import models
    from hspace.hcore.hooks import h_shape

    if not (models.TOY_MODEL_DIR / "unet" / "config.json").exists():
        pytest.fail("the shipped toy model is missing from data/toy_model")
    ref = models.resolve("toy")
    assert ref.path == str(models.TOY_MODEL_DIR) and len(ref.fingerprint) == 64
    unet, scheduler = models.load(ref)
    # v2 ships: shaped like a real DDPM, scaled down
    assert h_shape(unet) == (128, 4, 4) and scheduler.config.num_train_timesteps == 1000
    assert unet.mid_block.attentions[0] is not None
    assert [type(b).__name__ for b in unet.down_blocks].count("AttnDownBlock2D") == 1
    weights = models.TOY_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 30e6
    recipe = toy.model_recipe(models.TOY_MODEL_DIR)
    assert recipe.style == "v2" and recipe.skip_dropout > 0 and recipe.block_out_channels == (32, 64, 96, 128)
    from hspace.data.annotators import ORACLE_DIR

    # the shipped oracle reads the renders the shipped model was trained on
    assert json.loads((ORACLE_DIR / "config.json").read_text())["style"] == recipe.style


def test_cosine_decay_schedule():
    from hspace.hcore.training import lr_at

    assert lr_at(99, 1.0, 200) == pytest.approx(0.5)  # warm-up
    assert lr_at(500, 1.0, 200) == 1.0  # constant without decay
    assert lr_at(1000, 1.0, 200, decay_from=1000, total=2000) == pytest.approx(1.0)
    assert lr_at(1500, 1.0, 200, decay_from=1000, total=2000) == pytest.approx(0.5)
    assert lr_at(2000, 1.0, 200, decay_from=1000, total=2000) == pytest.approx(0.0, abs=1e-12)


def test_train_toy_bad_inputs(tmp_path):
    from typer.testing import CliRunner

    from hspace.flows.cli import app

    args = ["train-toy", "--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "m")]
    result = CliRunner().invoke(app, [*args, "--steps", "13250", "--decay-from", "20000"])
    assert result.exit_code == 2 and "--decay-from 20000 must be below the total steps (13250)" in result.output
    result = CliRunner().invoke(app, [*args, "--oracle-out", str(tmp_path / "o"), "--oracle-blur", "2"])
    assert result.exit_code == 2 and "--oracle-blur must be in [0, 1]" in result.output
    assert not (tmp_path / "c").exists()


def test_soften_blends_towards_a_blur():
    from hspace.data.toy.train import soften

    x = torch.zeros(2, 3, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = soften(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0])  # amount 0: unchanged
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    torch.testing.assert_close(out[1, 0, 2:7, 2:7], k1[:, None] * k1[None])  # the binomial kernel itself
    assert float(out[1].sum()) == pytest.approx(3.0)  # blur keeps the mass


def test_train_toy_cli_resumes_with_the_checkpoints_own_recipe(prefect_server, tmp_path):
    """A rerun of `hspace train-toy` without --recipe takes the checkpoint's recipe (here a
    tiny v2-style one), not v1; an unknown --recipe is one line and exit 2."""
    from typer.testing import CliRunner

    from hspace.data.toy.train import train_toy_model
    from hspace.flows.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["train-toy", "--recipe", "v3", "--checkpoint", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "--recipe must be one of v1, v2" in bad.output and not (tmp_path / "c").exists()
    train_toy_model(tmp_path / "c", toy.ToyRecipe(**{**TINY, "style": "v2"}, steps=2))
    ok = runner.invoke(
        app, ["train-toy", "--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "m"), "--steps", "3"]
    )
    assert ok.exit_code == 0, ok.output
    _, _, _, step, recipe = toy.load_checkpoint(tmp_path / "c")
    assert step == 3 and recipe.style == "v2" and recipe.block_out_channels == (8, 16)


def test_feature_boxes_are_the_smallest_holding_the_share():
    """toyfaces.feature_box (the toy world's ROI boxes) against a brute-force search over every
    box of a 16x16 image, on the pixel change of toggling the feature, computed here again."""
    import dataclasses

    n, size, share = 60, 16, 0.9
    f = toyfaces.draw_factors(np.arange(n) + (5 << 40))
    on = dataclasses.replace(f, Smiling=np.ones(n, bool), smile=np.full(n, 0.8, np.float32))
    off = dataclasses.replace(f, Smiling=np.zeros(n, bool), smile=np.full(n, 0.15, np.float32))
    energy = ((toyfaces.paint(on, size, "v2").astype(float) - toyfaces.paint(off, size, "v2")) ** 2).sum((0, 3))
    energy /= energy.sum()
    best = None
    for y0 in range(size):
        for y1 in range(y0 + 1, size + 1):
            for x0 in range(size):
                for x1 in range(x0 + 1, size + 1):
                    area = (y1 - y0) * (x1 - x0)
                    if (best is None or area < best[0]) and energy[y0:y1, x0:x1].sum() >= share:
                        best = (area, (x0, y0, x1, y1))
    box = toyfaces.feature_box("mouth", "v2", size=size, share=share, n=n)
    x0, y0, x1, y1 = box
    assert (x1 - x0) * (y1 - y0) == best[0] and energy[y0:y1, x0:x1].sum() >= share
    assert y0 >= size // 2  # the mouth is in the lower half of the face
    x0, y0, x1, y1 = toyfaces.feature_box("eyes", "v2", size=size, n=n)
    assert y0 < box[1] and y1 < box[3] and (x1 - x0) > (y1 - y0)  # the glasses: above the mouth, wider than tall
    with pytest.raises(ValueError, match="unknown feature"):
        toyfaces.feature_box("nose")
