"""Stable Diffusion-family models through the commands, as a user runs them: tiny random
SD 1.x (epsilon), SD 2.x (v-prediction, linear projection) and SDXL (two text encoders)
pipelines saved by diffusers' own save_pretrained (tests/sd_fixtures.py) and loaded back
through hspace's model path; samples compared with diffusers' own pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from typer.testing import CliRunner

from hspace.data import directions as dirfile
from hspace.data.catalog import RunFolder
from hspace.data.stores import SampleStore
from hspace.flows.cli import app
from hspace.hcore.sampler import draw_noise, make_generators
from tests.sd_fixtures import KINDS, LATENT_SIZE, load_tiny_sd, save_tiny_sd

runner = CliRunner()
PROMPTS = "a red cat,a blue dog at night"
BASE = ("--n", "4", "--steps", "4", "--batch-size", "2", "--device", "cpu", "--guidance-scale", "3")


def hspace(*args):
    return runner.invoke(app, [str(a) for a in args])


def applied_in_pipeline(pipe, direction, gamma: float = 2.0, sample: int = 1):
    """The image (uint8 values as int16) diffusers' own pipeline makes of a run's sample (its
    latents, prompt, 4 DDIM steps at eta 0, guidance 3) with hspace.apply's edit; and the call."""
    import hspace as package

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    gen = make_generators(0, [sample])
    latents = draw_noise(gen, (4, LATENT_SIZE, LATENT_SIZE))
    call = {
        "prompt": PROMPTS.split(",")[sample % 2],
        "latents": latents,
        "num_inference_steps": 4,
        "guidance_scale": 3.0,
    }
    with package.apply(pipe, direction, gamma=gamma):
        out = pipe(**call, eta=0.0, generator=gen, output_type="np").images[0]
    return np.round(out * 255).astype(np.int16), (call, gen)


hspace_cli = hspace  # where a test imports the package hspace too


def assert_refused(result, *needles: str):
    assert result.exit_code != 0, result.output
    assert "error:" in result.output and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output.replace("\n", " "), result.output


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: save_tiny_sd(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def sd_runs(sd_dirs, tmp_path_factory):
    """One sampled run per kind (eta 0 for sd1 and sdxl, the default eta 1 for sd2)."""
    root = tmp_path_factory.mktemp("sd-runs")
    runs = {}
    for kind, folder in sd_dirs.items():
        eta = ("--eta", "1") if kind == "sd2" else ("--eta", "0")
        out = root / kind
        result = hspace("sample", "--model", folder, "--prompts", PROMPTS, *BASE, *eta, "--out", out)
        assert result.exit_code == 0, result.output
        runs[kind] = out
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_sample_equals_diffusers_pipeline(sd_dirs, sd_runs, kind):
    """With no edit, `hspace sample` stores the images diffusers' own pipeline makes from the
    same initial latents (the run's per-sample generators), prompts, guidance and eta, with
    a DDIMScheduler of the model's betas: capture changes nothing (<= 1/255 after uint8)."""
    pipe = load_tiny_sd(sd_dirs[kind], kind)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    meta = RunFolder(sd_runs[kind]).read()
    eta = float(meta["config"]["eta"])
    store = SampleStore(sd_runs[kind] / "samples.zarr")
    prompts = PROMPTS.split(",")
    for i in range(4):
        gen = make_generators(0, [i])
        latents = draw_noise(gen, (4, LATENT_SIZE, LATENT_SIZE))
        out = pipe(
            prompt=prompts[i % 2],
            latents=latents,
            num_inference_steps=4,
            guidance_scale=3.0,
            eta=eta,
            generator=gen,
            output_type="np",
        ).images[0]
        ref = np.round(out * 255).astype(np.int16).transpose(2, 0, 1)
        got = store.x0[i].astype(np.int16)
        assert np.abs(got - ref).max() <= 1, (kind, i, np.abs(got - ref).max())
    assert list(store.group["prompt_index"][:]) == [0, 1, 0, 1]
    assert meta["config"]["prompts"] == prompts and meta["model"]["kind"] in ("sd", "sdxl")


def test_text_models_need_a_prompt_and_pixel_models_take_none(sd_dirs, model_dir, tmp_path):
    out = tmp_path / "o"
    assert_refused(hspace("sample", "--model", sd_dirs["sd1"], *BASE, "--out", out), "text-conditioned", "--prompt")
    assert not out.exists()
    assert_refused(hspace("sample", "--model", model_dir, "--prompt", "a cat", "--out", out), "takes no text")
    # an empty prompt on purpose is the unconditional model
    result = hspace("sample", "--model", sd_dirs["sd1"], "--prompt", "", *BASE, "--out", out)
    assert result.exit_code == 0, result.output


def test_an_unknown_or_empty_transformer_pipeline_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "sana"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]})
    )
    assert_refused(hspace("sample", "--model", folder, "--out", tmp_path / "o"), "SanaPipeline", "FluxPipeline")
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]})
    )
    assert_refused(hspace("sample", "--model", folder, "--out", tmp_path / "o"), "transformer/config.json")
    assert not (tmp_path / "o").exists()


