"""Bad inputs from the reliability catalogue (README "Bad inputs"): each gets one clear
error line, a non-zero exit, and leaves what is on disk unchanged."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from typer.testing import CliRunner

from hspace.data.stores import SampleStore
from hspace.flows.cli import app
from tests.test_cli import SAMPLE_ARGS, assert_refused, tree_digest

runner = CliRunner()


def hspace(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sampled(prefect_server, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    result = hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def copy_of(sampled, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sampled, run)
    return run


@pytest.mark.slow
def test_run_json_edited_by_hand(copy_of, model_dir):
    meta = json.loads((copy_of / "run.json").read_text())
    meta["config"]["n"] = 12  # the user "grew" the run by editing run.json
    (copy_of / "run.json").write_text(json.dumps(meta))
    before = tree_digest(copy_of)
    args = ["--n", "12", *SAMPLE_ARGS[2:]]
    assert_refused(hspace("sample", "--model", model_dir, *args, "--out", copy_of), "edited by hand", "n: run.json 12")
    del meta["stages"]
    (copy_of / "run.json").write_text(json.dumps(meta))
    before = tree_digest(copy_of)
    assert_refused(hspace("annotate", copy_of), "lacks the key 'stages'")
    assert tree_digest(copy_of) == before


def test_disk_full_during_sampling_loses_nothing(copy_of, model_dir, monkeypatch):
    store = SampleStore(copy_of / "samples.zarr", mode="r+")
    store.done[1] = 0  # one shard to redo
    before = tree_digest(copy_of / "samples.zarr" / "h")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SampleStore, "write_shard", full)
    assert_refused(hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", copy_of), "No space left on device")
    assert tree_digest(copy_of / "samples.zarr" / "h") == before  # the other shards are untouched
    assert not (copy_of / ".lock").exists()
    monkeypatch.undo()
    result = hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", copy_of)  # resumes once there is space
    assert result.exit_code == 0, result.output
    assert SampleStore(copy_of / "samples.zarr").complete()


def test_read_only_run_folder(copy_of, model_dir, monkeypatch):
    import os

    import hspace.data.catalog as catalog

    before = tree_digest(copy_of)
    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).startswith(str(copy_of)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(catalog.os, "open", read_only_open)
    assert_refused(
        hspace("annotate", copy_of, "--device", "cpu"), "Read-only file system", "inspect and verify work as is"
    )
    assert_refused(hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", copy_of), "Read-only file system")
    real_access = os.access
    monkeypatch.setattr(
        catalog.os,
        "access",
        lambda path, mode: mode != os.W_OK and real_access(path, mode) if path == copy_of else real_access(path, mode),
    )
    assert_refused(hspace("pca", copy_of, "--components", "2"), "is not writable")
    monkeypatch.undo()
    # read-only commands need no lock
    assert hspace("inspect", copy_of).exit_code == 0
    assert hspace("verify", copy_of).exit_code == 0
    assert tree_digest(copy_of) == before


def test_nan_in_h_is_caught_at_write_time_and_named(prefect_server, model_dir, tmp_path):
    """A NaN in h (fp16 overflow, a broken model) fails the shard, naming sample and step;
    the shard is not marked done, so nothing half-written is ever read as complete."""
    import torch

    from hspace.data import models
    from hspace.tasks.sample import cached_model

    ref = models.resolve(str(model_dir))
    unet, _ = cached_model(str(ref.path), ref.fingerprint, "cpu", "float32", True)  # as run_shard (--clip-sample model)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # the third U-Net pass of the first shard: step 2
            output = output.clone()
            output[1] = float("nan")
            return output
        return None

    handle = unet.mid_block.register_forward_hook(poison)
    out = tmp_path / "nan"
    try:
        result = hspace("sample", "--model", model_dir, *SAMPLE_ARGS, "--out", out)
    finally:
        handle.remove()
    assert_refused(result, "h of sample 1 at step 2", "is NaN/Inf")
    store = SampleStore(out / "samples.zarr")
    assert store.done[0] == 0  # the poisoned shard is pending, not done
    assert torch.isnan(torch.from_numpy(store.h[0:4].astype("float32"))).all()  # never written


def test_too_few_samples_for_the_default_held_out_says_what_to_pass(copy_of):
    """A run of 10 samples with the default --held-out 64 (what `hspace run` keeps for evaluate):
    the refusal names a --held-out that works, and nothing is written."""
    before = tree_digest(copy_of)
    result = hspace("directions", copy_of, "--attribute", "Smiling", "--device", "cpu")
    assert_refused(result, "--held-out 64 (the default", "of this run's 10", "--held-out N with N at most 8")
    assert "--held-out 2" in result.output and "--held-out 0 to use them all" in result.output
    assert tree_digest(copy_of) == before
