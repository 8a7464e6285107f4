"""Disk space, on a real small disk (a 3 MB tmpfs mounted as root, which CI runs as): a run
that cannot fit is refused before any work with one line (needed, free, where) and nothing
on disk; a disk that another writer fills mid-run ends in one `error:` line, keeps every
finished shard, `hspace verify` names the unfinished ones, and a rerun with room resumes to
arrays bitwise identical to an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hspace.data.catalog import RunError, RunFolder
from hspace.data.disk import free_bytes, require_space
from hspace.data.stores import SampleStore

HSPACE = str(Path(sys.executable).with_name("hspace"))
ARGS = ("--model", "toy", "--steps", "10", "--batch-size", "4", "--device", "cpu")  # 44 KB per sample


def hspace(*args):
    """A command in this process (what the user's shell would print is ``output``)."""
    from typer.testing import CliRunner

    from hspace.flows.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture
def small_disk(tmp_path):
    if os.getuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_require_space_names_needed_free_and_where(tmp_path):
    free, where = free_bytes(tmp_path / "not" / "yet")
    assert where == tmp_path and free == shutil.disk_usage(tmp_path).free
    require_space(tmp_path / "x", 1, "a tiny stage")
    with pytest.raises(RunError, match=r"a huge stage needs 1\d\.\d PB|a huge stage needs \d+\.\d TB"):
        require_space(tmp_path / "x", 10**16, "a huge stage")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_refused_before_work_and_a_disk_filled_mid_run_resumes(small_disk, tmp_path, prefect_server):
    # 96 samples need 4.2 MB: refused before anything is written, one line with needed and free
    too_big = hspace("sample", *ARGS, "--n", "96", "--out", small_disk / "big")
    assert too_big.exit_code == 2, too_big.output
    [line] = error_lines(too_big.output)
    assert "sampling 96 samples needs 4.2 MB on disk" in line and "MB free" in line and str(small_disk) in line
    assert os.listdir(small_disk) == []
    run_too_big = tmp_path / "run.yaml"
    run_too_big.write_text(  # its samples fit (1.1 MB); with PCA and directions it does not
        "device: cpu\nsample: {model: toy, n: 24, steps: 10, batch_size: 4}\npca: {components: 10}\n"
        "directions: {held_out: 8, top: 4}\n"
    )
    refused = hspace("run", "--config", run_too_big, "--out", small_disk / "pipeline")
    assert refused.exit_code == 2, refused.output
    [line] = error_lines(refused.output)
    assert "this run (sample, annotate" in line and "MB on disk but" in line and "MB free" in line, line
    assert os.listdir(small_disk) == []

    # the reference: the same 24 samples, uninterrupted, on a roomy disk
    reference = tmp_path / "reference"
    assert hspace("sample", *ARGS, "--n", "24", "--out", reference).exit_code == 0

    # 24 samples fit (1.1 MB); once the first shard is written another writer takes the rest
    run = small_disk / "run"
    proc = subprocess.Popen(
        [HSPACE, "sample", *ARGS, "--n", "24", "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HSPACE_NO_WORKER": "1"},
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if SampleStore(run / "samples.zarr").done[0] == 1:
                break
        except (RunError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.02)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    [line] = error_lines(err)
    assert "the disk filled while writing shard" in line and "rerun to resume" in line, err
    assert "Traceback" not in err
    store = SampleStore(run / "samples.zarr")
    done, pending = list(store.done_shards()), store.pending_shards()
    assert 0 in done and pending, (done, pending)
    verify = hspace("verify", run)
    for k in pending:
        assert f"samples shard {k}" in verify.output, verify.output
    kept = {k: store.h[k * 4 : (k + 1) * 4] for k in done}

    filler.unlink()
    again = hspace("sample", *ARGS, "--n", "24", "--out", run)
    assert again.exit_code == 0, again.output
    assert f"{len(pending)} shards computed" in again.output
    resumed, expected = SampleStore(run / "samples.zarr"), SampleStore(reference / "samples.zarr")
    assert resumed.complete()
    for name in ("h", "x0", "seeds"):
        np.testing.assert_array_equal(resumed.group[name][:], expected.group[name][:], err_msg=name)
    for k, h in kept.items():  # what was finished before the disk filled is what it was
        np.testing.assert_array_equal(resumed.h[k * 4 : (k + 1) * 4], h)
    # a later stage is checked before it starts too: PCA's arrays do not fit in what is left
    pca = hspace("pca", run, "--components", "10", "--device", "cpu")
    assert pca.exit_code == 2, pca.output
    [line] = error_lines(pca.output)
    assert "the pca stage needs" in line and "MB free" in line, line
    assert not (run / "pca.zarr").exists() and "pca" not in RunFolder(run).read()["stages"]
