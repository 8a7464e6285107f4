"""Annotator weights on disk: the shipped toy oracle (``data/oracle/``) and user files.

An oracle folder holds ``config.json`` (the OracleNet constructor arguments) and
``oracle.safetensors``. ``load_annotator("oracle")`` takes the shipped one,
``load_annotator("oracle:PATH")`` another folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from hspace.data.catalog import RunError

ORACLE_DIR = Path(__file__).resolve().parent / "oracle"
TOY_CLIP_DIR = Path(__file__).resolve().parent / "toy_clip_model"  # data/toy/train_clip.py: `clip:toy-clip`


def save_oracle(net, folder: Path, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**net.config(), **(extra or {})}, indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "oracle.safetensors"))
    return folder


def load_oracle(folder: Path = ORACLE_DIR, device: str = "cpu"):
    from hspace.hcore.annotators import OracleNet

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
    if kind == "clip":
        folder = clip_folder(path)
        weights = next(iter(sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))), folder / "missing")
    elif kind == "oracle":
        weights = (Path(path) if path else ORACLE_DIR) / "oracle.safetensors"
    else:
        weights = Path(path)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:10] if weights.exists() else "missing"
    return f"{kind}-{digest}"


def read_state_dict(path: Path) -> dict:
    """A checkpoint as users hand it over: a bare state dict or one under 'state_dict'
    (AnyCost), possibly saved from DataParallel ('module.' prefixes), old torch formats
    included (weights_only loading: no pickled code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise RunError(
            f"cannot read checkpoint {path} ({str(e).splitlines()[0][:200]}); "
            "the file may be truncated or not a PyTorch checkpoint"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise RunError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_strict(net, state: dict, path: Path, what: str):
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = [k for k in net.state_dict() if k not in state][:3]
        unexpected = [k for k in state if k not in net.state_dict()][:3]
        raise RunError(
            f"{path} is not a {what} checkpoint (missing e.g. {missing}, unexpected e.g. {unexpected}, "
            f"{str(e).splitlines()[0][:100]})"
        ) from None


def clip_folder(spec: str) -> Path:
    """A CLIP model's folder: ``toy-clip`` (the shipped one, trained on the toy world), a local
    path, or an HF id found in the local cache (never downloaded: fetch it yourself with
    `huggingface-cli download ID` where there is network)."""
    from hspace.data.models import _from_hub

    folder = TOY_CLIP_DIR if spec == "toy-clip" else Path(spec).expanduser()
    if not folder.exists():
        if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
            raise RunError(f"CLIP model {spec!r} is neither an existing folder nor a Hugging Face id (owner/name)")
        folder, _ = _from_hub(spec, allow_download=False)
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type != "clip":
        found = f"model_type {model_type!r}" if model_type else "missing or unreadable"
        raise RunError(
            f"{folder} is not a CLIP model (config.json {found}); "
            "give a folder saved by CLIPModel.save_pretrained, e.g. openai/clip-vit-base-patch32"
        )
    return folder


def is_toy_clip(folder: Path) -> bool:
    """Whether ``folder`` holds toy-clip: its recipe.json names every field of ClipRecipe."""
    import json
    from dataclasses import fields

    from hspace.data.toy.train_clip import ClipRecipe

    try:
        recipe = json.loads((folder / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recipe, dict) and {f.name for f in fields(ClipRecipe)} <= set(recipe)


def _clip_model(spec: str, texts):
    """(CLIPModel, CLIPProcessor) of ``clip_folder(spec)``; ``texts``: what it must read (for
    toy-clip, which knows the toy world's caption words only, each word checked)."""
    import re

    from transformers import CLIPModel, CLIPProcessor

    folder = clip_folder(spec)
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, safetensors errors...
        raise RunError(f"cannot load the CLIP model in {folder}: {str(e).splitlines()[0][:200]}") from None
    if is_toy_clip(folder):
        known = set(processor.tokenizer.get_vocab())
        unknown = sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower()) if f"{w}</w>" not in known})
        if unknown:
            raise RunError(
                f"{folder} is toy-clip, which knows only the toy world's caption words (data/toy/captions.py); "
                f"unknown in the prompts: {', '.join(unknown)}"
            )
    return model, processor


def load_clip(spec: str, device: str = "cpu", prompts: dict | None = None):
    """CLIPModel + CLIPProcessor from ``clip_folder(spec)`` wrapped as a zero-shot annotator."""
    from hspace.hcore.annotators import CLIP_PROMPTS, CLIPZeroShot

    model, processor = _clip_model(spec, [t for pair in (prompts or CLIP_PROMPTS).values() for t in pair])
    return CLIPZeroShot(model.eval(), processor, prompts).to(device).eval()


def load_clip_guide(spec: str, device: str = "cpu", prompts=()):
    """A CLIP model (``clip_folder(spec)``) as a differentiable training signal
    (hcore.clip_guidance.ClipGuide); ``prompts``: texts it must know."""
    from hspace.hcore.clip_guidance import ClipGuide

    return ClipGuide(*_clip_model(spec, prompts)).to(device)


def load_annotator(spec: str, device: str = "cpu", prompts: dict | None = None):
    """'oracle', 'oracle:PATH', 'celeba40:PATH' (AnyCost attribute_predictor.pt),
    'hopenet:PATH' or 'hopenet-legacy:PATH' (hopenet_robust_alpha1.pkl), 'clip:PATH|HF_ID'
    (zero-shot with ``prompts``, default the paper's pairs)."""
    from hspace.hcore.annotators import CelebA40, Hopenet

    kind, _, path = spec.partition(":")
    if kind == "oracle":
        return load_oracle(Path(path) if path else ORACLE_DIR, device)
    if kind == "clip":
        if not path:
            raise RunError("annotator clip needs a model: --evaluator clip:PATH (or clip:openai/clip-vit-base-patch32)")
        return load_clip(path, device, prompts)
    if kind in ("celeba40", "hopenet", "hopenet-legacy") and not path:
        raise RunError(f"annotator {kind} needs a weight file: --annotator {kind}:PATH")
    if kind == "celeba40":
        net = CelebA40()
        _load_strict(net.net, read_state_dict(Path(path)), Path(path), "CelebA-40 (ResNet-50, fc 2048->80)")
        return net.to(device).eval()
    if kind in ("hopenet", "hopenet-legacy"):
        net = Hopenet(mode="legacy" if kind == "hopenet-legacy" else "imagenet")
        heads = ("fc_yaw", "fc_pitch", "fc_roll", "fc_finetune")
        state = {(k if k.startswith(heads) else "backbone." + k): v for k, v in read_state_dict(Path(path)).items()}
        _load_strict(net, state, Path(path), "Hopenet (ResNet-50 + 66-bin heads)")
        return net.to(device).eval()
    raise RunError(
        f"unknown annotator {spec!r}; available: oracle, oracle:PATH, celeba40:PATH, hopenet:PATH, "
        "hopenet-legacy:PATH, clip:PATH"
    )
