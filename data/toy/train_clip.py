"""toy-clip: a transformers CLIPModel (a small ViT and the text tower of toy-sd, with toy-sd's
tokenizer) trained contrastively (CLIP's symmetric InfoNCE, Radford et al. 2021) on fresh toy
renders and their captions (data/toy/captions.py), resumable from one checkpoint folder, then
saved as a CLIPModel + CLIPProcessor folder that the `clip:PATH` evaluator loads through its
real code path.

Every batch is a function of (seed, step): renders of seeds DATA_SEED + step * batch .. and
their captions, so a resumed run is the run that was not killed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hspace.data.catalog import RunError, replace_folder

DATA_SEED = 5 << 40  # toy-clip's training renders (the oracle's are 1 << 40, 2 << 40; toy-sd's 3 << 40)
EVAL_SEED = 6 << 40  # held-out renders for the measured quality
TOKENIZER = Path(__file__).resolve().parents[1] / "toy_sd_model" / "tokenizer"


@dataclass
class ClipRecipe:
    """How toy-clip is built and trained (the shipped folder's recipe.json records it)."""

    image_size: int = 32
    style: str = "v2"  # the toy world's faces, as toy-sd's
    p_state: float = 0.7  # captions: P(an attribute is stated)
    patch: int = 4
    vision_hidden: int = 96
    vision_layers: int = 4
    text_hidden: int = 64
    text_layers: int = 3
    max_tokens: int = 24
    projection: int = 64
    steps: int = 2400
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    checkpoint_every: int = 200


def build(recipe: ClipRecipe):
    """(CLIPModel, CLIPProcessor) of the recipe, randomly initialised."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=recipe.max_tokens,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu",
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=recipe.image_size, patch_size=recipe.patch, hidden_size=recipe.vision_hidden,
        intermediate_size=4 * recipe.vision_hidden, num_hidden_layers=recipe.vision_layers, num_attention_heads=4,
        hidden_act="quick_gelu",
    )  # fmt: skip
    torch.manual_seed(recipe.seed)
    model = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=recipe.projection)
    )
    side = {"height": recipe.image_size, "width": recipe.image_size}
    images = CLIPImageProcessor(size={"shortest_edge": recipe.image_size}, crop_size=side)
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def batch(recipe: ClipRecipe, first_seed: int, n: int):
    """(pixel values for the processor: (n, 3, R, R) in [0, 1], captions, factors)."""
    import numpy as np

    from hspace.data.toy import captions
    from hspace.data.toy import faces as toyfaces

    seeds = np.arange(first_seed, first_seed + n)
    images, factors = toyfaces.render_batch(seeds, recipe.image_size, style=recipe.style)
    texts = [captions.caption(factors, i, int(s), recipe.p_state)[0] for i, s in enumerate(seeds)]
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype("float32") / 255.0), texts, factors


def inputs(processor, pixels: torch.Tensor, texts: list[str], max_tokens: int) -> dict:
    tokens = processor.tokenizer(
        texts, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt"
    )
    images = processor.image_processor(images=list(pixels), do_rescale=False, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **images}


def lr_at(recipe: ClipRecipe, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def train_clip(checkpoint: Path, out: Path, recipe: ClipRecipe | None = None, report=print) -> dict:
    """Train (or resume) toy-clip in ``checkpoint`` (model/, processor/, optim.pt, state.json,
    recipe.json) and save the result to ``out``; returns the final state."""
    from transformers import CLIPModel, CLIPProcessor

    checkpoint, out = Path(checkpoint), Path(out)
    if (checkpoint / "state.json").exists():
        saved = ClipRecipe(**json.loads((checkpoint / "recipe.json").read_text()))
        free = {"steps": 0, "checkpoint_every": 0}  # what a resumed run may change
        if recipe is not None and {**asdict(saved), **free} != {**asdict(recipe), **free}:
            raise RunError(f"{checkpoint} holds a toy-clip run of another recipe; give another --checkpoint")
        given = recipe or saved
        recipe = ClipRecipe(**{**asdict(saved), "steps": given.steps, "checkpoint_every": given.checkpoint_every})
        model = CLIPModel.from_pretrained(checkpoint / "model")
        processor = CLIPProcessor.from_pretrained(checkpoint / "processor")
        state = json.loads((checkpoint / "state.json").read_text())
    else:
        recipe = recipe or ClipRecipe()
        model, processor = build(recipe)
        state = {"step": 0, "loss": None, "seconds": 0.0}
    optim = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.05)
    if (checkpoint / "optim.pt").exists():
        optim.load_state_dict(torch.load(checkpoint / "optim.pt"))
    model.train()
    start, losses = time.perf_counter(), []
    while state["step"] < recipe.steps:
        step = state["step"]
        for group in optim.param_groups:
            group["lr"] = lr_at(recipe, step)
        pixels, texts, _ = batch(recipe, DATA_SEED + step * recipe.batch_size, recipe.batch_size)
        loss = model(**inputs(processor, pixels, texts, recipe.max_tokens), return_loss=True).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
        state["step"] = step + 1
        if state["step"] % recipe.checkpoint_every == 0 or state["step"] == recipe.steps:
            state["loss"] = sum(losses) / len(losses)
            state["seconds"] += time.perf_counter() - start
            start, losses = time.perf_counter(), []
            save_checkpoint(checkpoint, model, processor, optim, recipe, state)
            report(f"toy-clip step {state['step']}/{recipe.steps}: contrastive loss {state['loss']:.3f}")
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(tmp, out)
    return state


def save_checkpoint(checkpoint: Path, model, processor, optim, recipe: ClipRecipe, state: dict) -> None:
    """Written aside (``.tmp``) and swapped in: a kill leaves the previous checkpoint."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    processor.save_pretrained(tmp / "processor")
    torch.save(optim.state_dict(), tmp / "optim.pt")
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    replace_folder(tmp, checkpoint)
