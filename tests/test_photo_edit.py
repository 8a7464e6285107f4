"""Editing real photos on the shipped toy world, the way users run it: toy renders
stand in for photos. Edit-friendly DDPM inversion regenerates them exactly; a Smiling
direction (eq. (10) from the toy model's own samples) applied to inverted neutral faces
moves the oracle's Smiling while the head pose stays; SDEdit; the photo bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hspace.data import models
from hspace.data.annotators import load_annotator
from hspace.data.catalog import RunFolder
from hspace.data.photos import psnr, read_photos, ssim
from hspace.data.stores import SampleStore
from hspace.flows.cli import app
from hspace.hcore.sampler import to_unit
from tests.test_toy_pipeline import _write_renders
from tests.test_toy_pipeline import hspace as ok  # runs a command, asserts exit 0

runner = CliRunner()
STEPS = 10


def hspace(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def smiling(prefect_server, tmp_path_factory):
    """The eq. (10) Smiling direction of 64 toy samples (10 steps, eta 1), and 6 neutral renders."""
    root = tmp_path_factory.mktemp("photo-edit")
    run = root / "run"
    ok("sample", "--model", "toy", "--n", "64", "--steps", STEPS, "--batch-size", "64", "--device", "cpu", "--out", run)
    ok("annotate", run, "--device", "cpu")
    ok("directions", run, "--attribute", "Smiling", "--top", "16", "--held-out", "0")
    faces = root / "faces"
    _write_renders(faces / "negative", False, 6, 9_000_000)
    _write_renders(faces / "positive", True, 2, 9_000_000)
    return {"direction": run / "directions" / "Smiling.safetensors", "faces": faces}


def _scores(folder, pattern):
    oracle = load_annotator("oracle")
    files = sorted(folder.glob(pattern))
    images, _ = read_photos(files, 32)
    return oracle.score(to_unit(images)).numpy(), oracle.names, files


@pytest.mark.slow
def test_ddpm_inversion_regenerates_the_photos_and_edits_keep_the_pose(smiling, tmp_path):
    """`hspace edit --image`: reconstruction PSNR >= 40 dB (measured: every pixel equal in
    float32), and the Smiling edit at gamma 1 raises the oracle's Smiling by > 0.5 while the
    yaw moves by < 5 degrees on average (measured values printed)."""
    out = tmp_path / "edit.png"
    neutral = sorted((smiling["faces"] / "negative").iterdir())
    args = [a for f in neutral for a in ("--image", f)]
    result = ok("edit", *args, "--model", "toy", "--direction", smiling["direction"], "--scales", "0,1", "--out", out)
    assert out.exists() and result.output.count("reconstruction without edit") == len(neutral)
    assert "edit-friendly DDPM inversion" in result.output
    folder = tmp_path / "edit"
    photos, _ = read_photos(neutral, 32)
    for photo, path in zip(photos, neutral, strict=True):
        (kept,) = folder.glob(f"{path.stem}__Smiling__gamma+0.png")
        regenerated = np.asarray(Image.open(kept)).transpose(2, 0, 1)
        print(path.name, "PSNR", psnr(regenerated, photo), "SSIM", ssim(regenerated, photo))
        assert psnr(regenerated, photo) >= 40
    before, names, _ = _scores(folder, "*gamma+0.png")
    after, _, _ = _scores(folder, "*gamma+1.png")
    smile = after[:, names.index("Smiling")] - before[:, names.index("Smiling")]
    yaw = np.abs(after[:, names.index("yaw")] - before[:, names.index("yaw")])
    print("Smiling change per face", smile.round(3), "mean", smile.mean(), "| |yaw change|", yaw.round(2), yaw.mean())
    assert smile.mean() > 0.5
    assert yaw.mean() < 5.0


@pytest.mark.slow
def test_sdedit_changes_the_attribute_and_stays_near_the_photo(smiling, tmp_path):
    out = tmp_path / "sdedit.png"
    neutral = sorted((smiling["faces"] / "negative").iterdir())
    args = [a for f in neutral for a in ("--image", f)]
    result = ok(
        "edit", *args, "--model", "toy", "--direction", smiling["direction"], "--scales", "0,1",
        "--sdedit", STEPS // 2, "--out", out,
    )  # fmt: skip
    assert "SDEdit from step 5 of 10" in result.output
    folder = tmp_path / "sdedit"
    photos, _ = read_photos(neutral, 32)
    kept, _ = read_photos(sorted(folder.glob("*gamma+0.png")), 32)
    values = [psnr(k, p) for k, p in zip(kept, photos, strict=True)]
    print("SDEdit (no edit) PSNR to the photo", np.round(values, 1), np.mean(values))
    assert 15 < np.mean(values) < 40  # near the photo, not a copy of it
    before, names, _ = _scores(folder, "*gamma+0.png")
    after, _, _ = _scores(folder, "*gamma+1.png")
    change = (after - before)[:, names.index("Smiling")]
    print("SDEdit Smiling change", change.round(3), change.mean())
    assert change.mean() > 0.1


@pytest.mark.slow
def test_hspace_invert_ddpm_run_replays_exactly(smiling, tmp_path):
    """`hspace invert --method ddpm` stores x_T and the noise maps; `hspace edit RUN --sample I`
    replays them: at gamma 0 the input image, pixel for pixel."""
    from hspace.hcore.generator import Replay
    from hspace.tasks.edit import SampleSpec, render_edits

    out = tmp_path / "inv"
    result = ok("invert", "--images", smiling["faces"], "--model", "toy", "--steps", STEPS, "--out", out)
    assert "edit-friendly DDPM inversion" in result.output
    store = SampleStore(out / "samples.zarr")
    assert store.group["noise_maps"].shape == (8, STEPS, 3, 32, 32)
    assert float(np.max(store.group["recon_mse"][:])) < 1e-4  # >= 46 dB in [-1, 1]
    meta = RunFolder(out).read()
    assert meta["config"]["method"] == "ddpm" and meta["config"]["eta"] == 1.0
    grid = tmp_path / "grid.png"
    ok("edit", out, "--sample", "2", "--direction", smiling["direction"], "--scales", "0,3", "--out", grid)
    assert grid.exists()
    unet, scheduler = models.load_for_run(meta)
    group = store.group
    spec = SampleSpec(
        Replay(meta["config"]["seed"], STEPS, 1.0, "output"), 2,
        x_T=torch.from_numpy(np.asarray(group["xT"][2])), noise=torch.from_numpy(np.asarray(group["noise_maps"][2])),
    )  # fmt: skip
    (cell,) = render_edits(unet, scheduler, spec, [], [[[]]])[0]
    np.testing.assert_array_equal(cell, np.asarray(group["x0"][2]))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(
        a, b, channel_axis=0, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert abs(ssim(a, b) - ref) < 1e-6
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")


@pytest.mark.slow
def test_photo_bad_inputs(smiling, tmp_path):
    """Each bad photo its one line: not an image (refused, nothing written), grayscale and
    RGBA (converted, said), smaller than the model (upscaled, warned), mixed sizes (said)."""
    d = ("--model", "toy", "--direction", smiling["direction"], "--scales", "0")
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    result = hspace("edit", "--image", junk, *d, "--out", tmp_path / "a.png")
    assert result.exit_code == 2 and "notes.png (UnidentifiedImageError)" in result.output
    assert not (tmp_path / "a.png").exists()
    assert "Traceback" not in result.output
    face = next((smiling["faces"] / "negative").iterdir())
    rgb = Image.open(face)
    rgb.convert("L").save(tmp_path / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    rgb.resize((20, 20)).save(tmp_path / "small.png")
    rgb.resize((48, 40)).save(tmp_path / "wide.png")
    for name, expected in [
        ("gray.png", "converted to RGB: 1 grayscale"),
        ("rgba.png", "converted to RGB: 1 RGBA"),
        ("small.png", "smaller than the model's 32x32 were upscaled"),
        ("wide.png", "48x40 centre-cropped to a square and resized to the model's 32x32"),
    ]:
        result = ok("edit", "--image", tmp_path / name, *d, "--out", tmp_path / f"{name}.grid.png")
        assert expected in result.output, result.output
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("small.png", "wide.png"):
        (mixed / name).write_bytes((tmp_path / name).read_bytes())
    result = ok("edit", "--image", mixed, *d, "--out", tmp_path / "mixed.png")
    assert "2 images of 2 sizes (20x20, 48x40): each centre-cropped and resized to 32x32" in result.output
    result = hspace("edit", "--image", tmp_path / "none.png", *d, "--out", tmp_path / "b.png")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = hspace("edit", "--image", face, *d, "--sdedit", "11", "--out", tmp_path / "c.png")
    assert result.exit_code == 2 and "--sdedit 11" in result.output
