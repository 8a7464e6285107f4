"""The config of every stage: one pydantic section per stage, the whole as ``RunConfig``.

A section is the single source of a stage's settings: `hspace run --config` reads them
from YAML, each single-stage command (`hspace pca --components 5`) gets them as options
generated from the same fields (same names, defaults, limits and help), and the stage's
fingerprint (Prefect cache key and run.json record) hashes them. A field's
``json_schema_extra`` may carry ``cli``: the option name where it is not the field's,
``hidden``: not an option, ``yaml_file``: the option is a YAML file holding the value.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, FiniteFloat, ValidationError, model_serializer

from hspace.data.catalog import RunError
from hspace.tasks.config_fields import (
    BINARY,
    CLIP_HELP,
    H_POINT_HELP,
    ClipSample,
    Eta,
    Floats,
    HPoint,
    HPoints,
    Names,
    Prompts,
    Section,
    option,
)
from hspace.tasks.config_trained import AviSection, ClipEditsSection, DiffAESection


class SampleSection(Section):
    model: str = option("toy", "'toy', 'toy-sd', a local diffusers folder, or a Hugging Face id (local cache)")
    n: int = option(256, "number of samples", gt=0)
    steps: int = option(20, "DDIM steps; directions only apply to runs with the same steps", gt=0)
    eta: Eta = option(
        1.0, "eta_t of eq. (5): 1 (the paper's synthesis setting), 0 (deterministic DDIM), a list per step, or V@S0:S1"
    )
    clip_sample: ClipSample = option("off", CLIP_HELP)
    seed: int = option(0, "run seed; sample i uses a generator seeded from (seed, i)")
    batch_size: int = option(64, "samples per batch = per Zarr shard = one Prefect task", gt=0)
    h_point: HPoint = option("output", H_POINT_HELP)
    h_points: HPoints = option(
        list, "more h points captured in the same pass (samples.zarr h@POINT; each gets its own PCA and directions)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32", "float32, float16 or bfloat16 for the UNet")
    # text-conditioned latent models (Stable Diffusion 1.x / 2.x, SDXL); refused for pixel models
    prompt: str | None = option(None, "SD models: the text of every sample ('' on purpose: unconditional)")
    prompts: Prompts | None = option(
        None,
        "SD models: several texts (comma-separated, a YAML list, or @FILE with one per line); sample i gets i mod len",
    )
    negative_prompt: str | None = option(None, "SD models: the unconditional branch's text (default empty)")
    guidance_scale: float = option(7.5, "SD models: classifier-free guidance scale s (<= 1: no guidance)", ge=0)
    edit_branch: Literal["both", "cond", "uncond"] = option(
        "both", "SD models: which half of the guided batch h-space edits go to"
    )
    store_xt: bool = option(False, "also store x_t of every step (the latent; a DDPM's pixels) in samples.zarr")

    @model_serializer(mode="wrap")
    def _without_default_xt(self, handler):
        """store_xt off: the dump (run.json's config, the fingerprint) is what it was before the
        option existed, so an old run folder opens, resumes and stays cached."""
        data = handler(self)
        for key in ("store_xt", "h_points"):  # off / none: the dump of runs made before the option
            if not data.get(key):
                data.pop(key, None)
        return data

    def prompt_list(self) -> list[str] | None:
        """The prompts sample i draws from (i mod len), or None when none was given."""
        if self.prompts:
            return list(self.prompts)
        return None if self.prompt is None else [self.prompt]


class InvertSection(Section):
    images: Path = option(None, "folder with positive/ and negative/, or any folder with --labels")
    labels: Path | None = option(None, "CSV with a 'file' column and one column per attribute")
    attribute: str = option("label", "attribute name of positive/ vs negative/")
    model: str = option("toy", "'toy', 'toy-sd', a local diffusers folder, or a Hugging Face id (local cache)")
    method: Literal["ddpm", "ddim"] = option(
        "ddpm", "ddpm: edit-friendly DDPM inversion (exact; noise maps stored); ddim: DDIM inversion (eta 0)"
    )
    steps: int = option(20, "DDIM steps; directions only apply to runs with the same steps", gt=0)
    eta: Eta = option(1.0, "ddpm: eta_t of the inversion and of every replay (eq. (5); 1: DDPM)")
    seed: int = option(0, "ddpm: image i's independent noising draws come from a generator seeded from (seed, i)")
    refine: int = option(3, "ddim: fixed-point refinements per step (0 = plain DDIM inversion)", ge=0)
    clip_sample: ClipSample = option("off", CLIP_HELP)
    batch_size: int = option(32, "images per batch = per Zarr shard", gt=0)
    h_point: HPoint = option("output", H_POINT_HELP)
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32", "float32, float16 or bfloat16 for the UNet")
    prompt: str | None = option(None, "SD models: the source prompt the images are inverted with (default empty)")
    guidance_scale: float = option(1.0, "SD models: classifier-free guidance scale of the inversion (1: none)", ge=0)

    def prompt_list(self) -> list[str] | None:
        return None if self.prompt is None else [self.prompt]

    def default_prompts(self) -> list[str]:
        """A text-conditioned model inverts with the empty prompt unless one is given."""
        return [""]


class AnnotateSection(Section):
    annotators: Names = option(
        lambda: ["oracle"],
        "oracle | oracle:PATH | celeba40:PATH | hopenet:PATH (comma-separated)",
        cli="--annotator",
        min_length=1,
    )
    batch_size: int = option(256, "images per annotator batch (= chunk of the scores array)", gt=0)


class PCASection(Section):
    enabled: bool = option(True, "run the PCA stage", hidden=True)
    components: int = option(10, "principal components per timestep (K)", gt=0)
    method: Literal["auto", "ipca", "randomized"] = option("auto", "auto | ipca | randomized (auto picks by size)")
    workers: int = option(1, "local Dask workers (one timestep per task)", gt=0)
    batch_size: int = option(256, "rows read per chunk (and IncrementalPCA batch)", gt=0)
    reference_step: int | None = option(
        None, "step whose signs are kept; the others are chained from it step to step (default T//2)", ge=0
    )
    complete_shards_only: bool = option(False, "use only complete shards of an unfinished run")


class NameSection(Section):
    directions: Names = option(lambda: [f"pc{j:02d}" for j in range(10)], "direction names in RUN/directions")
    annotator: str = option("oracle", "oracle | oracle:PATH | celeba40:PATH | hopenet:PATH")
    n: int | None = option(None, "samples edited per direction: the run's first n (default 64 or all)", gt=0)
    gamma: FiniteFloat = option(2.0, "edit strength; each direction is applied at -gamma and +gamma", gt=0)


class JacobianSection(Section):
    sample: int = option(0, "sample I of the run", ge=0)
    step: int = option(0, "step S of the schedule (0 = first denoising step)", ge=0)
    k: int = option(8, "number of singular vectors", gt=0)
    block: int | None = option(None, "SM Alg. 2 in blocks of b vectors (memory bound)", gt=0)
    roi: str | None = option(None, "x0,y0,x1,y1: region of interest in pixels")
    mask: Path | None = option(None, "PNG mask (white = region of interest)")
    tol: FiniteFloat = option(1e-4, "stop when each singular pair's residual |JᵀJv - σ²v| / σ² is below this", gt=0)
    max_iters: int = option(100, "iteration cap (a warning says when it is hit)", gt=0)
    localize: int | None = option(
        None, "with --roi/--mask: the K directions of the top-R subspace whose change stays most inside", gt=0
    )


class DirectionsSection(Section):
    attributes: Names = option(
        lambda: list(BINARY), "attributes in annotations.zarr (comma-separated)", cli="--attribute", min_length=1
    )
    top: int = option(32, "k: top-k and bottom-k samples by the score", gt=0)
    held_out: int | None = option(
        None, "the last samples, never ranked (kept for evaluate); default 64, none on an inverted run", ge=0
    )
    latent: Literal["h", "xT"] = option("h", "h (h_{T:1}) or xT (initial noise)")
    name: str | None = option(None, "file name in RUN/directions (one attribute only; default: the attribute)")
    prompt_pair: tuple[str, str] | None = option(
        None, "SD runs: instead of attributes, v = mean(h_B - h_A) over the run's seeds sampled under texts A and B"
    )
    prompt_pairs: dict[str, tuple[str, str]] = option(
        dict, "SD runs: also ATTRIBUTE_prompt per attribute -> [text A, text B], as --prompt-pair", hidden=True
    )
    pair_samples: int | None = option(
        None, "prompt pairs: the first N samples drawn again under A and B (default: all but the held-out)", gt=0
    )

    def held_out_of(self, run_config: dict) -> int:
        """The held-out count for a run (its run.json config): as given, else 64 on a sampled
        run (as `hspace run`) and 0 on an inverted one (real images: all are labelled data)."""
        if self.held_out is not None:
            return self.held_out
        return 0 if run_config.get("kind") == "inversion" else 64


class DisentangleSection(Section):
    enabled: bool = option(True, "run the disentangle stage", hidden=True)
    directions: Names = option(list, "directions to disentangle (default: directions.attributes)", cli="--direction")
    against: Names = option(list, "directions to project out (default: conditions, else all the others)")
    conditions: dict[str, list[str]] = option(dict, "attribute -> attributes to project out", hidden=True)
    keep_norm: bool = option(True, "rescale each projection to the original's norm (--no-keep-norm: eq. (11) as is)")
    name: str | None = option(None, "output name, one direction only (default: DIRECTION_disentangled)")


class EvaluateSection(Section):
    enabled: bool = option(True, "run the evaluate stage", hidden=True)
    directions: Names = option(list, "direction names in RUN/directions (default: directions.attributes)")
    methods: Names = option(list, "registered editing methods scored as rows too (with each direction or prompt pair)")
    disentangled: bool = option(True, "also each direction projected against the others (eq. 11)")
    evaluator: str = option("oracle", "oracle | oracle:PATH | clip:PATH | celeba40:PATH | hopenet:PATH")
    n: int | None = option(None, "held-out samples edited per direction (default: 1000 or all)", gt=0)
    gamma: FiniteFloat | Literal["auto"] = option(1.0, "edit strength: a number, or 'auto' (calibrated per direction)")
    target: FiniteFloat | None = option(None, "--gamma auto: mean change to reach (default 0.5, pose 10 deg)", gt=0)
    calibration_n: int = option(16, "--gamma auto: held-out samples used to calibrate", gt=0)
    prompts: dict[str, tuple[str, str]] | None = option(
        None, "clip: YAML file mapping attribute -> [positive prompt, negative prompt]", yaml_file=True
    )

    @model_serializer(mode="wrap")
    def _without_empty_methods(self, handler):
        """No methods: the dump (and so the stage's fingerprint) is what it was before methods
        existed, so upgrading does not redo the evaluation of every run."""
        data = handler(self)
        if not data.get("methods"):
            data.pop("methods", None)
        return data


class FiguresSection(Section):
    sample: int = option(0, "the sample the edit grids show", ge=0)
    scales: Floats = option(lambda: [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0], "gammas of the grids", min_length=1)
    pcs: int = option(6, "PCs in the PCA grid (and random directions in the baseline grid)", ge=0)
    name_samples: int = option(16, "samples used to name PCs by the attribute they move (0: off)", ge=0)
    efficiency: bool = option(True, "Fig. 8: h vs x_T directions of the first attribute from n pairs")
    jacobian: bool = option(True, "Fig. 7: Jacobian directions of `sample`, transferred to others")
    jacobian_step: int | None = option(None, "default: steps // 5", ge=0)
    jacobian_k: int = option(3, "Jacobian directions of Fig. 7", gt=0)


class CompareSection(Section):
    attributes: Names = option(list, "attributes compared (default: every one with an eq. (10) direction file)")
    methods: Names = option(list, "editing methods compared (default: every one that fits the run's model)")
    evaluator: str = option("oracle", "the judge: oracle | oracle:PATH | celeba40:PATH | hopenet:PATH")
    n: int = option(16, "held-out samples each method edits (the same for every method)", gt=0)
    calibration_n: int = option(16, "other held-out samples each method's strength is calibrated on", gt=0)
    target: FiniteFloat = option(0.25, "own change every method is calibrated to", gt=0)


class LatentSvdSection(Section):
    k: int = option(8, "top singular values and vectors kept per matrix (<= the latent's side)", gt=0)
    n: int | None = option(None, "samples decomposed (default: all)", gt=0)
    probe_n: int = option(16, "samples whose singular values are scaled and continued (the property tests)", gt=0)
    probe_indices: int = option(4, "singular values probed at each step: 0 .. probe_indices - 1", gt=0)
    probe_scale: FiniteFloat = option(0.5, "the probe's relative change of sigma_i (sv-scale's strength s)", ge=-1)
    evaluator: str = option("oracle", "the judge of which factor moves: oracle | oracle:PATH | celeba40:PATH")


class LayersSection(Section):
    points: Names = option(list, "h points mapped (default: each down block's output, the mid block's, each up's)")
    attributes: Names = option(lambda: list(BINARY), "attributes probed and edited (the run's annotations)")
    samples: int = option(128, "the run's first samples: their h at every point captured, probed, eq. (10)", gt=0)
    components: int = option(4, "principal axes per step against as many random directions (PCs / random)", gt=0)
    n: int = option(16, "held-out samples every edit is scored on", gt=0)
    calibration_n: int = option(16, "other held-out samples each eq. (10) strength is calibrated on", gt=0)
    target: FiniteFloat = option(0.25, "the own change every point's edit is calibrated to", gt=0)
    evaluator: str = option("oracle", "the judge of the edits: oracle | oracle:PATH | celeba40:PATH")


class RunConfig(Section):
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    dask_address: str | None = option(None, "sampling shards and PCA on this Dask scheduler (not in any cache key)")
    sample: SampleSection = Field(default_factory=SampleSection)
    invert: InvertSection | None = None
    annotate: AnnotateSection = Field(default_factory=AnnotateSection)
    pca: PCASection = Field(default_factory=PCASection)
    name: NameSection = Field(default_factory=NameSection)
    jacobian: JacobianSection = Field(default_factory=JacobianSection)
    directions: DirectionsSection = Field(default_factory=DirectionsSection)
    disentangle: DisentangleSection = Field(default_factory=DisentangleSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    figures: FiguresSection = Field(default_factory=FiguresSection)
    compare: CompareSection | None = None  # the comparison runs in `hspace run` where configured
    latent_svd: LatentSvdSection | None = None  # the SVD of x_t (needs sample.store_xt) where configured
    avi: AviSection | None = None  # an AVI predictor trained in `hspace run` where configured
    clip_edits: ClipEditsSection | None = None  # DiffusionCLIP, Asyrp's f, DeltaSpace, where configured
    diffae: DiffAESection | None = None  # z_sem directions of a diffusion autoencoder, where configured
    layers: LayersSection | None = None  # the layer map (h at every block), where configured


def evaluated_rows(cfg: RunConfig) -> list[str]:
    """The attribute (row) of every direction evaluate scores (pcNN/randomNN keep their name;
    ATTRIBUTE_prompt, from directions.prompt_pairs, scores ATTRIBUTE)."""
    d = cfg.directions
    names = cfg.evaluate.directions or list(d.attributes) + [f"{a}_prompt" for a in d.prompt_pairs]
    return [n.removesuffix("_prompt") if n.removesuffix("_prompt") in d.prompt_pairs else n for n in names]


def validation_message(e: ValidationError, where: str, options: bool = False) -> str:
    """One line for the first problem: the key (or --option) and what is wrong with it."""
    first = e.errors()[0]
    loc = [str(p) for p in first["loc"]]
    # loc is (section, field, union member or list index ...): name the field, as option or key
    key = ".".join(loc[:2]) or "(top level)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{where}{key}: unknown key{more}"
    raw = first["msg"]
    msg = f" must be {raw.removeprefix('Input should be ')}" if raw.startswith("Input should be ") else f": {raw}"
    field = RunConfig.model_fields.get(loc[0]) if loc else None
    info = section_model(loc[0]).model_fields.get(loc[1]) if field and len(loc) > 1 else None
    if options and len(loc) > 1:  # the field's command-line option
        key = ((info.json_schema_extra or {}).get("cli") if info else None) or "--" + loc[1].replace("_", "-")
    what = f" ({info.description})" if info is not None and info.description else ""
    return f"{where}{key}{msg}, got {first.get('input')!r}{what}{more}"


def load_config(path: Path | None) -> RunConfig:
    """The validated config; RunError naming the offending key (before any work starts)."""
    if path is None:
        return RunConfig()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise RunError(f"cannot read --config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RunError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RunError(f"--config {path} must be a mapping of sections (sample, annotate, pca, ...)")
    try:
        return RunConfig.model_validate(data)  # sections against each other: tasks.check.check_config
    except ValidationError as e:
        raise RunError(validation_message(e, f"--config {path}: ") + "; see `hspace config --example`") from None


def example_config(kind: str = "toy") -> str:
    """A documented example config (YAML): toy, toy_sd, celeba (the CelebA-HQ DDPM) or sd."""
    from hspace.data.catalog import example_path

    return example_path(f"{kind}.yaml").read_text()


def section_model(name: str):
    """The section model of RunConfig field ``name`` (unwrapping ``X | None``)."""
    annotation = RunConfig.model_fields[name].annotation
    return next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
