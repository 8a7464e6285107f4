"""toy-clip's measured quality (the shipped folder's quality.json): zero-shot accuracy per
attribute with the paper's prompt pairs (hcore.annotators.CLIP_PROMPTS) through the `clip:PATH`
evaluator itself, on held-out renders against their true factors and on a run's samples against
the oracle; image-text retrieval on held-out renders and their captions."""

from __future__ import annotations

import numpy as np
import torch

from hspace.data.toy.train_clip import EVAL_SEED, ClipRecipe, batch, inputs


def zero_shot_on_renders(folder, n: int = 1024, recipe: ClipRecipe | None = None) -> dict:
    """{attribute: accuracy of P(attribute) > 0.5 against the render's true factor}."""
    from hspace.data.annotators import load_annotator

    recipe = recipe or ClipRecipe()
    clip = load_annotator(f"clip:{folder}")
    pixels, _, factors = batch(recipe, EVAL_SEED, n)
    probs = clip.score(pixels * 2 - 1).numpy()
    return {a: float(((probs[:, j] > 0.5) == truth(factors, a)).mean()) for j, a in enumerate(clip.names)}


def truth(factors, attribute: str) -> np.ndarray:
    return np.asarray(getattr(factors, attribute), dtype=bool)


def zero_shot_on_samples(folder, images: torch.Tensor) -> dict:
    """{attribute: agreement of CLIP's P > 0.5 with the oracle's} on images (B, 3, R, R) in [-1, 1]."""
    from hspace.data.annotators import load_annotator

    clip, oracle = load_annotator(f"clip:{folder}"), load_annotator("oracle")
    p, o = clip.score(images).numpy(), oracle.score(images).numpy()
    return {
        a: float(((p[:, j] > 0.5) == (o[:, list(oracle.names).index(a)] > 0.5)).mean())
        for j, a in enumerate(clip.names)
    }


@torch.no_grad()
def retrieval(folder, n: int = 256, recipe: ClipRecipe | None = None) -> dict:
    """Image -> caption and caption -> image recall at 1 and 5 among n held-out pairs (chance 1/n, 5/n)."""
    from transformers import CLIPModel, CLIPProcessor

    recipe = recipe or ClipRecipe()
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    pixels, texts, _ = batch(recipe, EVAL_SEED + 100_000, n)
    sims = model(**inputs(processor, pixels, texts, recipe.max_tokens)).logits_per_image
    same = torch.tensor([[a == b for b in texts] for a in texts])  # identical captions are all right answers
    out = {}
    for name, s, ok in (("image_to_text", sims, same), ("text_to_image", sims.T, same.T)):
        top = s.topk(5, dim=1).indices
        out[name] = {f"recall@{k}": float(ok.gather(1, top[:, :k]).any(1).float().mean()) for k in (1, 5)}
    out["chance"] = {"recall@1": 1 / n, "recall@5": 5 / n}
    return out
