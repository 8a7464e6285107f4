"""CLIP as a training signal for the editors that learn from it (the reading note's sec. III
and VIII; Kwon et al.'s Asyrp): differentiable image and text features of a transformers
CLIPModel, the directional CLIP loss and the L1 identity term.

- eq. (4): Delta T = CLIP_T(y_tar) - CLIP_T(y_ref);
- eq. (5): Delta I = CLIP_I(x_gen) - CLIP_I(x_ref) (the note prints x_ref twice: a typo; the
  DiffusionCLIP paper has x_gen);
- eq. (3): L_direction = 1 - cos(Delta I, Delta T);
- eq. (7): L_id = lambda_L1 |x_0 - x_hat_0| (+ lambda_face L_face: the toy world has no face
  recognition network; the L1 term alone keeps identity, and the oracle measures what it kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hspace.hcore.annotators import _features


class ClipGuide(torch.nn.Module):
    """A CLIPModel and its processor's image normalisation, differentiable in the image."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), processor.tokenizer
        images = processor.image_processor
        crop = getattr(images, "crop_size", None) or {}
        self.side = int(crop.get("height") or model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(images.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(images.image_std).view(1, 3, 1, 1), persistent=False)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP_I of images in [-1, 1] (B, 3, R, R), unnormalised, float32; gradients flow to x."""
        pixels = (x.float().clamp(-1, 1) + 1) / 2
        if pixels.shape[-1] != self.side:
            pixels = F.interpolate(pixels, size=(self.side, self.side), mode="bicubic", align_corners=False)
        param = next(self.model.parameters())
        pixels = ((pixels - self.mean) / self.std).to(param.device, param.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP_T of ``prompts`` (N, D), unnormalised, float32."""
        tokens = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        return _features(self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()})).float()

    def text_delta(self, source: str, target: str) -> torch.Tensor:
        """eq. (4): Delta T = CLIP_T(target) - CLIP_T(source), (D,)."""
        t = self.text([source, target])
        return t[1] - t[0]


def direction_loss(image_gen: torch.Tensor, image_ref: torch.Tensor, text_delta: torch.Tensor) -> torch.Tensor:
    """eq. (3) per sample (B,): 1 - cos(Delta I, Delta T), Delta I = CLIP_I(x_gen) - CLIP_I(x_ref)
    (eq. (5)) from the images' CLIP features (B, D); ``text_delta`` (D,) from eq. (4)."""
    delta_i = image_gen - image_ref
    return 1 - F.cosine_similarity(delta_i, text_delta.expand_as(delta_i), dim=-1, eps=1e-8)


def identity_loss(x_gen: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """eq. (7)'s L1 term per sample (B,): the mean absolute difference of the images."""
    return (x_gen - x_ref).abs().flatten(1).mean(1)
