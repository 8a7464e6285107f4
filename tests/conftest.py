"""Shared fixtures: tiny random diffusers models saved to disk and loaded through the same
code path a user's folder takes, and one Prefect test server for the whole session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# one intra-op thread: on a 2-core machine shared with Prefect servers and Dask workers,
# OpenMP's spinning barriers make multi-threaded torch crawl (measured: 20 s -> 8+ min)
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_unet(seed: int = 0, sample_size: int = 16, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        add_attention=False,
        **overrides,
    ).eval()


def tiny_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", clip_sample=True)


def save_model_folder(path: Path, seed: int = 0) -> Path:
    """A pipeline-style folder (unet/ + scheduler/), like google/ddpm-ema-celebahq-256."""
    tiny_unet(seed).save_pretrained(path / "unet")
    tiny_scheduler().save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("models") / "tiny-other", seed=1)


@pytest.fixture(scope="session")
def loaded_model(model_dir):
    from data import models

    return models.load(models.resolve(str(model_dir)))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One ephemeral Prefect API for all tests that run flows (start-up costs 10-25 s)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
