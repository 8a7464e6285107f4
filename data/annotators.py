"""Annotator weights on disk: the shipped toy oracle (``data/oracle/``) and user files.

An oracle folder holds ``config.json`` (the OracleNet constructor arguments) and
``oracle.safetensors``. ``load_annotator("oracle")`` takes the shipped one,
``load_annotator("oracle:PATH")`` another folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from data.catalog import RunError

ORACLE_DIR = Path(__file__).resolve().parent / "oracle"


def save_oracle(net, folder: Path, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**net.config(), **(extra or {})}, indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "oracle.safetensors"))
    return folder


def load_oracle(folder: Path = ORACLE_DIR, device: str = "cpu"):
    from hcore.annotators import OracleNet

    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "oracle.safetensors").exists():
        raise RunError(f"no oracle in {folder} (config.json + oracle.safetensors); train one with `hspace train-toy`")
    cfg = json.loads((folder / "config.json").read_text())
    net = OracleNet(cfg["binary"], cfg["pose"], size=cfg["size"], width=cfg["width"], pose_scale=cfg["pose_scale"])
    try:
        state = load_file(str(folder / "oracle.safetensors"))
        net.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors and torch raise several types for bad files
        raise RunError(f"cannot load the oracle weights in {folder}: {str(e).splitlines()[0]}") from None
    return net.to(device).eval()


def annotator_id(spec: str) -> str:
    """Where an annotator's scores are stored: its kind plus a hash of its weights, so
    scores of another oracle file are never mistaken for this one's."""
    import hashlib

    kind, _, path = spec.partition(":")
    folder = Path(path) if path else ORACLE_DIR
    weights = folder / "oracle.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:10] if weights.exists() else "missing"
    return f"{kind}-{digest}"


def load_annotator(spec: str, device: str = "cpu"):
    """'oracle' or 'oracle:PATH' (CelebA-40 and Hopenet join with the supervised issue)."""
    kind, _, path = spec.partition(":")
    if kind == "oracle":
        return load_oracle(Path(path) if path else ORACLE_DIR, device)
    raise RunError(f"unknown annotator {spec!r}; available: oracle, oracle:PATH")

