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

    def score(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class OracleNet(Annotator):
    """The toy world's annotator: logits for binary attributes, pose regressed in units of
    ``pose_scale`` degrees. Input: (N, 3, size, size) in [-1, 1]."""

    def __init__(self, binary: list[str], pose: list[str], size: int = 32, width: int = 32, pose_scale: float = 30.0):
        super().__init__()
        self.binary, self.pose = tuple(binary), tuple(pose)
        self.names = self.binary + self.pose
        self.size, self.pose_scale = size, pose_scale
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

        self.features = nn.Sequential(
            block(3, w, 1), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1), block(4 * w, 4 * w, 2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (size // 8) ** 2, 256), nn.SiLU(),
                                  nn.Linear(256, len(self.names)))

    def config(self) -> dict:
        return {"binary": list(self.binary), "pose": list(self.pose), "size": self.size,
                "width": self.features[0][0].out_channels, "pose_scale": self.pose_scale}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw outputs (N, A): logits for binary attributes, pose / pose_scale."""
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
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
