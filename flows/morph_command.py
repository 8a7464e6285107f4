"""`hspace morph`: DiffMorpher between two photos or two samples (tasks/morph.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hspace.data.catalog import RunError
from hspace.flows.stage_commands import console, fail, write_error


def morph(
    run_dir: Annotated[Path | None, typer.Argument(help="run folder the two --sample are taken from")] = None,
    sample: Annotated[list[int], typer.Option(help="a sample of RUN; give two")] = [],  # noqa: B006
    model: Annotated[str | None, typer.Option(help="an SD-family model (with two --image)")] = None,
    image: Annotated[list[Path], typer.Option(help="a photo; give two of one size")] = [],  # noqa: B006
    prompt: Annotated[list[str], typer.Option(help="with --image: one prompt for both, or one each")] = [],  # noqa: B006
    frames: Annotated[int, typer.Option(help="frames of the morph, the two ends included")] = 8,
    steps: Annotated[int, typer.Option(help="DDIM steps (inversion and generation)")] = 20,
    lora_steps: Annotated[int, typer.Option(help="LoRA fitting steps per image (the authors: 200)")] = 200,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (the authors: 16)")] = 16,
    lam: Annotated[float, typer.Option(help="share of the steps with interpolated self-attention (0.6)")] = 0.6,
    refine: Annotated[int, typer.Option(help="fixed-point refinements per inversion step (0: plain DDIM)")] = 3,
    lora: Annotated[bool, typer.Option(help="fit and interpolate a LoRA per image")] = True,
    attention: Annotated[bool, typer.Option(help="interpolate self-attention keys and values")] = True,
    adain: Annotated[bool, typer.Option(help="AdaIN on the interpolated noise")] = True,
    reschedule: Annotated[bool, typer.Option(help="even out the distance between neighbouring frames")] = True,
    out: Annotated[Path, typer.Option(help="strip PNG to write (GIF, frames and morph.json beside it)")] = Path(
        "morph.png"
    ),
    dtype: Annotated[str, typer.Option(help="the U-Net's: float32, float16 or bfloat16")] = "float32",
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Morph two photos or two samples with DiffMorpher (LoRA per image, LoRA and latent
    interpolation, self-attention interpolation, AdaIN, rescheduling): a strip PNG, a GIF."""
    from hspace.tasks.morph import MorphSettings
    from hspace.tasks.morph import morph as run_morph
    from hspace.tasks.sample import resolve_device

    how = MorphSettings(frames, steps, lora_steps, lora_rank, lam=lam, refine=refine, lora=lora, attention=attention)
    how.adain, how.reschedule, how.dtype = adain, reschedule, dtype
    where = {"model": model, "images": image or None, "run_dir": run_dir, "samples": sample or None}
    try:
        result = run_morph(out, **where, prompts=prompt or None, settings=how, device=resolve_device(device),
                           log=console.print)  # fmt: skip
    except RunError as e:
        fail(str(e))
    except OSError as e:
        fail(write_error(e, out))
    ends = ", ".join(f"{v:.1f}" for v in result["end_psnr_db"])
    console.print(
        f"morph: [bold]{result['path']}[/], {result['gif']}; end frames against the inputs {ends} dB; spacing "
        f"spread {result['spacing_spread']:.3f} (uniform a: {result['spacing_spread_uniform']:.3f})"
    )
