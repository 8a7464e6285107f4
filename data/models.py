"""Where models come from: ``toy`` and ``toy-sd`` (shipped in data/), a local diffusers folder, or a
Hugging Face id resolved through the local HF cache (downloaded only when allowed).

A model folder is either a pipeline folder (``unet/`` + ``scheduler/``, as
google/ddpm-ema-celebahq-256 is laid out) or a bare UNet folder (``config.json`` +
weights) with an optional ``scheduler/`` or ``scheduler_config.json`` beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hspace.data.catalog import RunError

TOY_MODEL_DIR = Path(__file__).resolve().parent / "toy_model"
TOY_SD_MODEL_DIR = Path(__file__).resolve().parent / "toy_sd_model"  # data/toy/sd.py: SD-shaped, captions
SHIPPED = {"toy": TOY_MODEL_DIR, "toy-sd": TOY_SD_MODEL_DIR}
# google/ddpm-ema-celebahq-256's unet/config.json (the paper's main model): six levels,
# attention at 16x16 and in the mid block, h = 512x8x8. No weights ship here; the real-shape
# tests and bench_gpu.py build it (or a channel-cut copy) with random weights.
CELEBAHQ_256_UNET = dict(
    sample_size=256,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
FLOW_KINDS = ("sd3", "flux")  # flow matching: sampled by hcore.flow, no eta


@dataclass(frozen=True)
class ModelRef:
    """What identifies a model: the user's spec, the folder it resolved to, the HF revision
    (commit) where known, and a sha256 over its config and weight files."""

    id: str
    path: str
    revision: str | None
    fingerprint: str
    kind: str = "pixel"  # pixel | sd | sdxl | pixart | sd3 | flux: data.text_models.pipeline_kind

    def to_dict(self) -> dict:
        return asdict(self)


def _unet_dir(folder: Path) -> Path | None:
    """The denoiser's folder: unet/, transformer/ (PixArt, SD3, FLUX), or a bare model folder."""
    for name in ("unet", "transformer"):
        if (folder / name / "config.json").exists():
            return folder / name
    if (folder / "config.json").exists():
        return folder
    return None


def unet_config(ref: ModelRef) -> dict:
    """The denoiser's config.json of a resolved model (no weights loaded)."""
    return json.loads((_unet_dir(Path(ref.path)) / "config.json").read_text())


def weights_sha256(unet_dir: Path | None) -> str:
    """sha256 over the UNet's config and weight files (names and bytes)."""
    if unet_dir is None or not Path(unet_dir).is_dir():
        raise RunError(
            f"model folder {unet_dir} does not exist (moved or deleted?); restore it or re-resolve the model"
        )
    files = [unet_dir / "config.json"] + sorted(p for p in unet_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    # one command resolves its model more than once (checks, tags, the run): hash each
    # version of the files once per process; a rewritten file has another size or mtime
    stats = [(p.resolve(), p.stat()) for p in files]
    key = tuple((str(p), st.st_ino, st.st_size, st.st_mtime_ns) for p, st in stats)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def resolve(spec: str, allow_download: bool = False) -> ModelRef:
    """Turn ``toy`` / ``toy-sd``, a folder path or an HF id into a ModelRef; RunError if none fits."""
    if spec in SHIPPED:
        if _unet_dir(SHIPPED[spec]) is None:
            recipe = " --recipe toy-sd" if spec == "toy-sd" else ""
            raise RunError(
                f"the {spec} model is not in {SHIPPED[spec]}; "
                f"train it with `hspace train-toy{recipe}` or reinstall hspace"
            )
        folder, revision = SHIPPED[spec], None
    elif Path(spec).expanduser().exists():
        folder, revision = Path(spec).expanduser().resolve(), None
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        folder, revision = _from_hub(spec, allow_download)
    else:
        raise RunError(
            f"model {spec!r} is neither 'toy', 'toy-sd', an existing folder, nor a Hugging Face id (owner/name)"
        )
    from hspace.data.text_models import pipeline_kind

    kind = pipeline_kind(folder)  # a model without a U-Net is refused here, in one line
    unet_dir = _unet_dir(folder)
    if unet_dir is None:
        raise RunError(
            f"{folder} is not a diffusers model folder (no config.json, unet/config.json or transformer/config.json)"
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in unet_dir.iterdir()):
        raise RunError(f"{unet_dir} holds no weight file (*.safetensors or *.bin); copy the model's weights there")
    return ModelRef(id=spec, path=str(folder), revision=revision, fingerprint=weights_sha256(unet_dir), kind=kind)


def _from_hub(repo_id: str, allow_download: bool) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        raise RunError(
            f"model {repo_id!r} is not in the local Hugging Face cache; download it where you have "
            "network access (`huggingface-cli download ...`), pass a local folder, or add --allow-download"
        ) from None
    except Exception as e:  # hub errors are many; all mean "could not get it"
        raise RunError(f"could not fetch model {repo_id!r} from the Hugging Face hub: {e}") from None
    return path, path.name  # snapshot folders are named by commit hash


def ref_of(run_meta: dict) -> ModelRef:
    """The model a run record names, as a ModelRef."""
    model = run_meta["model"]
    return ModelRef(**{k: model[k] for k in ("id", "path", "revision", "fingerprint")}, kind=model_kind(run_meta))


def load_checked(ref: ModelRef, device: str = "cpu", dtype=None, clip_sample: bool | None = None):
    """(unet, scheduler) of ``ref``, refusing weights whose sha256 is not ``ref.fingerprint``;
    ``clip_sample`` True/False sets the scheduler's clipping of P_t (None: the model's own)."""
    found = weights_sha256(_unet_dir(Path(ref.path)))
    if found != ref.fingerprint:
        raise RunError(
            f"the model at {ref.path} is not the one this run was made with (sha256 {found[:12]} != "
            f"{ref.fingerprint[:12]}); restore it or start a new run"
        )
    unet, scheduler = load(ref, device=device, dtype=dtype)
    if clip_sample is not None and type(scheduler).__name__ == "DDIMScheduler":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=bool(clip_sample))
    return unet, scheduler


