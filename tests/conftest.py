"""Shared fixtures: tiny random diffusers models saved to disk and loaded through the same
code path a user's folder takes, and one Prefect test server for the whole session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# hspace is imported as installed (pip install -e .): hspace.data, hspace.flows, ...

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")  # the suite's server serves no UI: it starts faster
# every flow run of the suite records to one standing server in a PREFECT_HOME of its own
# (never the user's ~/.prefect); subprocess commands inherit it and find the same server
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="hspace-test-prefect-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ.pop("PREFECT_API_URL", None)
# one intra-op thread: on a 2-core machine shared with Prefect servers and Dask workers,
# OpenMP's spinning barriers make multi-threaded torch crawl (measured: 20 s -> 8+ min)
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_unet(seed: int = 0, sample_size: int = 16, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    config = {
        "sample_size": sample_size,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "add_attention": False,
    }
    return UNet2DModel(**(config | overrides)).eval()


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
    from hspace.data import models

    return models.load(models.resolve(str(model_dir)))


@pytest.fixture(scope="session")
def oracle_dir(tmp_path_factory) -> Path:
    """A random-weight oracle of the toy world's names, saved as the shipped one is."""
    from hspace.data.annotators import save_oracle
    from hspace.data.toy import faces as toyfaces
    from hspace.hcore.annotators import OracleNet

    torch.manual_seed(2)
    net = OracleNet(list(toyfaces.BINARY_ATTRIBUTES), list(toyfaces.POSE_ATTRIBUTES), width=8).eval()
    return save_oracle(net, tmp_path_factory.mktemp("oracle") / "o")


@pytest.fixture(scope="session")
def prefect_server():
    """The standing local Prefect server hspace starts on first need (flows/prefect_server.py),
    in this session's PREFECT_HOME, for in-process flow runs; subprocess commands find the
    same one through PREFECT_HOME. Stopped when the session ends (``_stop_prefect_server``)."""
    from prefect.settings import temporary_settings

    from hspace.flows import prefect_server as server

    url = server.start()["url"]
    with temporary_settings(updates=server.client_settings(url)):  # its URL and credential
        yield url


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_server():
    """No Prefect server or warm worker outlives the suite, and none is ever started in the
    user's home."""
    yield
    from hspace.flows import prefect_server as server
    from hspace.flows import warm_worker

    warm_worker.stop_worker()
    server.stop()
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP of the real architecture with random weights and a character-level tokenizer,
    saved as users' CLIP folders are (save_pretrained), so tests load it through the real path."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1, **layers
        ),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
