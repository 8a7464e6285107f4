"""The paper's sampling defaults: eta_t = 1 for synthesis (sec. 4.1), no clipping of P_t
(eq. (3); the authors' code sets clip_sample=False), a per-step eta, and both recorded in
run.json and in every direction file, with a warning where a direction meets the other setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hspace.data import directions as dirfile
from hspace.data.catalog import RunFolder
from hspace.data.stores import SampleStore
from hspace.flows.cli import app
from hspace.hcore.sampler import eta_schedule, sample_seed
from hspace.tasks.config import SampleSection

runner = CliRunner()


def hspace(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def ddpm_reference(unet, alphas_cumprod, timesteps, seed: int, index: int, shape, clip: bool) -> torch.Tensor:
    """Ancestral DDPM sampling written from Ho et al. (eqs. (6)-(7)): the posterior
    q(x_{t'} | x_t, x_0) between consecutive steps t > t' of the schedule, with x_0 predicted
    from eps (eq. (3) of Haas et al.), mean
      sqrt(a') b / (1 - a) x_0 + sqrt(a / a') (1 - a') / (1 - a) x_t,  b = 1 - a / a',
    variance (1 - a') / (1 - a) b; the noise from sample ``index``'s own generator (x_T, then
    one draw per step). Not the DDIM formula hspace implements: eta = 1 must agree with it."""
    g = torch.Generator().manual_seed(sample_seed(seed, index))
    x = torch.randn(shape, generator=g).double()[None]
    stride = timesteps[0] - timesteps[1]
    for t in timesteps:
        z = torch.randn(shape, generator=g).double()[None]
        a = alphas_cumprod[t].double()
        a_prev = alphas_cumprod[t - stride].double() if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
        with torch.no_grad():
            eps = unet(x.float(), int(t)).sample.double()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        b = 1 - a / a_prev
        mean = a_prev.sqrt() * b / (1 - a) * x0 + (a / a_prev).sqrt() * (1 - a_prev) / (1 - a) * x
        x = mean + ((1 - a_prev) / (1 - a) * b).sqrt() * z
    return x[0]


def test_default_sampling_is_ddpm_without_clipping(prefect_server, model_dir, tmp_path):
    """`hspace sample` with no options on a model whose scheduler says clip_sample=True: the
    x0 it stores is the DDPM loop's without clipping, and far from the clipped one."""
    from hspace.data import models

    out = tmp_path / "run"
    hspace("sample", "--model", model_dir, "--n", 3, "--steps", 8, "--batch-size", 3, "--device", "cpu", "--out", out)
    cfg = RunFolder(out).read()["config"]
    assert cfg["eta"] == 1.0 and cfg["clip_sample"] is False
    store = SampleStore(out / "samples.zarr")
    unet, scheduler = models.load(models.resolve(str(model_dir)))
    assert scheduler.config.clip_sample  # the model asks for clipping; the paper's default does not
    shape = (3, 16, 16)
    timesteps = [int(t) for t in store.timesteps[:]]
    for i in range(3):
        plain = ddpm_reference(unet, scheduler.alphas_cumprod, timesteps, 0, i, shape, clip=False)
        clipped = ddpm_reference(unet, scheduler.alphas_cumprod, timesteps, 0, i, shape, clip=True)
        ours = store.x0[i].astype(np.int16)
        as_uint8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.int16)  # noqa: E731
        assert np.abs(ours - as_uint8(plain)).max() <= 1
        assert np.abs(ours - as_uint8(clipped)).mean() > 5  # so the comparison can tell them apart


def test_clip_sample_on_and_model_are_recorded_and_applied(prefect_server, model_dir, tmp_path):
    from hspace.data import models

    hspace("sample", "--model", model_dir, "--n", 2, "--steps", 4, "--clip-sample", "model", "--out", tmp_path / "m")
    meta = RunFolder(tmp_path / "m").read()
    assert meta["config"]["clip_sample"] is True  # the tiny model's scheduler clips
    _, scheduler = models.load_for_run(meta)
    assert scheduler.config.clip_sample is True
    meta["config"]["clip_sample"] = False
    assert models.load_for_run(meta)[1].config.clip_sample is False
    md = dirfile.metadata_for_run(meta, method="t", source="t", scale_unit="raw")
    assert md["clip_sample"] is False


def test_eta_per_step_and_window_rule():
    assert eta_schedule(1.0, 3) == [1.0, 1.0, 1.0]
    assert eta_schedule("1@0:2", 4) == [1.0, 1.0, 0.0, 0.0]
    assert eta_schedule("0.5@1:3", 4) == [0.0, 0.5, 0.5, 0.0]
    assert eta_schedule([0, 0.5, 1], 3) == [0.0, 0.5, 1.0]
    for bad, needle in (([1, 1], "one per step"), ("1@3:9", "window"), ("lots", "window rule"), (1.5, "[0, 1]")):
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            eta_schedule(bad, 4)
    # as typed on the command line and in YAML
    assert SampleSection(eta="1").eta == 1.0 and SampleSection(eta="1,0.5,0").eta == [1.0, 0.5, 0.0]
    assert SampleSection(eta="1@0:10").eta == "1@0:10"
    assert SampleSection(clip_sample=False).clip_sample == "off" and SampleSection(clip_sample=True).clip_sample == "on"


def test_a_per_step_eta_run_records_its_list(prefect_server, model_dir, tmp_path):
    hspace("sample", "--model", model_dir, "--n", 2, "--steps", 4, "--eta", "1@0:2", "--out", tmp_path / "w")
    assert RunFolder(tmp_path / "w").read()["config"]["eta"] == [1.0, 1.0, 0.0, 0.0]


def test_direction_under_another_setting_is_warned_about(model_dir, tmp_path, caplog):
    made = {"clip_sample": "true", "eta": "1.0"}
    assert dirfile.warn_setting(tmp_path / "d.safetensors", made, {"clip_sample": True, "eta": 1.0}) == []
    lines = dirfile.warn_setting(tmp_path / "d.safetensors", made, {"clip_sample": False, "eta": 0.0})
    assert len(lines) == 2 and "clipping on" in lines[0] and "has it off" in lines[0] and "eta 0.0" in lines[1]
    assert dirfile.warn_setting(tmp_path / "d", {"clip_sample": "model"}, {"clip_sample": False}) == []  # old file


def test_edit_warns_when_a_direction_was_made_with_clipping(prefect_server, model_dir, tmp_path):
    from hspace.data import models

    out = tmp_path / "run"
    hspace("sample", "--model", model_dir, "--n", 2, "--steps", 4, "--clip-sample", "on", "--out", out)
    meta = RunFolder(out).read()
    from hspace.hcore.hooks import h_shape

    v = torch.zeros(4, *h_shape(models.load_for_run(meta)[0]))
    path = dirfile.save(tmp_path / "d.safetensors", v, dirfile.metadata_for_run(meta, "t", "t", "raw"))
    assert json.loads(dirfile.load(path)[1]["clip_sample"]) is True
    result = runner.invoke(
        app,
        ["edit", "--model", str(model_dir), "--steps", "4", "--direction", f"{path}", "--scales", "0,1"]
        + ["--out", str(tmp_path / "g.png"), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "made with P_t clipping on, this sampling has it off" in result.output.replace("\n", " ")
