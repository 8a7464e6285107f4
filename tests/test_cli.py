"""`hspace sample | inspect | edit` end to end through Prefect (one test server per session),
on tiny random models saved to disk; bad inputs get one clear line, exit != 0, and leave
the disk as it was."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from hspace.data import directions as dirfile
from hspace.data import models
from hspace.data.catalog import RunFolder
from hspace.data.stores import SampleStore
from hspace.flows.cli import app
from hspace.hcore.sampler import make_generators, sample, sample_seed, to_uint8

runner = CliRunner()


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(path)).encode())
            digest.update(p.read_bytes())
    return digest.hexdigest()


def hspace(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# these tests replay samples with DDIM (eta 0) and the model's clipping, as they were written; the
# paper's defaults (eta 1, no clipping) are tested in test_defaults.py
SAMPLE_ARGS = (
    "--n",
    "10",
    "--steps",
    "5",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--eta",
    "0",
    "--clip-sample",
    "model",
)


@pytest.fixture(scope="module")
def run_dir(prefect_server, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    result = hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_sample_stores_what_the_sampler_computes(run_dir, loaded_model):
    store = SampleStore(run_dir / "samples.zarr")
    assert store.h.shape == (10, 5, 16, 8, 8) and store.h.dtype == np.float16
    assert store.h.shards == (4, 5, 16, 8, 8) and store.h.chunks == (4, 1, 16, 8, 8)
    assert store.x0.shape == (10, 3, 16, 16) and store.x0.dtype == np.uint8
    assert store.complete()
    np.testing.assert_array_equal(store.seeds[:], [sample_seed(0, i) for i in range(10)])
    unet, scheduler = loaded_model
    for rows in (range(0, 4), range(4, 8), range(8, 10)):  # the shards' batches (float sums depend on batch size)
        hs = []
        x0 = sample(unet, scheduler, make_generators(0, rows), 5, 0.0, on_step=lambda s, t, h, hs=hs: hs.append(h))
        np.testing.assert_array_equal(store.h[rows.start : rows.stop], torch.stack(hs, 1).half().numpy())
        np.testing.assert_array_equal(store.x0[rows.start : rows.stop], to_uint8(x0).numpy())
    assert not np.isnan(store.h[:].astype(np.float32)).any()
    meta = RunFolder(run_dir).read()
    assert meta["stages"]["sample"]["state"] == "done"
    assert meta["model"]["fingerprint"] and meta["versions"]["torch"]


def test_inspect_reports_arrays_and_shards_without_prefect(run_dir):
    result = hspace("inspect", run_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    arrays = {a["name"]: a for a in report["arrays"]}
    assert arrays["h"]["shards"] == [4, 5, 16, 8, 8] and arrays["h"]["bytes_on_disk"] > 10 * 5 * 16 * 64 * 2
    assert report["shards"] == {"total": 3, "done": 3, "pending": []}
    text = hspace("inspect", run_dir)
    assert "3/3 done" in text.output and "float16" in text.output


def test_rerun_recomputes_only_missing_shards(run_dir, model_dir):
    store = SampleStore(run_dir / "samples.zarr")
    h_before, x_before = store.h[:], store.x0[:]
    store_rw = SampleStore(run_dir / "samples.zarr", mode="r+")
    store_rw.done[1] = 0  # as if the process died before marking shard 1
    store_rw.h[4:8] = np.full((4, 5, 16, 8, 8), np.nan, np.float16)
    store_rw.x0[4:8] = 0
    result = hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", run_dir)
    assert result.exit_code == 0, result.output
    assert RunFolder(run_dir).read()["stages"]["sample"]["recomputed_shards"] == 1
    np.testing.assert_array_equal(SampleStore(run_dir / "samples.zarr").h[:], h_before)
    np.testing.assert_array_equal(SampleStore(run_dir / "samples.zarr").x0[:], x_before)


def write_direction(run_dir: Path, name: str, scale: float = 1.0, **overrides) -> Path:
    meta = RunFolder(run_dir).read()
    v = scale * torch.randn(5, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    md = dirfile.metadata_for_run(meta, method="test", source="tests", scale_unit="raw")
    md.update(overrides)
    return dirfile.save(run_dir / "directions" / f"{name}.safetensors", v, md)


def test_edit_grid_png(run_dir, tmp_path):
    d1 = write_direction(run_dir, "rand1")
    out = tmp_path / "grid.png"
    result = hspace(
        "edit", run_dir, "--sample", "2", "--direction", d1, "--scales", "-1,0,1", "--out", out, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size[0] > 3 * 96
    # sequential mode: every direction with a fixed gamma
    out2 = tmp_path / "seq.png"
    result = hspace(
        "edit",
        run_dir,
        "--sample",
        "2",
        "--direction",
        f"{d1}:1.5",
        "--direction",
        f"{d1}:-0.5",
        "--out",
        out2,
        "--device",
        "cpu",
        "--window",
        "0:3",
        "--asyrp",
    )
    assert result.exit_code == 0, result.output
    assert out2.exists()


def test_edit_gamma_zero_column_is_the_stored_sample(run_dir, loaded_model):
    from hspace.hcore.generator import Replay
    from hspace.tasks.edit import SampleSpec, parse_direction, plan_grid, render_edits

    unet, scheduler = loaded_model
    spec = parse_direction(str(write_direction(run_dir, "rand2")))
    v, _ = dirfile.load(spec.path)
    cells, rows, cols = plan_grid([spec], [-1.0, 0.0, 1.0])
    images = render_edits(unet, scheduler, SampleSpec(Replay(0, 5, 0.0), 2), [v], cells)
    stored = SampleStore(run_dir / "samples.zarr").x0[2]
    np.testing.assert_array_equal(images[0, 1], stored)
    assert np.abs(images[0, 0].astype(int) - stored).max() > 0
    assert cols == ["γ=-1", "γ=+0", "γ=+1"] and rows == ["rand2"]


# ------------------------------------------------------------------------ bad inputs


def assert_refused(result, *needles: str):
    assert result.exit_code != 0, result.output
    assert "error:" in result.output
    for needle in needles:
        assert needle in result.output.replace("\n", " "), result.output


@pytest.fixture()
def frozen_run(run_dir):
    """The run folder's digest before and after the test must agree."""
    before = tree_digest(run_dir)
    yield run_dir
    assert tree_digest(run_dir) == before