def test_bfloat16_sd_run(sd_dirs, tmp_path):
    result = hspace(
        "sample", "--model", sd_dirs["sd2"], "--prompt", "a cat", *BASE, "--dtype", "bfloat16", "--out", tmp_path / "b"
    )
    assert result.exit_code == 0, result.output
    store = SampleStore(tmp_path / "b" / "samples.zarr")
    assert np.isfinite(store.h[:].astype(np.float32)).all() and store.x0[:].std() > 0


# the quick tier keeps SD 1.x; SD 2.x and SDXL run in the full suite
@pytest.mark.parametrize("kind", [k if k == "sd1" else pytest.param(k, marks=pytest.mark.slow) for k in KINDS])
def test_stages_on_sd_runs(sd_runs, oracle_dir, kind, tmp_path):
    """annotate (on decoded images), pca, directions, disentangle, edit (replaying the
    sample's prompt), inspect, verify and list on a text-conditioned run."""
    run = sd_runs[kind]
    for args in (
        ("annotate", run, "--annotator", f"oracle:{oracle_dir}", "--device", "cpu"),
        ("pca", run, "--components", "2"),
        ("directions", run, "--attribute", "Smiling,Male", "--top", "1", "--held-out", "1"),
        ("disentangle", run, "--direction", "pc00", "--against", "Smiling"),
        ("inspect", run),
        ("verify", run),
        ("list", run.parent),
    ):
        result = hspace(*args)
        assert result.exit_code == 0, (args[0], result.output)
    out = tmp_path / "edit.png"
    result = hspace("edit", run, "--sample", "1", "--direction", run / "directions" / "pc00.safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    from PIL import Image

    grid = np.asarray(Image.open(out))
    assert grid.shape[0] >= 64 and grid.std() > 0


def test_prompt_pair_direction_is_the_mean_h_difference(sd_dirs, sd_runs, tmp_path):
    """`hspace directions RUN --prompt-pair A B` samples the run's seeds under A and under B
    and takes v = mean(h_B - h_A) (eq. (10) with the prompt as the label): checked against
    h captured here by the sampler itself; applied at gamma it moves h along v and changes
    the decoded image."""
    from hspace.data import models
    from hspace.hcore.generator import generate

    run = sd_runs["sd1"]
    a, b = "a photo of a person", "a photo of a smiling person"
    result = hspace("directions", run, "--prompt-pair", a, b, "--name", "smile_pair", "--held-out", "1")
    assert result.exit_code == 0, result.output
    v, md = dirfile.load(run / "directions" / "smile_pair.safetensors")
    assert md["method"].startswith("prompt pair") and md["edit_branch"] == "both"

    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta)
    text = models.text_for_run(meta)
    hs = {}
    for p in (a, b):
        steps = []
        generate(
            unet,
            scheduler,
            make_generators(0, [0, 1, 2]),
            4,
            0.0,
            text=text,
            prompts=[p] * 3,
            on_step=lambda s, t, h, steps=steps: steps.append(h.float().clone()),
        )
        hs[p] = torch.stack(steps, 1)  # (B, T, C, H, W)
    expected = (hs[b] - hs[a]).mean(0)
    torch.testing.assert_close(v, expected, atol=2e-3, rtol=1e-3)

    out = tmp_path / "pair.png"
    result = hspace(
        "edit",
        run,
        "--sample",
        "0",
        "--direction",
        f"{run / 'directions' / 'smile_pair.safetensors'}",
        "--scales",
        "0,4",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    from PIL import Image

    grid = np.asarray(Image.open(out)).astype(np.float32)
    half = grid.shape[1] // 2
    assert np.abs(grid[:, :half] - grid[:, half : 2 * half]).mean() > 1.0  # gamma 4 changes the image


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_name_jacobian_and_evaluate_on_sd_runs(sd_runs, oracle_dir, kind):
    """name, jacobian (Alg. 1 on the guided prediction) and evaluate (Table 1 on decoded
    images, each sample replayed with its prompt) run on a text-conditioned run; the
    Jacobian's top direction is the top right singular vector of the explicit Jacobian of
    the guided output out_u + s (out_c - out_u) with respect to an edit of h on both branches."""
    from hspace.data import models
    from hspace.hcore.conditioning import unet_output
    from hspace.hcore.generator import generate
    from hspace.hcore.hooks import HSpaceHook
    from hspace.hcore.sampler import ddim_scheduler

    run = sd_runs[kind]
    assert hspace("annotate", run, "--annotator", f"oracle:{oracle_dir}", "--device", "cpu").exit_code == 0
    assert hspace("pca", run, "--components", "2").exit_code == 0
    assert hspace("directions", run, "--attribute", "Smiling,Male", "--top", "1", "--held-out", "1").exit_code == 0
    for args in (
        ("name", run, "--directions", "pc00,pc01", "--annotator", f"oracle:{oracle_dir}", "--n", "2"),
        ("evaluate", run, "--directions", "Smiling", "--evaluator", f"oracle:{oracle_dir}", "--gamma", "1"),
        ("jacobian", run, "--sample", "0", "--step", "1", "--k", "2", "--tol", "1e-6", "--max-iters", "200"),
    ):
        result = hspace(*args, "--device", "cpu")
        assert result.exit_code == 0, (args[0], result.output)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["n"] == 1 and "original" in summary

    meta = RunFolder(run).read()
    unet, scheduler = models.load_for_run(meta)
    text = models.text_for_run(meta)
    cond = text.conditioning(text.prompts_for([0]))
    x_t = generate(
        unet, scheduler, make_generators(0, [0]), 4, meta["config"]["eta"], text=text, indices=[0], stop_before=1
    )[0]
    sched = ddim_scheduler(scheduler)
    sched.set_timesteps(4)
    t = int(sched.timesteps[1])
    c, hh, ww = SampleStore(run / "samples.zarr").layout.h_shape

    def guided(delta_flat):
        with HSpaceHook(unet) as hs:
            hs.guided = cond.guided
            hs.delta = delta_flat.reshape(1, c, hh, ww)
            return unet_output(unet, x_t[None], t, cond).flatten()

    jac = torch.autograd.functional.jacobian(guided, torch.zeros(c * hh * ww))
    top = torch.linalg.svd(jac.double(), full_matrices=False).Vh[0].float()
    v, _ = dirfile.load(run / "directions" / "jac_s0_t1_00.safetensors")
    cos = torch.nn.functional.cosine_similarity(v[1].flatten(), top, dim=0).abs()
    assert cos > 0.999, cos


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "dtype"), [("sd2", "bfloat16"), ("sd1", "float32"), ("sdxl", "float32")])
def test_hspace_run_with_the_sd_example_config(sd_dirs, oracle_dir, clip_dir, tmp_path, kind, dtype):
    """The shipped SD example config, adapted in paths and sizes only, runs every pipeline
    stage to its report (Fig. 7 and 8 included) on each SD shape, the SD 2.x one (v-prediction)
    in bfloat16; `--plan` probes the guided U-Net first."""
    import yaml

    from hspace.tasks.config import example_config
    from hspace.tasks.stages import pipeline_stages

    cfg = yaml.safe_load(example_config("sd"))
    assert cfg["sample"]["guidance_scale"] == 7.5 and cfg["sample"]["edit_branch"] == "both"
    cfg["device"] = "cpu"
    cfg["sample"].update(model=str(sd_dirs[kind]), n=24, steps=4, batch_size=8, dtype=dtype)
    cfg["annotate"]["annotators"] = [f"oracle:{oracle_dir}"]
    cfg["directions"].update(top=3, held_out=4)
    cfg["evaluate"].update(evaluator=f"clip:{clip_dir}", n=2, calibration_n=2)
    cfg["figures"].update(pcs=2, name_samples=2, scales=[-1, 0, 1])
    path = tmp_path / "sd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    plan = hspace("run", "--config", path, "--out", out, "--plan")
    assert plan.exit_code == 0 and "sample" in plan.output and not out.exists(), plan.output
    result = hspace("run", "--config", path, "--out", out)
    assert result.exit_code == 0, result.output
    meta = RunFolder(out).read()
    assert all(meta["stages"][s]["state"] == "done" for s in pipeline_stages()), meta["stages"]
    assert meta["config"]["dtype"] == dtype and meta["config"]["prompts"] == cfg["sample"]["prompts"]
    assert (out / "report.html").exists() and (out / "eval" / "summary.json").exists()
    for figure in ("jacobian_grid.png", "sample_efficiency.png"):  # Fig. 7 and Fig. 8 on an SD run
        assert (out / "figures" / figure).exists(), figure
    _, md = dirfile.load(out / "directions" / "Smiling.safetensors")
    assert md["edit_branch"] == "both"