def load_for_run(run_meta: dict, device: str = "cpu", dtype=None):
    """Load a run's model, refusing weights that are not the ones the run was made with.
    dtype None: the dtype the run sampled in (its config's ``dtype``; float32 if it has
    none), so every later command replays samples exactly as they were drawn. The scheduler
    clips P_t as the run's config ``clip_sample`` says (every stage samples as the run did;
    runs from before it was recorded keep the model's)."""
    return model_for(ref_of(run_meta), run_meta.get("config", {}), device, dtype)


def model_for(ref: ModelRef, sampling: dict, device: str = "cpu", dtype=None):
    """``load_checked`` as the sampling settings ``sampling`` say (a run's config, or an edit's
    settings outside a run): their ``dtype`` unless ``dtype`` is given, their ``clip_sample``."""
    if dtype is None:
        import torch

        dtype = getattr(torch, sampling.get("dtype", "float32"))
    return load_checked(ref, device, dtype, sampling.get("clip_sample"))


def model_kind(run_meta: dict) -> str:
    """pixel, sd or sdxl: what a run's model is (runs from before SD support: pixel)."""
    return run_meta["model"].get("kind", "pixel")


def image_size(ref: ModelRef, unet_config) -> int:
    """Pixels per side of the model's images: the U-Net's sample size, times the VAE's
    downsampling for a latent model (read from vae/config.json, nothing loaded)."""
    size = unet_config.sample_size
    size = size if isinstance(size, int) else size[0]
    if ref.kind == "pixel":
        return size
    vae = json.loads((Path(ref.path) / "vae" / "config.json").read_text())
    return size * 2 ** (len(vae["block_out_channels"]) - 1)


def noise_shape(run_meta: dict) -> tuple[int, int, int] | None:
    """(C, H, W) of x_T for a latent model (its U-Net's input), None for a pixel model
    (x_T has the image's shape)."""
    if model_kind(run_meta) == "pixel":
        return None
    folder = _unet_dir(Path(run_meta["model"]["path"]))
    cfg = json.loads((folder / "config.json").read_text())
    if model_kind(run_meta) == "flux":  # 2x2 latent cells packed per token; no sample size of its own
        from hspace.hcore.transformer import latent_shape

        return latent_shape(cfg)
    size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
    return (cfg["in_channels"], size, size)


def text_setup(
    ref: ModelRef,
    prompts: list[str],
    negative_prompt: str | None = None,
    guidance_scale: float = 7.5,
    edit_branch: str = "both",
    image_size: int | None = None,
    device: str = "cpu",
):
    """The text setup (hcore.generator.TextSetup) of a text-conditioned model ``ref``: its
    VAE, tokenizers and text encoders with these prompts and guidance; None for a pixel model."""
    if ref.kind == "pixel":
        return None
    from hspace.data.text_models import load_text_parts
    from hspace.hcore.generator import TextSetup

    parts = load_text_parts(Path(ref.path), ref.kind, device)
    return TextSetup(
        parts.vae,
        parts.tokenizers,
        parts.text_encoders,
        prompts=list(prompts),
        negative_prompt=negative_prompt,
        guidance_scale=float(guidance_scale),
        edit_branch=edit_branch,
        image_size=image_size,
        force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        pipeline=parts.pipeline,
    )