def test_bad_sample_inputs(frozen_run, model_dir, tmp_path):
    out = tmp_path / "new"
    assert_refused(hspace("sample", "--model", tmp_path / "nope", "--out", out), "neither 'toy'")
    assert_refused(
        hspace("sample", "--model", "someone/not-cached", "--out", out), "not in the local Hugging Face cache"
    )
    assert_refused(
        hspace("sample", "--model", model_dir, "--n", "0", "--out", out), "--n must be greater than 0, got 0"
    )
    assert_refused(hspace("sample", "--model", model_dir, "--steps", "101", "--out", out), "exceeds the model's 100")
    assert_refused(hspace("sample", "--model", model_dir, "--eta", "-0.1", "--out", out), "--eta must be ")
    assert not out.exists()
    # an --out holding a run with another config is never touched
    assert_refused(
        hspace("sample", "--model", model_dir, *SAMPLE_ARGS[:3], "6", *SAMPLE_ARGS[4:], "--out", frozen_run),
        "different config",
        "steps: stored 5 != requested 6",
    )


def test_other_model_on_existing_run_refused(frozen_run, other_model_dir):
    assert_refused(hspace("sample", "--model", other_model_dir, *SAMPLE_ARGS, "--out", frozen_run), "model: stored")


def test_model_without_mid_block(tmp_path):
    from diffusers import DDPMScheduler

    from tests.conftest import tiny_unet

    tiny_unet(mid_block_type=None).save_pretrained(tmp_path / "m" / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "m" / "scheduler")
    assert_refused(hspace("sample", "--model", tmp_path / "m", "--out", tmp_path / "o"), "no mid_block")


def test_truncated_weights(model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_refused(hspace("sample", "--model", broken, "--out", tmp_path / "o"), "cannot load the UNet")


def test_locked_run_refused_and_remote_lock_needs_flag(frozen_run, model_dir):
    lock = frozen_run / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": "now", "command": "x"}))
    try:
        assert_refused(
            hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", frozen_run), f"locked by pid {os.getpid()}"
        )
        # another host's lock cannot be checked from here: refused, naming --break-lock
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere-node", "started": "then", "command": "x"}))
        assert_refused(
            hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", frozen_run), "another host", "--break-lock"
        )
        assert lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_dead_owners_lock_is_taken_over_and_remote_one_on_request(run_dir, model_dir, caplog):
    """(What a real terminal shows is checked by test_resume, a kill -9 and a plain rerun.)"""
    lock = run_dir / ".lock"
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename, "started": "then", "command": "x"}))
    result = hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", run_dir)  # the same command, no flag
    assert result.exit_code == 0, result.output
    assert f"took over the lock of pid {2**22 + 12345}" in caplog.text and "no longer running" in caplog.text
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere-node", "started": "then", "command": "x"}))
    result = hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", run_dir, "--break-lock")
    assert result.exit_code == 0, result.output
    assert "took over the lock of pid 1 on elsewhere-node" in caplog.text and "as --break-lock asked" in caplog.text
    assert not lock.exists()


