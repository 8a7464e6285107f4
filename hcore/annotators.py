"""Annotators: one interface, images in, named scores out (paper sec. 5: samples are
annotated, sorted by a score, and the top/bottom ones define a direction by eq. (10)).

``Annotator.score(images)`` takes images (N, 3, R, R) in [-1, 1] (the sampler's x_0) and
returns (N, A) float32 on the CPU: P(attribute) for binary attributes, degrees for pose.
Each annotator resizes and normalises internally to what its network expects.

The toy world's oracle (``OracleNet``) is a small CNN trained on renders (labels are
free); it scores the toy factors under their CelebA names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Annotator(nn.Module):
    """Base class: subclasses set ``names`` and implement ``score``."""

    names: tuple[str, ...] = ()
    degrees: tuple[str, ...] = ()  # the names scored in degrees (pose); the others are probabilities

    def score(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class OracleNet(Annotator):
    """The toy world's annotator: logits for binary attributes, pose regressed in units of
    ``pose_scale`` degrees. Input: (N, 3, size, size) in [-1, 1]."""

    def __init__(self, binary: list[str], pose: list[str], size: int = 32, width: int = 32, pose_scale: float = 30.0):
        super().__init__()
        self.binary, self.pose = tuple(binary), tuple(pose)
        self.names = self.binary + self.pose
        self.degrees = self.pose
        self.size, self.pose_scale = size, pose_scale
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

        self.features = nn.Sequential(
            block(3, w, 1),
            block(w, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w, 1),
            block(4 * w, 4 * w, 2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * (size // 8) ** 2, 256), nn.SiLU(), nn.Linear(256, len(self.names))
        )

    def config(self) -> dict:
        return {
            "binary": list(self.binary),
            "pose": list(self.pose),
            "size": self.size,
            "width": self.features[0][0].out_channels,
            "pose_scale": self.pose_scale,
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw outputs (N, A): logits for binary attributes, pose / pose_scale."""
        if images.shape[-1] != self.size:
            images = F.interpolate(
                images, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.head(self.features(images))

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters())
        out = self(images.to(param.device, param.dtype)).float()
        nb = len(self.binary)
        return torch.cat([torch.sigmoid(out[:, :nb]), out[:, nb:] * self.pose_scale], 1).cpu()

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE on binary attributes + MSE on pose (in pose_scale units); targets (N, A)
        in score units (0/1, degrees)."""
        out = self(images)
        nb = len(self.binary)
        bce = F.binary_cross_entropy_with_logits(out[:, :nb], targets[:, :nb])
        mse = F.mse_loss(out[:, nb:], targets[:, nb:] / self.pose_scale)
        return bce + mse


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class CelebA40(Annotator):
    """The CelebA-40 attribute classifier of AnyCost GAN (the paper's sec. 5 annotator):
    torchvision ResNet-50 with fc 2048 -> 80, logits viewed as (N, 40, 2), softmax, index 1
    = P(attribute). Input [-1, 1] at 256, no ImageNet normalisation."""

    names = CELEBA_ATTRIBUTES
    input_size = 256

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        self.net = resnet50(weights=None, num_classes=80)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).view(-1, 40, 2)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters())
        logits = self(_resize(images.to(param.device, param.dtype), self.input_size))
        return logits.softmax(-1)[..., 1].float().cpu()


class Hopenet(Annotator):
    """Hopenet head pose (Ruiz et al.; the paper's pose annotator): ResNet-50 (Bottleneck
    [3, 4, 6, 3]), AvgPool2d(7), three 66-bin heads fc_yaw / fc_pitch / fc_roll and the
    unused fc_finetune (2051 -> 3). angle = sum(softmax(logits) * bin index) * 3 - 99.
    Input 224 with ImageNet normalisation; mode 'legacy' feeds [-1, 1] unnormalised, as
    the seed paper's code did."""

    names = degrees = ("yaw", "pitch", "roll")
    input_size = 224

    def __init__(self, mode: str = "imagenet"):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        if mode not in ("imagenet", "legacy"):
            raise ValueError(f"Hopenet mode must be 'imagenet' or 'legacy', got {mode!r}")
        self.mode = mode
        self.backbone = ResNet(Bottleneck, [3, 4, 6, 3])
        self.backbone.avgpool = nn.AvgPool2d(7)
        self.backbone.fc = nn.Identity()  # ResNet.forward then returns the pooled 2048 features
        self.fc_yaw, self.fc_pitch, self.fc_roll = (nn.Linear(2048, 66) for _ in range(3))
        self.fc_finetune = nn.Linear(2048 + 3, 3)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bins", torch.arange(66, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        return self.fc_yaw(features), self.fc_pitch(features), self.fc_roll(features)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters())
        x = _resize(images.to(param.device, param.dtype), self.input_size)
        if self.mode == "imagenet":
            x = ((x + 1) / 2 - self.mean) / self.std
        heads = self(x)
        return torch.stack([(h.softmax(-1) * self.bins).sum(-1) * 3 - 99 for h in heads], 1).float().cpu()


# The paper's sec. 5 prompt pairs (positive, negative). Columns keep CelebA names and mean
# P(attribute), so age is scored as "young vs old" (the paper's "old vs young" pair, flipped).
CLIP_PROMPTS: dict[str, tuple[str, str]] = {
    "Smiling": ("A smiling person", "A person"),
    "Eyeglasses": ("A person wearing glasses", "A person"),
    "Wearing_Hat": ("A person wearing a hat", "A person"),
    "Male": ("A man", "A woman"),
    "Young": ("A young person", "An old person"),
}


class CLIPZeroShot(Annotator):
    """Zero-shot attribute probabilities from CLIP (paper sec. 5, Table 1 evaluation):
    for each attribute a prompt pair (positive, negative), P(attribute) = softmax over the
    pair of CLIP's image-text logits, logit = exp(logit_scale) * cos(image, text).

    ``model`` is a transformers CLIPModel, ``processor`` its CLIPProcessor (it resizes,
    crops and normalises as the checkpoint expects). Text embeddings are computed once."""

    def __init__(self, model, processor, prompts: dict[str, tuple[str, str]] | None = None):
        super().__init__()
        prompts = dict(CLIP_PROMPTS if prompts is None else prompts)
        if not prompts:
            raise ValueError("CLIP needs at least one prompt pair")
        self.model, self.processor, self.prompts = model, processor, prompts
        self.names = tuple(prompts)
        texts = [p for pair in prompts.values() for p in pair]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            text = _features(model.get_text_features(**tokens))
        self.register_buffer("text", F.normalize(text.float(), dim=-1), persistent=False)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        pixels = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu()
        inputs = self.processor.image_processor(images=list(pixels), do_rescale=False, return_tensors="pt")
        image = _features(
            self.model.get_image_features(pixel_values=inputs["pixel_values"].to(param.device, param.dtype))
        )
        logits = self.model.logit_scale.exp().float() * F.normalize(image.float(), dim=-1) @ self.text.T
        return logits.view(len(images), len(self.names), 2).softmax(-1)[..., 0].cpu()


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
