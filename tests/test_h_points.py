"""h at any block of the denoiser (hcore.hooks: ``h_point`` a module name): the mid block named
as a module is the paper's point exactly; a down block's h is what the next block receives (read
by the independent input hook); its shape is probed by one forward; an edit there moves the
output and replacing h by itself does not; bad points are one line naming the nearest modules.
Through the commands, as users run them: sample, PCA, edit and hspace.apply inside diffusers'
own pipeline at a down block of the SD 1.x test pipeline, and the toy model in bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hspace.hcore.hooks import HPointError, HSpaceHook, first_tensor, h_shape


def attention_unet(dtype=torch.float32):
    """tests.conftest's tiny U-Net with attention: in its second down and first up block and its mid block."""
    from tests.conftest import tiny_unet

    unet = tiny_unet(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                     add_attention=True, attention_head_dim=8)  # fmt: skip
    return unet.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_named_points_read_and_edit_where_they_say(dtype):
    unet = attention_unet(dtype)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(dtype), 30
    with torch.no_grad():
        with HSpaceHook(unet) as paper:
            eps = unet(x, t).sample
        with HSpaceHook(unet, point="mid_block") as named:
            torch.testing.assert_close(unet(x, t).sample, eps, rtol=0, atol=0)
        torch.testing.assert_close(named.last_h, paper.last_h, rtol=0, atol=0)
        with HSpaceHook(unet, point="down_blocks.1") as down:
            unet(x, t)
        with HSpaceHook(unet, point="input") as mid_in:  # the mid block's input: what the last down block gave
            unet(x, t)
        torch.testing.assert_close(down.last_h, mid_in.last_h, rtol=0, atol=0)
        assert h_shape(unet, "down_blocks.1") == (16, 8, 8) == tuple(down.last_h.shape[1:])
        assert h_shape(unet, "up_blocks.0.attentions.0") == (16, 8, 8)  # before its upsampler
        assert h_shape(unet, "up_blocks.0") == (16, 16, 16)
        assert h_shape(unet, "down_blocks.0:input") == (8, 16, 16)
        with HSpaceHook(unet, point="up_blocks.0.resnets.1") as up:
            unet(x, t)
            up.replace = up.last_h.clone()
            torch.testing.assert_close(unet(x, t).sample, eps, rtol=0, atol=0)
            up.replace = None
            up.delta = torch.ones_like(up.last_h[0])
            assert (unet(x, t).sample - eps).abs().max() > 1e-2
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_bad_points_are_one_line_naming_the_nearest_modules():
    unet = attention_unet()
    with pytest.raises(HPointError, match=r"no such module \(nearest: down_blocks.1, "):
        HSpaceHook(unet, point="down_block.1")
    with pytest.raises(HPointError, match="no such module"):
        h_shape(unet, "up_blocks.7")
    with pytest.raises(HPointError, match="a module name with ':output' or ':input'"):
        HSpaceHook(unet, point="down_blocks.1:middle")
    with pytest.raises(HPointError, match="gives a dict, not a tensor"):
        first_tensor({"sample": torch.zeros(1)}, "x")
    with pytest.raises(HPointError, match="gives a NoneType, not a tensor"):
        first_tensor((None, torch.zeros(1)), "x")


@pytest.mark.slow
def test_a_run_at_a_down_block_of_sd_samples_edits_and_applies_in_diffusers(tmp_path):
    """The SD 1.x test pipeline with h after down_blocks.1: samples.zarr holds h of the probed
    shape; PCA's pc00 edits the sample through `hspace edit`, and hspace.apply inside diffusers'
    own StableDiffusionPipeline gives the same image (<= 2/255); a module that does not exist is
    refused in one line with nothing written."""
    from PIL import Image

    import hspace
    from hspace.data.stores import SampleStore
    from tests.sd_fixtures import load_tiny_sd, save_tiny_sd
    from tests.test_sd import BASE, PROMPTS, applied_in_pipeline, assert_refused
    from tests.test_sd import hspace as cli

    folder = save_tiny_sd(tmp_path / "sd1", "sd1")
    run = tmp_path / "run"
    r = cli("sample", "--model", folder, "--prompts", PROMPTS, *BASE, "--eta", "0", "--h-point", "down_blocks.1",
            "--out", run)  # fmt: skip
    assert r.exit_code == 0, r.output
    pipe = load_tiny_sd(folder, "sd1")
    shape = h_shape(pipe.unet, "down_blocks.1")
    assert SampleStore(run / "samples.zarr").h.shape[2:] == shape
    assert cli("pca", run, "--components", "2").exit_code == 0
    direction = hspace.open_run(run).direction("pc00")
    assert direction.h_point == "down_blocks.1" and tuple(direction.v.shape[1:]) == shape
    grid = tmp_path / "grid.png"
    r = cli("edit", run, "--sample", "1", "--direction", direction.path, "--scales", "2", "--out", grid)
    assert r.exit_code == 0, r.output
    edited_cli = np.asarray(Image.open(tmp_path / "grid" / "sample1__pc00__gamma+2.png")).astype(np.int16)
    edited, _ = applied_in_pipeline(pipe, direction)
    assert np.abs(edited - edited_cli).max() <= 2, np.abs(edited - edited_cli).max()
    plain = SampleStore(run / "samples.zarr").x0[1].astype(np.int16).transpose(1, 2, 0)
    assert np.abs(edited - plain).mean() > 1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())

    bad = tmp_path / "bad"
    r = cli("sample", "--model", folder, "--prompts", PROMPTS, *BASE, "--h-point", "down_block.1", "--out", bad)
    assert_refused(r, "h point 'down_block.1'", "nearest: down_blocks.1")
    assert not bad.exists()


