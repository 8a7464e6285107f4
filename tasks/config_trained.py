"""The config sections of the stages that train an editor on a run's samples (AVI, the
CLIP-trained editors, a diffusion autoencoder's code directions); part of tasks/config.py's
RunConfig."""

from __future__ import annotations

from pydantic import FiniteFloat

from hspace.tasks.config_fields import BINARY, Floats, Ints, MaybeName, Names, Section, option


class AviSection(Section):
    prompt_pair: tuple[str, str] | None = option(None, "the original text A and the target text B (SD-family models)")
    name: str = option("avi", "the predictor's name (RUN/directions/avi/NAME); an attribute name is scored")
    prompt_pairs: dict[str, tuple[str, str]] = option(
        dict, "or several: NAME -> [A, B], one predictor each (YAML; hspace compare finds ATTRIBUTE's)", hidden=True
    )
    k: int | None = option(None, "singular vectors taken from each latent channel (default: half its side)", gt=0)
    org_share: FiniteFloat = option(0.3, "x_org's step, as a share of the steps (0.3: t = 0.7 T)", ge=0, lt=1)
    tar_share: FiniteFloat = option(0.4, "x_tar's step, further along (0.4: t = 0.6 T)", gt=0, lt=1)
    samples: int = option(256, "seeds whose latent pairs train the predictor (the run's first)", gt=0)
    epochs: int = option(50, "Adam epochs over the pairs' channels (the paper: 5, over 5000 pairs)", gt=0)
    lr: FiniteFloat = option(1e-3, "Adam's learning rate", gt=0)
    batch_size: int = option(64, "channels per Adam step", gt=0)
    weights: Floats = option(lambda: [10.0, 10.0, 1.0, 1.0], "lambda_1..4: target, source, their singular values")
    hidden: int | None = option(None, "the predictor's width (default: the channel's H * W, as the paper)", gt=0)
    held_out: int = option(16, "the run's last samples the trained edit is scored on (alpha 1, the judge)", ge=0)
    evaluator: str = option("oracle", "the judge of the held-out score")


class ClipEditsSection(Section):
    methods: Names = option(lambda: ["diffusionclip", "asyrp-net", "deltaspace"], "the editors to train")
    prompt_pairs: dict[str, tuple[str, str]] = option(
        lambda: {"Smiling": ("A person", "A smiling person")},
        "NAME -> [source text, target text]: one edit each (YAML; hspace compare finds ATTRIBUTE's)",
        hidden=True,
    )
    clip: str = option("toy-clip", "the CLIP folder whose losses train them (toy-clip, a path, an HF id)")
    samples: int = option(32, "the run's first samples, whose trajectories train DiffusionCLIP and Asyrp", gt=0)
    epochs: int = option(2, "passes over those samples (one optimiser step per denoising step)", gt=0)
    lr: FiniteFloat = option(4e-4, "DiffusionCLIP's LoRA learning rate (Adam)", gt=0)
    asyrp_lr: FiniteFloat = option(2e-2, "Asyrp's f learning rate (Adam)", gt=0)
    l1: FiniteFloat = option(3.0, "lambda_L1 of eq. (7): the identity term's weight", ge=0)
    t0_share: FiniteFloat = option(0.4, "DiffusionCLIP's t0 as a share of the steps: fine-tuned from there", gt=0, lt=1)
    edit_share: FiniteFloat = option(0.6, "Asyrp's editing interval [T, t_edit]: this share of the steps", gt=0, le=1)
    rank: int = option(4, "DiffusionCLIP's LoRA rank", gt=0)
    basis: int = option(16, "DeltaSpace: principal axes of h_{T:1} the mapper's Delta h lives in", gt=0)
    held_out: int = option(16, "the run's last samples each edit is scored on (by evaluator)", ge=0)
    evaluator: str = option("oracle", "the judge of the held-out score")


class DiffAESection(Section):
    model: str = option("toy-diffae", "the diffusion autoencoder (toy-diffae, or its folder)")
    attributes: Names = option(
        lambda: list(BINARY), "attributes whose z_sem hyperplane is fitted (by the run's labels)"
    )
    samples: int = option(256, "the run's first samples, encoded and labelled, that fit the hyperplanes", gt=1)
    steps: int = option(20, "DDIM steps of the autoencoder's inversion (eq. (14)) and decoding", gt=0)
    k: Ints = option(lambda: [4, 8, 16, 32], "HDAE's sparse hyperplanes: the top-k weights kept, swept")
    pada_attribute: MaybeName = option("Young", "the age PADA edits (toward pada_texts' second; none: no PADA)")
    pada_texts: tuple[str, str] = option(
        ("An old person", "A young person"), "PADA's ages as texts: [label 0, label 1] of pada_attribute", hidden=True
    )
    clip: str = option("toy-clip", "the CLIP of PADA's age texts and images (toy-clip, a path)")
    pada_steps: int = option(300, "PADA's Adam steps (batches of 16 training samples)", gt=0)
    held_out: int = option(16, "the run's last samples each edit is scored on (by evaluator)", ge=0)
    evaluator: str = option("oracle", "the judge of the labels' and the held-out score")
