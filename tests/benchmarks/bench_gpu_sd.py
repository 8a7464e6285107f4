"""GPU benchmark of the Stable Diffusion path on the SD 1.5 architecture with random weights:
UNet2DConditionModel (860 M parameters, h = 1280x8x8), AutoencoderKL, CLIP ViT-L/14 text
encoder; float16, 512x512, 50 steps, guidance 7.5, eta 1. Prints, in one run:

- images/s of (a) diffusers' own StableDiffusionPipeline with a DDIMScheduler and (b)
  `hspace sample` (the sample flow: guided sampling with h capture, VAE decoding, whole-shard
  Zarr writes, one Prefect task per shard; model load excluded); b/a (target >= 0.95);
- peak GPU memory of each and bytes per sample on disk.

Needs a CUDA GPU and says so otherwise; ``--small`` runs the same code on a channel-cut
model on the CPU, to check the script, not to measure anything.

    python tests/benchmarks/bench_gpu_sd.py [--n 64] [--batch-size 16] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402


def save_sd15(folder: Path, small: bool) -> Path:
    """The SD 1.5 pipeline's architecture (random weights) saved as a pipeline folder; the
    tokenizer is character-level (no vocabulary can be downloaded here), 77 tokens long."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.sd_fixtures import char_tokenizer

    tokenizer = char_tokenizer(folder / "_tok")
    tokenizer.model_max_length = 77
    width = (320, 640, 1280, 1280) if not small else (32, 64, 64, 64)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64 if not small else 16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=width,
        layers_per_block=2,
        cross_attention_dim=768 if not small else 64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if not small else (16, 16, 32, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32 if not small else 8,
        sample_size=512 if not small else 128,
        scaling_factor=0.18215,
    )
    hidden = 768 if not small else 64
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=12 if not small else 2,
            num_attention_heads=12 if not small else 4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = PNDMScheduler.from_config(  # SD 1.5's scheduler_config.json (clip_sample is a DDIM key it carries)
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "skip_prk_steps": True,
            "clip_sample": False,
        }
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd15")
    return folder / "sd15"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--small", action="store_true", help="CPU dry run on a channel-cut model (checks the script)")
    args = ap.parse_args()
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA GPU; this benchmark measures one (use --small for a CPU dry run)")
    dtype = torch.float32 if args.small else torch.float16
    prompt = "a photo of a person"

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from hspace.data import models
    from hspace.data.catalog import RunFolder
    from hspace.flows.prefect_server import prefect_api
    from hspace.hcore.sampler import draw_noise, make_generators
    from hspace.tasks.config import SampleSection
    from hspace.tasks.sample import create_run, run_shards
    from hspace.tasks.stages import Context

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (--small dry run: not a measurement)"
    with tempfile.TemporaryDirectory() as tmp, prefect_api():
        tmp = Path(tmp)
        folder = save_sd15(tmp, args.small)
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
        pipe.vae.to(torch.float32)  # as hspace decodes
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        pipe.set_progress_bar_config(disable=True)
        params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
        size = pipe.unet.config.sample_size
        print(f"device: {name}; UNet {params:.0f} M parameters, {dtype}, {args.steps} steps, guidance 7.5, n={args.n}")

        def diffusers_batch(rows: list[int]) -> None:
            gens = make_generators(0, rows)
            latents = draw_noise(gens, (4, size, size)).to(device, dtype)
            pipe(
                prompt=[prompt] * len(rows),
                latents=latents,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                eta=1.0,
                generator=gens,
                output_type="np",
            )

        diffusers_batch(list(range(min(2, args.batch_size))))  # warm-up
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, args.n, args.batch_size):
            diffusers_batch(list(range(start, min(args.n, start + args.batch_size))))
        sync(device)
        a = args.n / (time.perf_counter() - t0)
        peak_a = peak(device)
        pipe = None  # free its GPU memory before (b)
        if device == "cuda":
            torch.cuda.empty_cache()

        run = RunFolder(tmp / "run")
        section = SampleSection(
            model=str(folder),
            prompt=prompt,
            n=args.n,
            steps=args.steps,
            batch_size=args.batch_size,
            dtype="float32" if args.small else "float16",
        )
        create_run(run, section, device)  # as `hspace sample` makes it
        from hspace.tasks.sample import run_model, run_text

        run_model(run.read())  # the model load is not timed (cached per process, as a worker's)
        run_text(run.read())
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run_shards(run, Context(show_progress=False))
        sync(device)
        b = args.n / (time.perf_counter() - t0)
        peak_b = peak(device)
        on_disk = sum(p.stat().st_size for p in run.samples.rglob("*") if p.is_file())
        print(f"(a) diffusers StableDiffusionPipeline  {a:7.3f} images/s   peak GPU memory {peak_a:.2f} GiB")
        print(f"(b) hspace sample                      {b:7.3f} images/s   peak GPU memory {peak_b:.2f} GiB")
        print(f"b/a = {b / a:.3f} (target >= 0.95)")
        print(f"on disk: {on_disk / args.n / 2**20:.2f} MiB per sample (h_(T:1) float16 + the decoded image)")
        print(f"model kind: {models.resolve(str(folder)).kind}")


if __name__ == "__main__":
    main()
