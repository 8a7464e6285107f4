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
def test_the_shipped_toy_diffae_reconstructs_held_out_renders_keeping_their_factors():
    """Encode, invert conditioned on z_sem (eq. (14)), decode: 32 held-out renders come back at
    PSNR >= 28 dB and the oracle reads every binary factor of at least 30 of them the same way,
    pose within 2 degrees on average (quality.json: the figures on 128)."""
    import json

    from hspace.data.diffae import TOY_DIFFAE_DIR
    from hspace.data.toy.diffae_quality import measure

    q = measure("toy-diffae", n=32, steps=20)
    assert q["reconstruction"]["psnr_db"] >= 28, q["reconstruction"]
    for name, value in q["reconstruction"]["oracle_agreement"].items():
        assert value <= 2.0 if name in ("yaw", "pitch", "roll") else value >= 30 / 32, (name, value)
    shipped = json.loads((TOY_DIFFAE_DIR / "quality.json").read_text())
    assert abs(q["reconstruction"]["psnr_db"] - shipped["reconstruction"]["psnr_db"]) < 2.0
    model, _, _, _ = load_diffae("toy-diffae")
    assert model.encoder.head.out_features == 128
