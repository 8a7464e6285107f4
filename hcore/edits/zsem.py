"""Edits in a diffusion autoencoder's semantic code (hcore/diffae.py), as editing methods.

- ``zsem``: Diffusion Autoencoders' attribute manipulation (Preechakul et al. 2022, sec. 5.2;
  the reading note's sec. V): a linear classifier (logistic regression) of the attribute on
  z_sem normalised per dimension; the edit moves a sample's code along the classifier's unit
  normal, z' = z + gamma n (normalised units), and decodes it with deterministic DDIM from the
  sample's own stochastic code x_T (DDIM inversion conditioned on z_sem, eq. (14)), so that
  what z_sem does not hold stays.
- ``zsem-sparse``: HDAE's sparse hyperplane (the note's sec. IX): the classifier's normal
  keeping its top-k weights by magnitude, the others zero (k in the file; `hspace diffae`
  sweeps it). HDAE reads the code from several encoder levels; here the code is toy-diffae's
  single z_sem (README's fidelity table).

The sample is any image of the autoencoder's size: a run's own render (what ``from_replay``
encodes: the edit then replaces the run's model with the autoencoder, and the unedited image
is the autoencoder's reconstruction), or a photo (``from_images``). The method decodes with its
own model (``Action.decodes``): it runs where a run's samples are rendered (`hspace edit`,
`hspace compare`), not inside another model's pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hspace.hcore.edits import Action, EditMethod, register


@dataclass
class CodeDirection:
    """A direction in an autoencoder's z_sem: ``normal`` (z_dim,), unit, in z_sem normalised by
    ``stats`` ({"mean", "std"}); the autoencoder (hcore.diffae.DiffAE) and its scheduler; the
    DDIM steps of inversion and decoding."""

    normal: torch.Tensor
    model: torch.nn.Module
    scheduler: object
    stats: dict
    steps: int


class Recode(Action):
    decodes = True

    def __init__(self, method: ZSem, gamma):
        self.method, self.gamma = method, gamma

    def images(self) -> torch.Tensor:
        from hspace.hcore.diffae import decode

        m, d = self.method, self.method.edit
        g = torch.as_tensor(self.gamma, dtype=torch.float32).reshape(-1, 1)
        z = m.z + g * d.normal.view(1, -1)
        raw = z * d.stats["std"] + d.stats["mean"]
        with torch.no_grad():
            return decode(d.model, d.scheduler, m.x_T, raw.to(m.x_T.device), d.steps).float()


@register
class ZSem(EditMethod):
    name = "zsem"
    needs = ("weights",)
    strength = "gamma"
    unit = "steps along the unit normal of the attribute's logistic hyperplane in z_sem (normalised per dimension)"
    acts_on = "code"
    reference = "Preechakul et al. 2022 (Diffusion Autoencoders) sec. 5.2, the reading note's sec. V, eq. (14)"
    trainer = "hspace diffae RUN (diffae.attributes: ATTR)"
    model_bound = False  # any model's images (of the autoencoder's size) are encoded
    strength_start, strength_max = 8.0, 64.0

    def __init__(self, edit: CodeDirection, images: torch.Tensor, attribute: str | None = None):
        """Encode ``images`` (B, 3, R, R) in [-1, 1]: z_sem and the stochastic code x_T."""
        from hspace.hcore.diffae import stochastic_code

        side = edit.model.unet.config.sample_size
        if tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(
                f"{self.name}: the autoencoder encodes 3 x {side} x {side} images, got {tuple(images.shape[1:])}"
            )
        self.edit, self.attribute = edit, attribute
        device = next(edit.model.parameters()).device
        images = images.to(device, torch.float32)
        with torch.no_grad():
            raw = edit.model.encoder(images)
            self.x_T = stochastic_code(edit.model, edit.scheduler, images, raw, edit.steps)
        self.z = (raw - edit.stats["mean"].to(device)) / edit.stats["std"].to(device)

    @classmethod
    def load_weights(cls, state: dict, meta: dict, diffae=None, **loaded) -> CodeDirection:
        if diffae is None:
            raise ValueError(f"{cls.name} needs the autoencoder its direction lives in (metadata 'diffae')")
        model, scheduler, _, stats = diffae
        normal = state["normal"].float()
        if normal.shape != stats["mean"].shape:
            raise ValueError(f"a direction of {tuple(normal.shape)} for a z_sem of {tuple(stats['mean'].shape)}")
        return CodeDirection(normal, model, scheduler, stats, int(meta["diffae_steps"]))

    @classmethod
    def from_images(cls, images: torch.Tensor, trained: CodeDirection, attribute: str | None = None) -> ZSem:
        return cls(trained, images, attribute)

    @classmethod
    def from_replay(cls, replay, unet, scheduler, indices, trained: CodeDirection, attribute=None) -> ZSem:
        """For a run's samples ``indices``: their own renders, encoded."""
        return cls(trained, replay.render(unet, scheduler, list(indices)), attribute)

    def action(self, strength):
        return Recode(self, strength)


@register
class ZSemSparse(ZSem):
    name = "zsem-sparse"
    unit = "steps along the unit top-k normal of the attribute's hyperplane in z_sem (normalised per dimension)"
    reference = "Lu et al. 2024 (HDAE) sparse hyperplanes, the reading note's sec. IX; on DiffAE's z_sem"