def test_the_toy_model_in_bfloat16_at_an_up_block(tmp_path):
    """The shipped toy model (attention, bfloat16) sampled with h after up_blocks.1: h is stored
    at the probed shape and a PCA direction edits the sample."""
    from hspace.data import models
    from hspace.data.stores import SampleStore
    from tests.test_sd import hspace as cli

    run = tmp_path / "run"
    r = cli("sample", "--model", "toy", "--n", "8", "--steps", "4", "--batch-size", "8", "--dtype", "bfloat16",
            "--h-point", "up_blocks.1", "--device", "cpu", "--out", run)  # fmt: skip
    assert r.exit_code == 0, r.output
    unet, _ = models.load(models.resolve("toy"))
    assert SampleStore(run / "samples.zarr").h.shape[2:] == h_shape(unet, "up_blocks.1")
    assert cli("pca", run, "--components", "2").exit_code == 0
    r = cli("edit", run, "--sample", "0", "--direction", run / "directions" / "pc00.safetensors", "--scales", "0,8",
            "--out", tmp_path / "g.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    cells = sorted((tmp_path / "g").glob("*.png"))
    a, b = (np.asarray(__import__("PIL.Image").Image.open(c)).astype(np.int16) for c in cells)
    assert np.abs(a - b).mean() > 1


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_the_probed_shape_is_what_a_guided_pipeline_call_gives(kind):
    """h_shape's zero-input probe (zero text; SDXL's zero added conditioning) gives the shape
    HSpaceHook sees inside diffusers' own pipeline call under guidance, at a down and an up block."""
    from tests.sd_fixtures import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(kind)
    for point in ("down_blocks.0", "up_blocks.1.resnets.0"):
        with HSpaceHook(pipe.unet, point=point) as hs:
            pipe("a cat", num_inference_steps=1, guidance_scale=3.0, output_type="latent")
        assert hs.last_h.shape[0] == 2 and tuple(hs.last_h.shape[1:]) == h_shape(pipe.unet, point), (kind, point)


def _tiny_transformer(kind: str):
    """A tiny random diffusers transformer of SD3, FLUX or PixArt-α and one call's keyword arguments."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 32, generator=g)
    if kind == "sd3":
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                      attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                      joint_attention_dim=32, pooled_projection_dim=32)  # fmt: skip
        call = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": text,
                "pooled_projections": torch.randn(2, 32, generator=g),
                "timestep": torch.tensor([500.0, 20.0])}  # fmt: skip
    elif kind == "flux":
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))  # fmt: skip
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        img_ids = torch.stack([torch.zeros(16), rows.flatten().float(), cols.flatten().float()], 1)
        call = {"hidden_states": torch.randn(2, 16, 16, generator=g), "encoder_hidden_states": text,
                "pooled_projections": torch.randn(2, 16, generator=g), "timestep": torch.tensor([0.5, 0.02]),
                "img_ids": img_ids, "txt_ids": torch.zeros(5, 3)}  # fmt: skip
    else:
        model = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                         num_attention_heads=2, caption_channels=32, in_channels=4, out_channels=8,
                                         cross_attention_dim=16, attention_bias=True,
                                         activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                         norm_type="ada_norm_single", norm_elementwise_affine=False,
                                         norm_eps=1e-6)  # fmt: skip
        added = {"resolution": None, "aspect_ratio": None}
        call = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": text,
                "timestep": torch.tensor([500, 20]), "added_cond_kwargs": added}  # fmt: skip
    return model.eval(), call


@pytest.mark.parametrize("kind,point", [("sd3", "transformer_blocks.0"), ("sd3", "transformer_blocks.1"),
                                        ("flux", "transformer_blocks.0"), ("flux", "single_transformer_blocks.1"),
                                        ("pixart", "transformer_blocks.1")])  # fmt: skip
def test_h_at_a_transformer_block_is_its_image_tokens(kind, point):
    """At a joint text-image block (SD3, FLUX) h is the image stream, element 1 of its (text,
    image) output (SD3's last block gives (None, image)); PixArt's blocks give the image tokens:
    read by an independent hook, h is those (B, 16, D) tokens; replacing h by itself changes
    nothing, a random edit changes the output (a uniform one would vanish in the next LayerNorm)."""
    model, call = _tiny_transformer(kind)
    module = dict(model.named_modules())[point]
    seen = {}
    handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    with torch.no_grad():
        plain = model(**call).sample
    handle.remove()
    image = seen["out"][1] if kind in ("sd3", "flux") else seen["out"]
    with torch.no_grad(), HSpaceHook(model, point=point) as hs:
        model(**call)
        torch.testing.assert_close(hs.last_h, image, rtol=0, atol=0)
        assert hs.last_h.shape[:2] == (2, 16)
        hs.replace = hs.last_h.clone()
        torch.testing.assert_close(model(**call).sample, plain, rtol=0, atol=0)
        hs.replace = None
        hs.delta = torch.randn(hs.last_h.shape[1:], generator=torch.Generator().manual_seed(3))
        assert (model(**call).sample - plain).abs().max() > 1e-3
    assert not any(m._forward_hooks for m in model.modules())


def _several_points(tmp_path, model: str, point: str, text: tuple = ()):
    """One run with h at its mid block and at ``point`` (sample.h_points), one run at ``point`` only,
    same seeds: the extra point's h, PCA and eq. (10) directions and its edits equal the single run's."""
    from PIL import Image

    from hspace.data.stores import SampleStore
    from tests.test_sd import hspace as cli

    base = ("--model", model, "--n", "8", "--steps", "3", "--batch-size", "4", *text)
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert cli("sample", *base, "--h-points", point, "--out", both).exit_code == 0
    assert cli("sample", *base, "--h-point", point, "--out", alone).exit_code == 0
    store = SampleStore(both / "samples.zarr")
    extra = store.group[f"h@{point}"][:]
    np.testing.assert_array_equal(extra, SampleStore(alone / "samples.zarr").h[:])
    assert store.h.shape[2:] != extra.shape[2:] or point != "output"  # the run's own h is still the mid block's
    for run in (both, alone):
        assert cli("pca", run, "--components", "2").exit_code == 0
    from safetensors import safe_open

    def read(path):
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("v"), f.metadata()

    v_point, md = read(both / "directions" / "points" / point / "pc00.safetensors")
    v_alone, _ = read(alone / "directions" / "pc00.safetensors")
    assert md["h_point"] == point and (both / "points" / point / "pca.zarr").is_dir()
    torch.testing.assert_close(v_point, v_alone, rtol=0, atol=0)
    direction = both / "directions" / "points" / point / "pc00.safetensors"
    grids = {}
    for run, path in ((both, direction), (alone, alone / "directions" / "pc00.safetensors")):
        out = tmp_path / f"{run.name}.png"
        r = cli("edit", run, "--sample", "7", "--direction", path, "--scales", "0,2", "--out", out)
        assert r.exit_code == 0, r.output
        grids[run.name] = {g: np.asarray(Image.open(out.with_suffix("") / f"sample7__pc00__gamma{g}.png")).astype(int)
                           for g in ("+0", "+2")}  # fmt: skip
    assert np.array_equal(grids["both"]["+2"], grids["alone"]["+2"])
    assert np.abs(grids["both"]["+2"] - grids["both"]["+0"]).mean() > 1
    return both, alone


def test_several_points_in_one_toy_run(tmp_path, oracle_dir):
    """The toy model with h also after up_blocks.0: h@up_blocks.0 in samples.zarr, its own PCA,
    pc00 and eq. (10) direction, each equal to a run sampled at up_blocks.0 alone, and the edit
    with the point's direction equal to that run's; bad extra points refused before any work."""
    from tests.test_sd import assert_refused
    from tests.test_sd import hspace as cli

    both, alone = _several_points(tmp_path, "toy", "up_blocks.0")
    for run in (both, alone):
        assert cli("annotate", run, "--annotator", f"oracle:{oracle_dir}").exit_code == 0
        r = cli("directions", run, "--attribute", "Smiling", "--top", "2", "--held-out", "2")
        assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a = load_file(both / "directions" / "points" / "up_blocks.0" / "Smiling.safetensors")["v"]
    torch.testing.assert_close(a, load_file(alone / "directions" / "Smiling.safetensors")["v"], rtol=0, atol=0)
    assert (both / "directions" / "Smiling.safetensors").exists()  # the run's own point too
    assert cli("verify", both).exit_code == 0
    base = ("sample", "--model", "toy", "--n", "4", "--steps", "2")
    assert_refused(cli(*base, "--h-points", "up_blocks.9", "--out", tmp_path / "bad"), "up_blocks.9", "nearest")
    assert_refused(cli(*base, "--h-points", "output", "--out", tmp_path / "bad"), "once")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_several_points_in_one_toy_sd_run(tmp_path):
    """toy-sd (latent, text-conditioned, guided): h@down_blocks.1 is the conditional half at that
    block, equal to a run sampled there alone; its PCA and edits as there."""
    _several_points(tmp_path, "toy-sd", "down_blocks.1", ("--prompt", "a face", "--guidance-scale", "3"))