def test_more_bad_sample_and_edit_inputs(frozen_run, model_dir, tmp_path):
    out = tmp_path / "new"
    assert_refused(hspace("sample", "--model", model_dir, "--eta", "1.5", "--out", out), "--eta must be ")
    assert_refused(hspace("sample", "--model", model_dir, "--device", "tpu9", "--out", out), "--device")
    assert not out.exists()
    d = write_direction(frozen_run, "tmpdir")
    try:
        assert_refused(
            hspace("edit", frozen_run, "--sample", "0", "--direction", d, "--scales", ",", "--out", tmp_path / "g.png"),
            "--scales is empty",
        )
        assert_refused(
            hspace("edit", frozen_run, "--sample", "0", "--direction", f"{d}:nan", "--out", tmp_path / "g.png"),
            "finite",
        )
        assert_refused(
            hspace("edit", "--model", model_dir, "--eta", "-1", "--direction", d, "--out", tmp_path / "g.png"),
            "--eta must be ",
        )
    finally:
        d.unlink()
    assert not (tmp_path / "g.png").exists()


def test_moved_model_is_reported(run_dir, model_dir, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    out = tmp_path / "run"
    assert hspace("sample", "--model", moved, *SAMPLE_ARGS, "--out", out).exit_code == 0
    shutil.rmtree(moved)
    d = dirfile.save(
        out / "directions" / "x.safetensors",
        torch.zeros(5, 16, 8, 8),
        dirfile.metadata_for_run(RunFolder(out).read(), method="t", source="t", scale_unit="raw"),
    )
    assert_refused(
        hspace("edit", out, "--sample", "0", "--direction", d, "--out", tmp_path / "g.png"), "does not exist"
    )
    # the same weights at a new place resume fine; the run records the new place
    shutil.copytree(model_dir, moved)
    assert hspace("sample", "--model", moved, *SAMPLE_ARGS, "--out", out).exit_code == 0


def test_unwritable_out(model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_refused(hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", blocker / "run"), "cannot write")
    assert blocker.read_text() == "not a folder"


def test_directions_from_elsewhere_refused(frozen_run, tmp_path):
    d_model = write_direction(frozen_run, "x", model="0" * 64)
    d_steps = write_direction(frozen_run, "y", steps=7)
    try:
        for path, needle in ((d_model, "another model"), (d_steps, "another number of steps")):
            assert_refused(
                hspace("edit", frozen_run, "--sample", "0", "--direction", path, "--out", tmp_path / "g.png"), needle
            )
        assert_refused(
            hspace("edit", frozen_run, "--sample", "99", "--direction", d_model, "--out", tmp_path / "g.png"),
            "--sample must be an index",
        )
        assert not (tmp_path / "g.png").exists()
    finally:
        d_model.unlink()
        d_steps.unlink()


def test_inspect_of_non_run(tmp_path):
    assert_refused(hspace("inspect", tmp_path), "not an hspace run")
    (tmp_path / "run.json").write_text("{broken")
    assert_refused(hspace("inspect", tmp_path), "not valid JSON")


def test_zarr_chunks_carry_checksums(run_dir):
    h = zarr.open_array(run_dir / "samples.zarr" / "h", mode="r")
    codecs = json.dumps(h.metadata.to_dict()["codecs"])
    assert "crc32c" in codecs


@pytest.fixture(scope="module")
def random_oracle(tmp_path_factory) -> Path:
    from hspace.data.annotators import save_oracle
    from hspace.data.toy import faces as toyfaces
    from hspace.hcore.annotators import OracleNet

    torch.manual_seed(1)
    net = OracleNet(list(toyfaces.BINARY_ATTRIBUTES), list(toyfaces.POSE_ATTRIBUTES), width=8).eval()
    return save_oracle(net, tmp_path_factory.mktemp("oracle") / "o")


def test_annotate_writes_scores_and_resumes(run_dir, random_oracle):
    from hspace.data.annotators import load_annotator
    from hspace.data.stores import AnnotationStore

    spec = f"oracle:{random_oracle}"
    result = hspace("annotate", run_dir, "--annotator", spec, "--batch-size", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(run_dir / "annotations.zarr", mode="r")
    scores, names = group["scores"][:], list(group["scores"].attrs["names"])
    assert scores.shape == (10, 8) and names[:2] == ["Smiling", "Eyeglasses"]
    x0 = torch.from_numpy(SampleStore(run_dir / "samples.zarr").x0[:]).float() / 127.5 - 1
    np.testing.assert_allclose(scores, load_annotator(spec).score(x0).numpy(), atol=1e-5)
    # lose one chunk's marker and values: only that chunk is recomputed, in the rows of the
    # array's own chunking even when --batch-size differs on resume
    from hspace.data.annotators import annotator_id

    key = annotator_id(spec)
    store = AnnotationStore(run_dir / "annotations.zarr")
    store.group[f"by_annotator/{key}.done"][1] = 0
    store.group[f"by_annotator/{key}"][4:8] = np.nan
    result = hspace("annotate", run_dir, "--annotator", spec, "--batch-size", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert RunFolder(run_dir).read()["stages"]["annotate"]["state"] == "done"
    np.testing.assert_array_equal(zarr.open_group(run_dir / "annotations.zarr", mode="r")["scores"][:], scores)


def test_other_oracle_file_gets_its_own_columns(run_dir, random_oracle, tmp_path):
    from hspace.data.annotators import annotator_id

    other = tmp_path / "other"
    import shutil

    shutil.copytree(random_oracle, other)
    (other / "oracle.safetensors").write_bytes((random_oracle / "oracle.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    assert annotator_id(f"oracle:{other}") != annotator_id(f"oracle:{random_oracle}")


def test_annotate_bad_inputs(frozen_run, tmp_path):
    assert_refused(hspace("annotate", frozen_run, "--annotator", "celebA99"), "unknown annotator")
    assert_refused(hspace("annotate", frozen_run, "--annotator", f"oracle:{tmp_path}"), "no oracle in")
    (tmp_path / "config.json").write_text(
        json.dumps({"binary": ["A"], "pose": [], "size": 32, "width": 8, "pose_scale": 30.0})
    )
    (tmp_path / "oracle.safetensors").write_bytes(b"garbage")
    assert_refused(hspace("annotate", frozen_run, "--annotator", f"oracle:{tmp_path}"), "cannot load the oracle")
    assert_refused(hspace("annotate", tmp_path / "nothing"), "not an hspace run")


def test_inspect_is_fast_and_never_imports_prefect_or_torch(run_dir):
    import subprocess
    import sys
    import time

    code = (
        "import sys, time; t = time.time(); from typer.testing import CliRunner; from flows.cli import app; "
        f"r = CliRunner().invoke(app, ['inspect', {str(run_dir)!r}]); assert r.exit_code == 0, r.output; "
        "print('prefect' in sys.modules, 'torch' in sys.modules, time.time() - t)"
    )
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1]
    )
    wall = time.time() - t0
    assert out.returncode == 0, out.stderr
    prefect_loaded, torch_loaded, inside = out.stdout.split()
    assert prefect_loaded == "False" and torch_loaded == "False"
    assert float(inside) < 2.0, f"inspect took {inside} s (process start-up included: {wall:.2f} s)"


def test_model_fingerprint_is_hashed_once_per_file_version(model_dir, tmp_path, monkeypatch):
    """A command resolves its model several times; the weights are read once, and a
    rewritten weight file (same size, other bytes) gets a new fingerprint."""
    import hashlib
    import os
    import shutil

    from hspace.data import models

    folder = shutil.copytree(model_dir, tmp_path / "m")
    calls, sha256 = [], hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda: calls.append(1) or sha256())
    first = models.resolve(str(folder)).fingerprint
    assert models.resolve(str(folder)).fingerprint == first and len(calls) == 1
    weights = next((folder / "unet").glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    stat = weights.stat()
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # not the same version, even on a coarse clock
    second = models.resolve(str(folder)).fingerprint
    assert second != first and len(calls) == 2


def test_hf_id_resolves_through_local_cache(model_dir, tmp_path, monkeypatch):
    """A Hugging Face id is looked up in the local cache (snapshot folders named by
    commit), never downloaded without --allow-download."""
    import shutil

    from hspace.data import models

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-ddpm"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = models.resolve("someone/tiny-ddpm")
    assert ref.revision == commit and ref.fingerprint == models.resolve(str(model_dir)).fingerprint
    unet, _ = models.load(ref)
    assert unet.config.sample_size == 16


def test_attribute_changes_against_separate_renders(run_dir, loaded_model, random_oracle):
    from hspace.data.annotators import load_annotator
    from hspace.hcore.metrics import attribute_changes, name_by_spread
    from hspace.hcore.sampler import Edit

    unet, scheduler = loaded_model
    net = load_annotator(f"oracle:{random_oracle}")
    replay = models.replay_for_run(RunFolder(run_dir).read())
    v, _ = dirfile.load(write_direction(run_dir, "probe", scale=30.0))
    got = attribute_changes(unet, scheduler, net, replay, [0, 3], [v, torch.zeros_like(v)], gamma=2.0)
    plus = sample(unet, scheduler, make_generators(0, [0, 3]), 5, 0.0, edit=Edit([v], [2.0]))
    minus = sample(unet, scheduler, make_generators(0, [0, 3]), 5, 0.0, edit=Edit([v], [-2.0]))
    ref = ((net.score(plus) - net.score(minus)) / 2).mean(0).numpy()
    np.testing.assert_allclose(got[0], ref, atol=1e-5)
    assert np.abs(got[0]).max() > 1e-6  # (a random oracle on a random model barely reacts)
    np.testing.assert_array_equal(got[1], 0)  # a zero direction moves nothing
    table = name_by_spread(
        np.array([[0.01, 0.0, 5.0], [0.3, 0.0, 1.0]]),
        ["Smiling", "Male", "yaw"],
        ["a", "b"],
        attribute_scale=np.array([0.4, 0.4, 10.0]),
    )
    assert [row["name"] for row in table] == ["yaw", "Smiling"]


def test_name_command(run_dir, random_oracle):
    write_direction(run_dir, "pcx", scale=3.0)
    result = hspace(
        "name", run_dir, "--directions", "pcx", "--annotator", f"oracle:{random_oracle}", "--n", "2", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert (run_dir / "eval" / "pc_names.md").exists() and "pcx ≈" in result.output
    assert_refused(hspace("name", run_dir, "--directions", "nope", "--device", "cpu"), "no direction file")


def test_jacobian_command_replays_x_t_and_writes_results(run_dir, loaded_model, tmp_path):
    from diffusers import DDIMScheduler

    from hspace.data.stores import JacobianStore
    from hspace.hcore.sampler import draw_noise

    result = hspace(
        "jacobian",
        run_dir,
        "--sample",
        "1",
        "--step",
        "2",
        "--k",
        "3",
        "--max-iters",
        "60",
        "--roi",
        "2,2,12,12",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    arrays, attrs = JacobianStore(run_dir / "jacobian.zarr").read(1, 2)
    assert arrays["vectors"].shape == (3, 16, 8, 8) and arrays["singular_values"].shape == (3,)
    assert attrs["roi"] == "2,2,12,12"
    # independent replay with diffusers' own scheduler: same x_T, two DDIM steps
    unet, scheduler = loaded_model
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(5)
    x = draw_noise(make_generators(0, [1]), (3, 16, 16))
    with torch.no_grad():
        for t in sched.timesteps[:2]:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    np.testing.assert_allclose(arrays["x_t"], x[0].numpy(), atol=1e-5)
    assert attrs["t"] == int(sched.timesteps[2])
    v, md = dirfile.load(run_dir / "directions" / "jac_s1_t2_00.safetensors")
    assert v.shape == (5, 16, 8, 8) and torch.allclose(v[0], v[4])
    np.testing.assert_allclose(v[0].numpy(), arrays["vectors"][0], atol=1e-6)
    out = tmp_path / "jac.png"
    assert (
        hspace(
            "edit",
            run_dir,
            "--sample",
            "3",
            "--direction",
            run_dir / "directions" / "jac_s1_t2_00.safetensors",
            "--scales",
            "-5,0,5",
            "--out",
            out,
            "--device",
            "cpu",
        ).exit_code
        == 0
    )


@pytest.mark.slow
def test_jacobian_bad_inputs(frozen_run, tmp_path):
    for args, needle in (
        (["--step", "5"], "--step 5 must be in [0, 5)"),
        (["--sample", "10"], "--sample 10 must be in"),
        (["--roi", "1,2,3"], "is not x0,y0,x1,y1"),
        (["--roi", "0,0,40,4"], "must satisfy"),
        (["--k", "5000"], "--k 5000 must be between"),
        (["--mask", str(tmp_path / "none.png")], "cannot read it"),
        (["--localize", "8"], "--localize needs a region"),
        (["--roi", "2,2,12,12", "--k", "4", "--localize", "3"], "--localize 3 must be between --k 4"),
    ):
        assert_refused(hspace("jacobian", frozen_run, *args, "--device", "cpu"), needle)


@pytest.mark.slow
def test_jacobian_localize_command(run_dir, loaded_model):
    """--localize: the saved direction lies in the unmasked J's top-R subspace and its share
    of the change of eps inside the ROI is at least that of each of those R vectors."""
    from hspace.data.stores import JacobianStore
    from hspace.hcore import jacobian as jac

    common = ["--sample", "1", "--step", "2", "--max-iters", "300", "--tol", "1e-7", "--device", "cpu"]
    assert hspace("jacobian", run_dir, *common, "--k", "6").exit_code == 0
    full, _ = JacobianStore(run_dir / "jacobian.zarr").read(1, 2)
    result = hspace("jacobian", run_dir, *common, "--k", "1", "--roi", "2,2,8,8", "--localize", "6")
    assert result.exit_code == 0 and "inside the region:" in result.output
    assert "jacobian (subspace iterations)" in result.output and "(tol" in result.output  # the progress bar
    local, attrs = JacobianStore(run_dir / "jacobian.zarr").read(1, 2)
    assert attrs["localize"] == 6 and len(attrs["share_inside"]) == 1
    # independent check of the share with a JVP at the stored point
    unet, _ = loaded_model
    x_t, t = torch.from_numpy(local["x_t"]), attrs["t"]
    from hspace.hcore.hooks import HSpaceHook

    with torch.no_grad(), HSpaceHook(unet) as hs:
        unet(x_t[None], t)
        h0 = hs.last_h[0].clone()
    f = jac.eps_of_h(unet, x_t, t)
    mask = jac.roi_mask((16, 16), (2, 2, 8, 8)).expand(1, 3, 16, 16).reshape(-1)

    def share(v):
        jv = jac.jvp(f, h0, torch.from_numpy(v)[None])[0]
        return float((jv**2 * mask).sum() / (jv**2).sum())

    best = share(local["vectors"][0])
    assert best == pytest.approx(attrs["share_inside"][0], rel=1e-3)
    saved, md = dirfile.load(run_dir / "directions" / "jac_s1_t2_00.safetensors")
    assert (saved[:2] == 0).all() and torch.allclose(saved[2], saved[4]) and "from step 2 on" in md["scale_unit"]
    assert all(best >= share(v) - 1e-4 for v in full["vectors"])
    basis = full["vectors"].reshape(6, -1)
    v = local["vectors"][0].reshape(-1)
    assert np.linalg.norm(basis.T @ (basis @ v)) == pytest.approx(1.0, abs=1e-3)  # in the top-6 span


def test_xT_direction_edit_moves_the_initial_noise(run_dir, loaded_model):
    from hspace.hcore.generator import Replay
    from hspace.hcore.sampler import draw_noise
    from hspace.tasks.edit import SampleSpec, parse_direction, plan_grid, render_edits

    unet, scheduler = loaded_model
    meta = RunFolder(run_dir).read()
    v = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    md = dirfile.metadata_for_run(meta, method="t", source="t", scale_unit="raw")
    md["h_point"] = "xT"
    path = dirfile.save(run_dir / "directions" / "noise_xT.safetensors", v, md)
    spec = parse_direction(str(path))
    cells, _, _ = plan_grid([spec], [0.0, 0.5])
    images = render_edits(unet, scheduler, SampleSpec(Replay(0, 5, 0.0), 4), [dirfile.load(path)[0]], cells)
    np.testing.assert_array_equal(images[0, 0], SampleStore(run_dir / "samples.zarr").x0[4])
    x_T = draw_noise(make_generators(0, [4]), (3, 16, 16)) + 0.5 * v
    ref = to_uint8(sample(unet, scheduler, make_generators(0, [4]), 5, 0.0, x_T=x_T)).numpy()[0]
    np.testing.assert_array_equal(images[0, 1], ref)
    path.unlink()


def test_evaluate_writes_table1_files_that_reload(run_dir, random_oracle, loaded_model):
    import csv

    from hspace.data.annotators import load_annotator
    from hspace.hcore.sampler import Edit

    meta = RunFolder(run_dir).read()
    for name, seed in (("Smiling", 5), ("Male", 6)):
        v = 20 * torch.randn(5, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
        # built from samples 0..6: samples 7..9 are the held-out ones evaluate edits
        md = dirfile.metadata_for_run(
            meta, method="t", source="t", scale_unit="raw", attribute=name, samples_ranked=7 if seed == 5 else 3
        )
        dirfile.save(run_dir / "directions" / f"{name}.safetensors", v, md)
    # eq. (11) is the disentangle stage's: evaluate scores the files it wrote
    assert hspace("disentangle", run_dir, "--direction", "Smiling,Male").exit_code == 0
    result = hspace(
        "evaluate",
        run_dir,
        "--directions",
        "Smiling,Male",
        "--disentangled",
        "--evaluator",
        f"oracle:{random_oracle}",
        "--gamma",
        "1.5",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    out = run_dir / "eval"
    rows = list(csv.reader((out / "leakage_original.csv").open()))
    assert rows[0][0] == "direction" and rows[0][1:3] == ["Smiling", "Eyeglasses"] and rows[1][0] == "Smiling"
    table = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
    # independent reference for the first row: edited minus original, by hand
    unet, scheduler = loaded_model
    net = load_annotator(f"oracle:{random_oracle}")
    v, _ = dirfile.load(run_dir / "directions" / "Smiling.safetensors")
    gens = lambda: make_generators(0, [7, 8, 9])  # noqa: E731
    edited = net.score(sample(unet, scheduler, gens(), 5, 0.0, edit=Edit([v], [1.5])))
    plain = net.score(sample(unet, scheduler, gens(), 5, 0.0))
    np.testing.assert_allclose(table[0], (edited - plain).mean(0).numpy(), atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    names = rows[0][1:]
    diag = np.mean([abs(table[0, names.index("Smiling")]), abs(table[1, names.index("Male")])])
    assert summary["original"]["mean_diagonal"] == pytest.approx(diag, abs=1e-6)
    assert summary["n"] == 3 and summary["held_out_from"] == 7 and summary["original"]["gamma"]["Male"] == 1.5
    # probabilities and degrees are summarised apart
    binary = [j for j, c in enumerate(names) if c not in ("yaw", "pitch", "roll")]
    off = [abs(table[i, j]) for i, r in enumerate(["Smiling", "Male"]) for j in binary if names[j] != r]
    assert summary["original"]["mean_offdiagonal"] == pytest.approx(np.mean(off), abs=1e-6)
    pose = [abs(table[i, j]) for i in range(2) for j, c in enumerate(names) if c in ("yaw", "pitch", "roll")]
    assert summary["original"]["degrees"]["mean_offdiagonal"] == pytest.approx(np.mean(pose), abs=1e-6)
    assert (out / "leakage_disentangled.csv").exists() and (out / "leakage_original.png").exists()
    assert "| Smiling |" in (out / "leakage_original.md").read_text()
    assert summary["disentangled_against"] == {"Smiling": ["Male"], "Male": ["Smiling"]} and summary["keep_norm"]


@pytest.mark.slow
def test_evaluate_with_clip_and_auto_gamma_errors(run_dir, clip_dir, random_oracle):
    meta = RunFolder(run_dir).read()
    v = 20 * torch.randn(5, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    md = dirfile.metadata_for_run(meta, method="t", source="t", scale_unit="raw", attribute="Smiling", samples_ranked=6)
    dirfile.save(run_dir / "directions" / "SmileC.safetensors", v, md)
    result = hspace("evaluate", run_dir, "--directions", "SmileC", "--evaluator", f"clip:{clip_dir}", "--device", "cpu")
    assert result.exit_code == 0, result.output
    # no eq. (11) file for it (no `hspace disentangle`): said, and left out of that table
    assert "no eq. (11) file for SmileC" in result.output
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["n"] == 4 and summary["held_out_from"] == 6 and "degrees" not in summary["original"]
    header = (run_dir / "eval" / "leakage_original.csv").read_text().splitlines()[0]
    assert header == "direction,Smiling,Eyeglasses,Wearing_Hat,Male,Young"
    before = tree_digest(run_dir)
    args = ("--device", "cpu")
    assert_refused(
        hspace("evaluate", run_dir, "--directions", "SmileC", "--evaluator", f"clip:{run_dir}", *args),
        "is not a CLIP model",
    )
    assert_refused(hspace("evaluate", run_dir, "--directions", "SmileC,Nope", *args), "['Nope']", "this run has:")
    assert_refused(
        hspace("evaluate", run_dir, "--directions", "SmileC", "--n", "5", *args),
        "only 4 held-out samples",
        "indices 6..9",
    )
    assert_refused(hspace("evaluate", run_dir, "--directions", "SmileC", "--gamma", "big", *args), "--gamma must be")
    # --gamma auto keeps its calibration samples out of the evaluated ones
    assert_refused(
        hspace(
            "evaluate",
            run_dir,
            "--directions",
            "SmileC",
            "--gamma",
            "auto",
            "--n",
            "4",
            "--calibration-n",
            "2",
            "--evaluator",
            f"oracle:{random_oracle}",
            *args,
        ),
        "2 of them kept for --gamma auto's calibration",
        "use --n 2",
    )
    # a direction of a column the evaluator does not score cannot be calibrated
    md["attribute"] = "Bald"
    dirfile.save(run_dir / "directions" / "BaldC.safetensors", v, md)
    before = tree_digest(run_dir)
    assert_refused(
        hspace(
            "evaluate",
            run_dir,
            "--directions",
            "BaldC",
            "--gamma",
            "auto",
            "--evaluator",
            f"oracle:{random_oracle}",
            *args,
        ),
        "no attribute the evaluator scores",
    )
    bad = run_dir.parent / "prompts.yaml"
    bad.write_text("Smiling: just one prompt\n")
    assert_refused(
        hspace(
            "evaluate", run_dir, "--directions", "SmileC", "--evaluator", f"clip:{clip_dir}", "--prompts", bad, *args
        ),
        "--prompts must be",
        "mapping attribute -> [positive prompt, negative prompt]",
    )
    assert tree_digest(run_dir) == before


def test_verify_detects_flipped_bytes_and_truncation(tmp_path, model_dir):
    out = tmp_path / "run"
    assert hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", out).exit_code == 0
    assert hspace("verify", out).exit_code == 0
    good = SampleStore(out / "samples.zarr").h[:]
    shards = sorted(p for p in (out / "samples.zarr" / "h").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(shards) == 3
    raw = bytearray(shards[1].read_bytes())
    raw[100] ^= 0xFF  # flip a byte inside shard 1's first chunk
    shards[1].write_bytes(bytes(raw))
    shards[2].write_bytes(shards[2].read_bytes()[:50])  # truncate shard 2
    result = hspace("verify", out)
    assert result.exit_code == 1
    text = result.output.replace("\n", " ")
    assert "shard 1" in text and "shard 2" in text and "shard 0" not in text
    assert hspace("verify", out, "--fix").exit_code == 1
    assert SampleStore(out / "samples.zarr").pending_shards() == [1, 2]
    assert hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", out).exit_code == 0
    assert hspace("verify", out).exit_code == 0
    np.testing.assert_array_equal(SampleStore(out / "samples.zarr").h[:], good)


def test_verify_reports_a_damaged_marker_and_changed_weights_are_refused(tmp_path, model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "run"
    assert hspace("sample", "--model", model, *SAMPLE_ARGS, "--out", out).exit_code == 0
    marker = out / "samples.zarr" / "done" / "c" / "1"
    raw = bytearray(marker.read_bytes())
    raw[0] ^= 0xFF
    marker.write_bytes(bytes(raw))
    result = hspace("verify", out)
    assert result.exit_code == 1 and "shard 1 marker" in result.output.replace("\n", " ")
    d = dirfile.save(
        out / "directions" / "x.safetensors",
        torch.zeros(5, 16, 8, 8),
        dirfile.metadata_for_run(RunFolder(out).read(), method="t", source="t", scale_unit="raw"),
    )
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, str(weights))
    for args in (["evaluate", out, "--directions", "x"], ["jacobian", out], ["name", out, "--directions", "x"]):
        assert_refused(hspace(*args, "--device", "cpu"), "is not the one this run was made with")
    assert d.exists()


@pytest.mark.slow
def test_sampling_on_a_dask_cluster_equals_the_local_run(run_dir, model_dir, tmp_path):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        out = tmp_path / "dask"
        result = hspace(
            "sample", "--model", model_dir, *SAMPLE_ARGS, "--out", out, "--dask-address", cluster.scheduler_address
        )
        assert result.exit_code == 0, result.output
    local, remote = SampleStore(run_dir / "samples.zarr"), SampleStore(out / "samples.zarr")
    assert remote.complete()
    for name in ("h", "x0", "seeds", "timesteps"):
        np.testing.assert_array_equal(getattr(remote, name)[:], getattr(local, name)[:], err_msg=name)
    assert_refused(
        hspace(
            "sample", "--model", model_dir, *SAMPLE_ARGS, "--out", tmp_path / "x", "--dask-address", "tcp://127.0.0.1:9"
        ),
        "cannot reach the Dask scheduler",
    )


def test_flow_runs_are_named_after_the_run_folder_and_tagged(run_dir):
    """In the Prefect UI the runs of one folder or one model are found by name or tag."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    fingerprint = RunFolder(run_dir).read()["model"]["fingerprint"]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{run_dir} sample"])))
    assert runs, f"no flow run named '{run_dir} sample'"
    # several commands ran on this folder (refused ones with another --model are tagged with that model)
    assert any({f"run:{run_dir.name}", f"model:{fingerprint[:12]}"} <= set(r.tags) for r in runs), runs
