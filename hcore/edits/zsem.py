"""Edits in a diffusion autoencoder's semantic code (hcore/diffae.py), as editing methods.

- ``zsem``: Diffusion Autoencoders' attribute manipulation (Preechakul et al. 2022, sec. 5.2;
  the reading note's sec. V): a linear classifier (logistic regression) of the attribute on
  z_sem normalised per dimension; the edit moves a sample's code along the classifier's unit
  normal, z' = z + gamma n (normalised units), and decodes it with deterministic DDIM from the
  sample's own stochastic code x_T (DDIM inversion conditioned on z_sem, eq. (14)), so that
  what z_sem does not hold stays.
- ``pada``: PADA's age edit (the note's sec. IV; hcore/pada.py): z_age from the target age's
  text and reference image through the aging embedding (eqs. (8)-(11)); strength s moves the
  code the share s of the way, z + s (z_age - z) (1: PADA's output); ``seed`` draws e_age
  (eq. (9)): other seeds, other plausible ages (the "pluralistic" samples).
- ``zsem-sparse``: HDAE's sparse hyperplane (the note's sec. IX): the classifier's normal
  keeping its top-k weights by magnitude, the others zero (k in the file; `hspace diffae`
  sweeps it), on a flat autoencoder's single z_sem (toy-diffae).
- ``hdae`` and ``hdae-dense``: the same two on a hierarchical autoencoder's code (HDAE, the
  note's sec. IX, Fig. 17: toy-hdae's codes of several encoder levels, read by the decoder level
  by level; hcore/diffae.py): ``hdae`` is HDAE's edit (its sparse hyperplane), ``hdae-dense``
  the plain normal on the same code.

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
    DDIM steps of inversion and decoding; the autoencoder's fingerprint."""

    normal: torch.Tensor
    model: torch.nn.Module
    scheduler: object
    stats: dict
    steps: int
    fingerprint: str = ""  # the autoencoder's (data.diffae.diffae_fingerprint), where known


class Recode(Action):
    decodes = True

    def __init__(self, method: ZSem, gamma):
        self.method, self.gamma = method, gamma

    def images(self) -> torch.Tensor:
        from hspace.hcore.diffae import decode

        m, d = self.method, self.method.edit
        g = torch.as_tensor(self.gamma, dtype=torch.float32).reshape(-1, 1).to(m.z.device)
        raw = m.moved(g) * d.stats["std"].to(m.z.device) + d.stats["mean"].to(m.z.device)
        x_T = m.x_T.expand(len(raw), *m.x_T.shape[1:]) if len(m.x_T) == 1 else m.x_T  # one sample, many strengths
        with torch.no_grad():
            return decode(d.model, d.scheduler, x_T, raw.to(x_T.device), d.steps).float()


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
        self.images = images  # what was encoded: a run's own renders, or the photos
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
        return CodeDirection(normal, model, scheduler, stats, int(meta["diffae_steps"]), meta["diffae_fingerprint"])

    @classmethod
    def from_images(cls, images: torch.Tensor, trained: CodeDirection, attribute: str | None = None) -> ZSem:
        return cls(trained, images, attribute)

    @classmethod
    def from_replay(cls, replay, unet, scheduler, indices, trained: CodeDirection, attribute=None) -> ZSem:
        """For a run's samples ``indices``: their own renders, encoded."""
        return cls(trained, replay.render(unet, scheduler, list(indices)), attribute)

    def with_edit(self, edit: CodeDirection) -> ZSem:
        """The same encoded samples (z_sem, x_T) under another direction of the same autoencoder."""
        import copy

        same = edit.model is self.edit.model or (edit.fingerprint and edit.fingerprint == self.edit.fingerprint)
        if not same or edit.steps != self.edit.steps:
            raise ValueError("with_edit: a direction of another autoencoder or step count: encode the samples again")
        twin = copy.copy(self)
        twin.edit = edit
        return twin

    def moved(self, gamma: torch.Tensor) -> torch.Tensor:
        """The codes at strength ``gamma`` ((B, 1) or (1, 1)), normalised."""
        return self.z + gamma * self.edit.normal.to(self.z.device).view(1, -1)

    def action(self, strength):
        return Recode(self, strength)


@register
class ZSemSparse(ZSem):
    name = "zsem-sparse"
    unit = "steps along the unit top-k normal of the attribute's hyperplane in z_sem (normalised per dimension)"
    reference = "Lu et al. 2024 (HDAE) sparse hyperplanes, the reading note's sec. IX; on DiffAE's z_sem"


@register
class Hdae(ZSemSparse):
    name = "hdae"
    unit = "steps along the unit top-k normal of the attribute's hyperplane in a hierarchical code (normalised)"
    reference = "Lu et al. 2024 (HDAE): hierarchical code, sparse hyperplanes; the reading note's sec. IX, Fig. 17-18"
    trainer = "hspace diffae RUN --model toy-hdae (diffae.attributes: ATTR)"


@register
class HdaeDense(ZSem):
    name = "hdae-dense"
    unit = "steps along the unit normal of the attribute's hyperplane in a hierarchical code (normalised)"
    reference = "Lu et al. 2024 (HDAE)'s hierarchical code with DiffAE's dense normal (sec. 5.2)"
    trainer = "hspace diffae RUN --model toy-hdae (diffae.attributes: ATTR)"


@dataclass
class AgeEdit:
    """A trained PADA (hcore.pada.Pada), the CLIP text feature of its target age and the mean
    CLIP image feature of its training images of that age (the text-image pair of eq. (8)), the
    autoencoder as ``CodeDirection`` holds it, and the seed of e_age."""

    pada: torch.nn.Module
    text: torch.Tensor
    reference: torch.Tensor
    model: torch.nn.Module
    scheduler: object
    stats: dict
    steps: int
    seed: int = 0


@register
class PadaAge(ZSem):
    name = "pada"
    unit = "the share of the way from the sample's z_sem to PADA's z_age (1: PADA's output)"
    reference = "Li et al. 2023 (PADA), the reading note's sec. IV, eqs. (8)-(11), on DiffAE's z_sem"
    trainer = "hspace diffae RUN (diffae.pada_attribute: ATTR)"
    strength_start, strength_max = 1.0, 4.0

    def __init__(self, edit: AgeEdit, images: torch.Tensor, attribute: str | None = None):
        super().__init__(edit, images, attribute)
        device = self.z.device
        n = len(self.z)
        with torch.no_grad():
            self.z_age, _ = edit.pada.to(device)(
                self.z,
                edit.text.to(device).view(1, -1).expand(n, -1),
                edit.reference.to(device).view(1, -1).expand(n, -1),
                generator=torch.Generator().manual_seed(edit.seed),
            )

    @classmethod
    def load_weights(cls, state: dict, meta: dict, diffae=None, guide=None, **loaded) -> AgeEdit:
        from hspace.hcore.pada import Pada

        if diffae is None or guide is None:
            raise ValueError("pada needs its autoencoder and the CLIP it was trained with (metadata 'diffae', 'clip')")
        model, scheduler, _, stats = diffae
        pada = Pada(int(meta["clip_dim"]), int(stats["mean"].numel()), int(meta["hidden"]))
        pada.load_state_dict({k.removeprefix("pada."): v for k, v in state.items() if k.startswith("pada.")})
        text = guide.text([meta["target"]])[0]
        return AgeEdit(pada.eval(), text, state["reference"], model, scheduler, stats, int(meta["diffae_steps"]))

    def moved(self, gamma: torch.Tensor) -> torch.Tensor:
        return self.z + gamma * (self.z_age - self.z)