def text_for_run(run_meta: dict, device: str = "cpu"):
    """The prompts, guidance, VAE and text encoders a text-conditioned run samples with
    (hcore.generator.TextSetup), or None for a pixel model."""
    return text_for(ref_of(run_meta), run_meta["config"], device)


def text_for(ref: ModelRef, sampling: dict, device: str = "cpu"):
    """``text_setup`` as the sampling settings ``sampling`` say (a run's config, or an edit's
    settings outside a run: prompts, negative prompt, guidance scale, edit branch, image
    size); None for a pixel model."""
    if ref.kind == "pixel":
        return None
    return text_setup(
        ref,
        list(sampling["prompts"]),
        sampling.get("negative_prompt"),
        sampling.get("guidance_scale", 7.5),
        sampling.get("edit_branch", "both"),
        sampling.get("image_size"),
        device,
    )


def replay_for_run(run_meta: dict, text=None, device: str | None = None):
    """How this run's samples are rendered again (hcore.generator.Replay): its seed, steps,
    eta and h point, and ``text`` (a text-conditioned model's setup; with ``device`` and no
    ``text`` it is loaded here, ``text_for_run``). The one place that reads those settings
    from a run record for a replay."""
    from hspace.hcore.generator import Replay

    cfg = run_meta["config"]
    if text is None and device is not None:
        text = text_for_run(run_meta, device)
    eta = tuple(cfg["eta"]) if isinstance(cfg["eta"], list) else cfg["eta"]
    return Replay(int(cfg["seed"]), int(cfg["steps"]), eta, cfg.get("h_point", "output"), text)


def _denoiser_class(config: dict):
    import diffusers

    from hspace.hcore.transformer import FAMILIES

    name = config.get("_class_name")
    if name in FAMILIES:
        return getattr(diffusers, name)
    return diffusers.UNet2DConditionModel if name == "UNet2DConditionModel" else diffusers.UNet2DModel


def load(ref: ModelRef, device: str = "cpu", dtype=None):
    """Load (unet, scheduler) for a resolved model, in eval mode on ``device``. A transformer
    (PixArt, SD3, FLUX) comes inside hcore.transformer's adapter, called like a U-Net; PixArt's
    scheduler becomes DDIM (same betas), SD3's and FLUX's stay flow-matching Euler."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    folder = Path(ref.path)
    unet_dir = _unet_dir(folder)
    if unet_dir is None:
        raise RunError(f"model folder {folder} does not exist or holds no diffusers UNet (moved?); restore it")
    config = json.loads((unet_dir / "config.json").read_text())
    cls = _denoiser_class(config)
    try:
        unet = cls.from_pretrained(unet_dir, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"cannot load the UNet from {unet_dir}: {first}; "
            "the weight file may be truncated or from another architecture"
        ) from None
    try:
        unet = unet.to(device).eval().requires_grad_(False)
    except (RuntimeError, AssertionError) as e:
        raise RunError(f"cannot move the UNet to device {device!r}: {str(e).splitlines()[0]}") from None
    from hspace.hcore.transformer import FAMILIES, FLOW_FAMILIES, TransformerDenoiser

    flow = False
    if type(unet).__name__ in FAMILIES:
        unet = TransformerDenoiser(unet)  # by its class: a run's cached loader knows the path only
        flow = unet.family in FLOW_FAMILIES
    sched_cls = FlowMatchEulerDiscreteScheduler if flow else DDIMScheduler
    sched_dir = next(
        (d for d in (folder / "scheduler", unet_dir / "scheduler") if (d / "scheduler_config.json").exists()), None
    )
    if sched_dir is not None:
        scheduler = sched_cls.from_pretrained(sched_dir)
    elif (unet_dir / "scheduler_config.json").exists():
        scheduler = sched_cls.from_pretrained(unet_dir)
    else:
        raise RunError(
            f"{folder} has no scheduler config (scheduler/scheduler_config.json); "
            "add the scheduler the model was trained with"
        )
    return unet, scheduler
