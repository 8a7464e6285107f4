"""`hspace morph`: DiffMorpher (hcore/morph.py) between two photos or two samples of a run, on a
text-conditioned latent model: a strip PNG, an animated GIF, every frame, and morph.json (the
frames' a, the spread of the neighbouring-frame distances, the end frames' PSNR against the
inputs, the LoRA fits). The two LoRAs are saved beside the output as safetensors with the model's
fingerprint, the image's hash and the fit's settings, and reused when all three match."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hspace.data.catalog import RunError


@dataclass
class MorphSettings:
    frames: int = 8
    steps: int = 20
    lora_steps: int = 200
    lora_rank: int = 16
    lora_lr: float = 2e-4
    lam: float = 0.6  # the share of the steps with interpolated self-attention keys and values
    refine: int = 3  # fixed-point refinements per DDIM inversion step (0: plain DDIM inversion, the authors')
    lora: bool = True
    attention: bool = True
    adain: bool = True
    reschedule: bool = True
    seed: int = 0
    dtype: str = "float32"  # the U-Net's (and its LoRA's base layers'); the VAE runs in float32

    def check(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise RunError(f"--dtype {self.dtype}: give float32, float16 or bfloat16")
        if self.frames < 3:
            raise RunError(f"--frames {self.frames}: a morph needs at least 3 (the two inputs and one between)")
        if not 0 <= self.lam <= 1:
            raise RunError(f"--lam {self.lam} must be in [0, 1] (a share of the steps)")
        if self.steps < 1 or self.lora_steps < 0 or self.lora_rank < 1:
            raise RunError("--steps and --lora-rank must be >= 1, --lora-steps >= 0")


def same_size(paths: list[Path]) -> None:
    """Two photos of different sizes are refused, naming both and what to do."""
    from PIL import Image

    sizes = []
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except OSError as e:
            raise RunError(f"cannot read {p}: {e}") from None
    if sizes[0] != sizes[1]:
        raise RunError(
            f"{paths[0].name} is {sizes[0][0]}x{sizes[0][1]}, {paths[1].name} {sizes[1][0]}x{sizes[1][1]}: crop or "
            "resize them to one size first (a morph's frames share one layout)"
        )


def lora_for(path: Path, unet, scheduler, latent, cond, meta: dict, s: MorphSettings, log) -> dict:
    """The fitted LoRA of one image: read from ``path`` where its metadata matches ``meta``
    (refused when it was fitted for another model), else fitted and saved there."""
    from safetensors.torch import load_file, save_file

    from hspace.hcore.morph import fit_lora

    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            have = f.metadata() or {}
        if have.get("model") != meta["model"]:
            raise RunError(
                f"{path} is a LoRA for another model ({have.get('model', '?')[:12]}, not {meta['model'][:12]}): "
                "delete it or morph into another --out"
            )
        if have == meta:
            log(f"LoRA {path.name}: reused (same model, image and settings)")
            return load_file(str(path))
    losses = []
    state = fit_lora(unet, scheduler, latent, cond, s.lora_steps, s.lora_lr, s.seed, lambda i, v: losses.append(v))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    if losses:
        log(f"LoRA {path.name}: {len(losses)} steps, loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
    return state


def morph(
    out: Path,
    model: str | None = None,
    images: list[Path] | None = None,
    run_dir: Path | None = None,
    samples: list[int] | None = None,
    prompts: list[str] | None = None,
    settings: MorphSettings | None = None,
    device: str = "cpu",
    log=print,
) -> dict:
    """Morph two photos (``model`` + ``images``, each with its prompt) or two samples of a run
    (``run_dir`` + ``samples``, with their own prompts) into ``out`` (PNG strip; GIF, frames and
    morph.json beside it)."""
    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.catalog import RunFolder
    from hspace.data.photos import psnr, read_photos
    from hspace.hcore.conditioning import Conditioning
    from hspace.hcore.inversion import ddim_invert
    from hspace.hcore.morph import KVMix, add_lora, reschedule, set_lora, slerp, spacing_spread
    from hspace.hcore.sampler import make_generators, sample, to_uint8, to_unit

    s = settings or MorphSettings()
    s.check()
    if (run_dir is None) == (model is None):
        raise RunError("give --model M with two --image, or RUN with two --sample")
    given = images if run_dir is None else samples
    if not given or len(given) != 2:
        what = "--image" if run_dir is None else "--sample"
        raise RunError(f"a morph takes exactly two {what}, got {len(given or [])}")
    if run_dir is not None:
        meta = RunFolder(run_dir).read()
        ref = models.ref_of(meta)
        n = meta["config"]["n"]
        if any(not 0 <= i < n for i in samples):
            raise RunError(f"--sample must be indices in [0, {n}) for this run, got {samples}")
    else:
        ref = models.resolve(model)
        same_size([Path(p) for p in images])
    if ref.kind == "pixel":
        raise RunError(f"hspace morph needs a text-conditioned latent model (SD family): {ref.id} is a pixel model")
    unet, scheduler = models.load_checked(ref, device, getattr(torch, s.dtype), clip_sample=False)
    size = models.image_size(ref, unet.config)
    if run_dir is not None:
        replay = models.replay_for_run(meta, device=device)
        x = replay.render(unet, scheduler, samples)
        prompts = replay.text.prompts_for(samples)
        text = replay.text
    else:
        prompts = list(prompts or [""]) * (2 if len(prompts or [""]) == 1 else 1)
        if len(prompts) != 2:
            raise RunError(f"--prompt: give one (for both images) or two, got {len(prompts)}")
        text = models.text_setup(ref, prompts, guidance_scale=1.0, image_size=size)
        photos, notes = read_photos([Path(p) for p in images], size)
        for note in notes:
            log(note)
        x = to_unit(photos).to(device)
    inputs = to_uint8(x.cpu()).numpy()
    latents = text.encode(x)
    with torch.no_grad():
        emb = [text.conditioning([p]).cond.to(device, torch.float32) for p in prompts]
    cond = Conditioning  # no guidance, the authors' default: the prompt's embedding alone (SDXL's added ones too)
    folder = Path(out).with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    loras = None
    if s.lora:
        start = add_lora(unet, s.lora_rank, s.seed)
        fit = {k: str(v) for k, v in asdict(s).items() if k in ("lora_steps", "lora_rank", "lora_lr", "seed")}
        loras = []
        for i in range(2):
            image = hashlib.sha256(inputs[i].tobytes()).hexdigest()
            meta_i = {"model": ref.fingerprint, "image": image, "prompt": prompts[i], **fit}
            set_lora(unet, [start], [1.0])  # each fit starts from the same initial parameters
            path = dirfile.lora_file(folder, i)
            loras.append(lora_for(path, unet, scheduler, latents[i : i + 1], cond(emb[i]), meta_i, s, log))
    noise = []
    for i in range(2):
        if loras:
            set_lora(unet, [loras[i]], [1.0])
        x_i = latents[i : i + 1]
        noise.append(ddim_invert(unet, scheduler, x_i, s.steps, refine=s.refine, conditioning=cond(emb[i])))
    mixer = KVMix(unet)

    def frame(a: float, end: int | None = None) -> torch.Tensor:
        if loras:
            set_lora(unet, loras, [1 - a, a])
        z = slerp(noise[0], noise[1], a, s.adain)
        c = mixed(emb[0], emb[1], a)  # eq. (19)
        if not s.attention:
            session = torch.no_grad()
        elif end is not None:
            session = mixer.record()
        else:
            session = mixer.mix(a, s.lam, s.steps)
        with session:
            z0 = sample(unet, scheduler, make_generators(0, [0]), s.steps, 0.0, x_T=z, conditioning=cond(c))
        return text.decode(z0).cpu()

    def render(alphas: list[float]) -> torch.Tensor:
        if s.attention:
            mixer.stores.clear()
        first, last = frame(alphas[0], 0), frame(alphas[-1], 1)
        middle = [frame(a) for a in alphas[1:-1]]
        return torch.cat([first, *middle, last])

    alphas = [i / (s.frames - 1) for i in range(s.frames)]
    frames = render(alphas)
    uniform_spread = spacing_spread(frames)
    if s.reschedule:
        alphas = reschedule(frames)
        frames = render(alphas)
    images8 = to_uint8(frames).numpy()
    return save_morph(out, folder, images8, inputs, alphas, uniform_spread, spacing_spread(frames), s, psnr)


def mixed(e0, e1, a: float):
    """eq. (19) on every field of the text embeddings: (1 - a) c_0 + a c_1."""
    from dataclasses import fields, replace

    return replace(e0, **{f.name: (1 - a) * getattr(e0, f.name) + a * getattr(e1, f.name)
                          for f in fields(e0) if getattr(e0, f.name) is not None})  # fmt: skip


def save_morph(out, folder, images8, inputs, alphas, uniform_spread, spread, s, psnr) -> dict:
    from PIL import Image

    from hspace.data.figures import grid_image, save_grid

    for i, im in enumerate(images8):
        Image.fromarray(im.transpose(1, 2, 0)).save(folder / f"frame_{i:02d}.png")
    pil = [Image.fromarray(im.transpose(1, 2, 0)) for im in images8]
    there_and_back = pil[1:] + pil[-2:0:-1]
    pil[0].save(Path(out).with_suffix(".gif"), save_all=True, append_images=there_and_back, duration=120, loop=0)
    cols = [f"a={a:.2f}" for a in alphas]
    strip = np.concatenate([inputs[:1], images8, inputs[1:]])[None]
    save_grid(Path(out), grid_image(strip, ["morph"], ["input A", *cols, "input B"], title="DiffMorpher"))
    ends = [psnr(images8[0], inputs[0]), psnr(images8[-1], inputs[1])]
    summary = {"alphas": alphas, "spacing_spread": spread, "spacing_spread_uniform": uniform_spread,
               "end_psnr_db": ends, "settings": asdict(s)}  # fmt: skip
    (folder / "morph.json").write_text(json.dumps(summary, indent=2))
    return {"path": Path(out), "gif": Path(out).with_suffix(".gif"), "folder": folder, **summary}
