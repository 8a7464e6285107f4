"""Attribute Vector Integration as an editing method (Wang et al. 2025, sec. 3.2; the maths in
hcore/avi.py): at the predictor's ``org_step`` the latent x_t is replaced by y_pred, built from
its own top-k singular vectors and those of x_tar (the same seed's latent at ``tar_step`` under
the target prompt), weighted by the predicted singular values; the strength alpha scales the
target columns (0: x_org's rank-k part with the predicted values; 1: as trained).

Made with the trained predictor and the target latents (``AVI(predictor, x_tar)``; in a plain
pipeline the caller renders x_tar), or by a front that can replay the samples
(``AVI.from_replay``: x_tar rendered under the predictor's target prompt)."""

from __future__ import annotations

import torch

from hspace.hcore.avi import Predictor, integrate
from hspace.hcore.edits import Action, EditMethod, register


class Integrate(Action):
    def __init__(self, method: AVI, alpha):
        self.method, self.alpha = method, alpha

    def check(self, steps: int, guided: bool) -> None:
        spec = self.method.predictor.spec
        if steps != spec.steps:
            raise ValueError(f"avi: the predictor was trained for {spec.steps} steps, the sampler runs {steps}")

    def x_t(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if step != self.method.predictor.spec.org_step:
            return x
        tar = self.method.x_tar
        if len(tar) not in (1, len(x)):
            raise ValueError(f"avi: {len(tar)} target latents for a batch of {len(x)}")
        alpha = torch.as_tensor(self.alpha, dtype=torch.float32).reshape(-1)
        return integrate(self.method.predictor, x, tar.to(x.device), alpha if alpha.numel() > 1 else float(alpha))


@register
class AVI(EditMethod):
    name = "avi"
    trainer = "hspace avi RUN --name ATTR"
    needs = ("weights",)
    strength = "alpha"
    unit = "the weight of x_tar's singular-vector columns (0: none; 1: as trained)"
    acts_on = "x_t"
    reference = "Wang et al. 2025 (SVD of latent codes), sec. 3.2: Attribute Vector Integration"
    strength_start, strength_max = 1.0, 12.0  # a converged predictor moves little at 1 (docs/latent_svd.md)

    def __init__(self, predictor: Predictor, x_tar: torch.Tensor, attribute: str | None = None):
        spec = predictor.spec
        if tuple(x_tar.shape[1:]) != (spec.channels, spec.side, spec.side):
            raise ValueError(
                f"avi: target latents {tuple(x_tar.shape[1:])} do not fit the predictor's "
                f"{(spec.channels, spec.side, spec.side)}"
            )
        self.predictor, self.x_tar, self.attribute = predictor.eval(), x_tar.detach().float(), attribute

    @classmethod
    def from_replay(cls, replay, unet, scheduler, indices, predictor: Predictor, attribute=None) -> AVI:
        """The method for samples ``indices`` of ``replay``: their x_tar rendered under the
        predictor's target prompt up to its ``tar_step``."""
        spec = predictor.spec
        if replay.text is None:
            raise ValueError("avi edits toward a prompt: it needs a text-conditioned model")
        if replay.steps != spec.steps:
            raise ValueError(f"avi: the predictor was trained for {spec.steps} steps, the samples have {replay.steps}")
        prompts = [spec.prompt_b] * len(indices)
        x_tar = replay.render(unet, scheduler, list(indices), prompts=prompts, stop_before=spec.tar_step)
        return cls(predictor, x_tar, attribute)

    @classmethod
    def strength_problem(cls, value: float) -> str | None:
        return None if value >= 0 else f"avi's strength alpha must be >= 0, got {value:g}"

    def action(self, strength):
        return Integrate(self, strength)