def test_a_direction_of_another_edit_branch_is_refused(sd_dirs, sd_runs, model_dir, tmp_path):
    """Bad inputs of the SD path, each one line, nothing written: a direction made with the
    edit on another branch of the guided batch, --prompt-pair on a pixel run, an unreadable
    @FILE of prompts."""
    run = sd_runs["sd1"]
    if not (run / "directions" / "pc00.safetensors").exists():
        assert hspace("pca", run, "--components", "2").exit_code == 0
    v, md = dirfile.load(run / "directions" / "pc00.safetensors")
    other = tmp_path / "cond.safetensors"
    dirfile.save(other, v, {**md, "edit_branch": "cond"})
    assert_refused(
        hspace("edit", run, "--sample", "0", "--direction", other, "--out", tmp_path / "e.png"),
        "'cond' branch",
        "--edit-branch cond",
    )
    assert not (tmp_path / "e.png").exists()
    pixel = tmp_path / "pixel"
    args = ("--n", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu")
    assert hspace("sample", "--model", model_dir, *args, "--out", pixel).exit_code == 0
    assert_refused(hspace("directions", pixel, "--prompt-pair", "a", "b", "--held-out", "0"), "takes no text")
    assert_refused(
        hspace("sample", "--model", sd_dirs["sd1"], "--prompts", f"@{tmp_path / 'none.txt'}", "--out", tmp_path / "p"),
        "cannot read the prompt file",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "method", "dtype"), [("sd1", "ddpm", "float32"), ("sd2", "ddim", "float32"), ("sdxl", "ddpm", "bfloat16")]
)
def test_invert_and_edit_photos_on_sd(sd_dirs, sd_runs, kind, method, dtype, tmp_path):
    """`hspace invert` of an SD model: VAE encode, then the inversion of the latent with the
    source prompt (guidance 1); the VAE and inversion errors stored apart. DDPM inversion
    regenerates the VAE's reconstruction exactly; DDIM inversion (here on SD 2.x,
    v-prediction) runs and reports its error (its accuracy: tests/test_inversion.py); SDXL
    inverts in bfloat16, exactly as in float32.
    `hspace edit RUN --sample I` and `hspace edit --image` work with a direction of the sampled run."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "photos"
    for sub in ("positive", "negative"):
        (images / sub).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)  # not square: centre-cropped
            Image.fromarray(pixels).save(images / sub / f"p{i}.png")
    out = tmp_path / "inv"
    args = ("--images", images, "--model", sd_dirs[kind], "--steps", "4", "--method", method, "--prompt", "a photo")
    result = hspace("invert", *args, "--batch-size", "2", "--dtype", dtype, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert "VAE alone" in result.output
    group = SampleStore(out / "samples.zarr").group
    assert group["x0"].shape == (4, 3, 64, 64) and group["xT"].shape == (4, 4, LATENT_SIZE, LATENT_SIZE)
    assert float(np.min(group["vae_mse"][:])) > 0  # a random VAE reconstructs poorly: stored apart
    recon = float(np.max(group["recon_mse"][:]))
    if method == "ddpm":
        assert group["noise_maps"].shape == (4, 4, 4, LATENT_SIZE, LATENT_SIZE) and recon < 1e-8
    else:
        assert "noise_maps" not in group and np.isfinite(recon)  # a random U-Net: no closeness to promise
    meta = RunFolder(out).read()
    assert meta["config"]["prompts"] == ["a photo"] and meta["config"]["guidance_scale"] == 1.0
    run = sd_runs[kind]
    if not (run / "directions" / "pc00.safetensors").exists():
        assert hspace("pca", run, "--components", "2").exit_code == 0
    direction = run / "directions" / "pc00.safetensors"
    result = hspace(
        "edit", out, "--sample", "1", "--direction", direction, "--scales", "0,2", "--out", tmp_path / "g.png"
    )
    assert result.exit_code == 0, result.output
    photo = images / "positive" / "p0.png"
    grid = tmp_path / "photo.png"
    result = hspace("edit", "--image", photo, "--model", sd_dirs[kind], "--direction", direction,
                    "--scales", "0,3", "--method", method, "--out", grid)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "64x80 centre-cropped" in result.output.replace("\n", " ") and "VAE alone" in result.output
    edited = sorted((tmp_path / "photo").glob("*.png"))
    assert len(edited) == 2
    a, b = (np.asarray(Image.open(p), np.int16) for p in edited)
    assert np.abs(a - b).max() > 0  # the edit changed the photo


@pytest.mark.slow
def test_sd_sampling_on_dask_and_a_scheduled_deployment(sd_dirs, sd_runs, prefect_server, tmp_path):
    """SD 1.x shards sampled by Dask worker processes equal the local run's (h, images,
    prompt indices), and an SD config becomes a scheduled deployment whose parameters
    read back as the same config (the scheduled run is `hspace run`'s flow, tested above)."""
    import yaml
    from dask.distributed import LocalCluster
    from prefect.client.orchestration import get_client

    from hspace.flows.schedule import make_deployment
    from hspace.tasks.config import RunConfig, example_config

    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        args = ("--model", sd_dirs["sd1"], "--prompts", PROMPTS, *BASE, "--eta", "0", "--out", out)
        result = hspace("sample", *args, "--dask-address", cluster.scheduler_address)
        assert result.exit_code == 0, result.output
    local, remote = SampleStore(sd_runs["sd1"] / "samples.zarr"), SampleStore(out / "samples.zarr")
    assert remote.complete()
    for name in ("h", "x0", "seeds", "prompt_index"):
        np.testing.assert_array_equal(remote.group[name][:], local.group[name][:], err_msg=name)
    cfg = yaml.safe_load(example_config("sd"))
    cfg["sample"]["model"] = str(sd_dirs["sd1"])
    config = RunConfig.model_validate(cfg)
    deployment_id = make_deployment(config, "0 4 * * *", "sd-nightly", tmp_path / "scheduled").apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    again = RunConfig.model_validate(deployment.parameters["config"])
    assert again.sample.prompt_list() == config.sample.prompt_list() and again.sample.guidance_scale == 7.5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_api_apply_inside_stable_diffusion_pipelines(sd_dirs, sd_runs, kind, tmp_path):
    """hspace.apply inside diffusers' own StableDiffusion(XL)Pipeline (DDIMScheduler, the
    run's latents, prompt, guidance and eta) gives the image `hspace edit RUN --sample 1`
    writes at gamma 2, edits on both guidance branches (<= 2/255); hooks gone after."""
    from PIL import Image

    import hspace

    run = sd_runs[kind]
    if not (run / "directions" / "pc00.safetensors").exists():
        assert hspace_cli("pca", run, "--components", "2").exit_code == 0
    direction = hspace.open_run(run).direction("pc00")
    grid = tmp_path / "grid.png"
    result = hspace_cli("edit", run, "--sample", "1", "--direction", direction.path, "--scales", "2", "--out", grid)
    assert result.exit_code == 0, result.output
    cli = np.asarray(Image.open(tmp_path / "grid" / "sample1__pc00__gamma+2.png")).astype(np.int16)
    pipe = load_tiny_sd(sd_dirs[kind], kind)
    edited, (call, gen) = applied_in_pipeline(pipe, direction)
    assert np.abs(edited - cli).max() <= 2, np.abs(edited - cli).max()
    plain = SampleStore(run / "samples.zarr").x0[1].astype(np.int16).transpose(1, 2, 0)
    assert np.abs(edited - plain).mean() > 1  # the edit did something
    assert not pipe.unet._forward_pre_hooks and not pipe.unet.mid_block._forward_hooks
    # Asyrp (the edited eps in P_t only) under guidance: the unedited pass's difference is guided too
    args = ("--sample", "1", "--direction", direction.path, "--edit-method", "asyrp", "--scales", "2", "--out", grid)
    assert hspace_cli("edit", run, *args).exit_code == 0
    cli = np.asarray(Image.open(tmp_path / "grid" / "sample1__pc00__gamma+2.png")).astype(np.int16)
    with hspace.apply(pipe, direction, gamma=2.0, method="asyrp"):  # the same call, another method
        out = pipe(**call, eta=0.0, generator=gen, output_type="np").images[0]
    asyrp = np.round(out * 255).astype(np.int16)
    assert np.abs(asyrp - cli).max() <= 2, np.abs(asyrp - cli).max()
    assert np.abs(asyrp - edited).mean() > 0.5  # not the h edit
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks
