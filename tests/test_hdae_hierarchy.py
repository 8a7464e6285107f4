"""HDAE's hierarchical code (hcore/diffae.py with ``levels``; the reading note's sec. IX): each
shallower encoder stage's code is its pooled features through its own linear head; the decoder
reads level l's code at level l's resnets only (the time embedding they receive gains exactly
the level map of the code, every other resnet's is untouched); a hierarchical autoencoder
fine-tuned from a flat one starts as it, trains, saves and loads through the real folder; a
flat autoencoder of another shape is refused as a start."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hspace.data.catalog import RunError
from hspace.data.diffae import DiffAERecipe, build, load_diffae
from hspace.data.toy.train_diffae import start_from, train_diffae
from hspace.hcore.diffae import level_resnets, level_shares

TINY = {"batch_size": 4, "checkpoint_every": 2, "latent_n": 512, "encoder_channels": (8, 8, 8),
        "block_out_channels": (8, 16, 16), "attention": False, "z_dim": 16}  # fmt: skip
QUIET = lambda line: None  # noqa: E731


def _recorded_temb(model, x_t, t, z) -> dict[str, torch.Tensor]:
    """The time embedding every resnet of the decoder ran with (forward hooks see the
    arguments after the pre-hooks changed them)."""
    seen, handles = {}, []
    for name, module in model.unet.named_modules():
        if type(module).__name__ == "ResnetBlock2D":
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, a[1].clone())))
    try:
        with torch.no_grad():
            model.eps(x_t, t, z)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_each_level_code_reaches_only_its_own_levels_resnets():
    model, _ = build(DiffAERecipe(**TINY, levels=(4, 4)))
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in model.level_to_emb:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
    x_t, t = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([500, 20])
    z = torch.randn(2, 24, generator=gen)
    flat = torch.cat([z[:, :16], torch.zeros(2, 8)], 1)
    with torch.no_grad():
        zero = [lin.weight.clone() for lin in model.level_to_emb], [lin.bias.clone() for lin in model.level_to_emb]
        for lin in model.level_to_emb:
            lin.weight.zero_()
            lin.bias.zero_()
        base = _recorded_temb(model, x_t, t, flat)
        for lin, w, b in zip(model.level_to_emb, *zero, strict=True):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    got = _recorded_temb(model, x_t, t, z)
    assert set(got) == set(base) and len(got) == 11  # 3 down + 2 mid + 6 up resnets
    owners = {id(r): level for level in range(2) for r in level_resnets(model.unet, level)}
    named = dict(model.unet.named_modules())
    for name, temb in got.items():
        level = owners.get(id(named[name]))
        if level is None:
            torch.testing.assert_close(temb, base[name], rtol=0, atol=0)  # the deepest level: DiffAE's code only
        else:
            part = z[:, 16 + 4 * level : 20 + 4 * level]
            expected = base[name] + part @ zero[0][level].T + zero[1][level]  # the level map, by hand
            torch.testing.assert_close(temb, expected, rtol=1e-5, atol=1e-5, msg=name)
    assert sum(owners.get(id(named[n])) is not None for n in got) == 6  # levels 0, 1: a down and two up each
    with pytest.raises(ValueError, match="a code of 16 dimensions for an autoencoder of 24"):
        model.eps(x_t, t, z[:, :16])


def test_the_level_codes_are_each_stages_pooled_features_through_its_head():
    model, _ = build(DiffAERecipe(**TINY, levels=(4, 6)))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        code = model.encoder(x)
        body = model.encoder.body
        s0 = body[:3](x)
        s1 = body[3:6](s0)
        deepest = model.encoder.head(body[6:](s1).flatten(1))
    assert code.shape == (3, 26) and model.code_dim == 26
    torch.testing.assert_close(code[:, :16], deepest)
    torch.testing.assert_close(code[:, 16:20], model.encoder.level_heads[0](s0.mean((2, 3))))
    torch.testing.assert_close(code[:, 20:], model.encoder.level_heads[1](s1.mean((2, 3))))
    parts = model.code_parts()
    assert list(parts) == ["4px (deepest)", "16px", "8px"] and parts["8px"] == slice(20, 26)
    w = torch.zeros(26)
    w[[0, 17, 21, 22]] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert level_shares(w, parts) == {"4px (deepest)": 0.25, "16px": 0.25, "8px": 0.5}
    with pytest.raises(ValueError, match="at most 2 stages above the deepest"):
        build(DiffAERecipe(**TINY, levels=(4, 4, 4)))


def test_a_hierarchical_autoencoder_starts_as_its_flat_one_trains_and_round_trips(tmp_path):
    flat_recipe = DiffAERecipe(**TINY, steps=2, latent_steps=2)
    train_diffae(tmp_path / "flat-ck", tmp_path / "flat", flat_recipe, report=QUIET)
    flat, _, _, _ = load_diffae(tmp_path / "flat")
    hier_recipe = replace(flat_recipe, levels=(4, 4), init_from=str(tmp_path / "flat"), seed=1)
    started, _ = build(hier_recipe)
    start_from(started, str(tmp_path / "flat"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([700, 3])
    with torch.no_grad():
        code = started.encoder(x)
        torch.testing.assert_close(code[:, :16], flat.encoder(x))  # the flat model's code, then the levels'
        torch.testing.assert_close(started.eps(x_t, t, code), flat.eps(x_t, t, code[:, :16]))  # step 0: the flat one

    train_diffae(tmp_path / "hier-ck", tmp_path / "hier", hier_recipe, report=QUIET)
    model, _, latent, stats = load_diffae(tmp_path / "hier")
    assert model.levels == (4, 4) and latent.z_dim == 24 and stats["mean"].shape == (24,)
    assert all(float(lin.weight.abs().max()) > 0 for lin in model.level_to_emb)  # the level maps learnt
    with torch.no_grad():
        code = model.encoder(x)
        plain = model.eps(x_t, t, code)
        assert (model.eps(x_t, t, torch.cat([code[:, :16], torch.zeros(2, 8)], 1)) - plain).abs().max() > 0
    with pytest.raises(RunError, match="do not fit this recipe"):
        start_from(build(replace(hier_recipe, z_dim=8))[0], str(tmp_path / "flat"))


def test_train_toy_refuses_a_checkpoint_of_the_other_autoencoder(tmp_path):
    """`hspace train-toy --recipe hdae` on a toy-diffae checkpoint (and the reverse) is one line,
    nothing written: resuming would silently train the checkpoint's own recipe."""
    import json
    from dataclasses import asdict

    from typer.testing import CliRunner

    from hspace.flows.cli import app

    for name, held, other in (("hdae", DiffAERecipe(**TINY), "toy-diffae"),
                              ("diffae", DiffAERecipe(**TINY, levels=(4, 4)), "toy-hdae")):  # fmt: skip
        ck = tmp_path / name / "ck"
        ck.mkdir(parents=True)
        (ck / "recipe.json").write_text(json.dumps(asdict(held)))
        args = ["train-toy", "--recipe", name, "--checkpoint", str(ck), "--out", str(tmp_path / name / "out")]
        r = CliRunner().invoke(app, args)
        assert r.exit_code != 0 and f"holds a {other} run: --recipe {name} needs another" in r.output, r.output
        assert sorted(p.name for p in (tmp_path / name).rglob("*")) == ["ck", "recipe.json"]
