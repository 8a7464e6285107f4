"""The whole-config check and the plan of `hspace run` (before any work).

``config_problems`` checks every section of a RunConfig against every other (held-out vs
evaluate vs calibration samples, top-k vs the samples left to rank, attributes vs the names
the configured annotators produce, prompts vs evaluated attributes, disentangle conditions
vs evaluated directions, PCA components vs n, steps vs the steps the figures use), and that
every weight file loads in the format its spec names (the model, each annotator, the
evaluator). It returns every problem at once, one line each, naming the key and the fix;
``check_config`` raises them as one RunError. Nothing is written.

``make_plan`` then says what `hspace run` would do: each stage run or skipped (from the
fingerprints recorded in an existing run folder), its UNet passes, the disk the run will
take (h: n x T x C x H x W x 2 bytes), and a time estimate from a short timed probe of the
model on the chosen device.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from hspace.data.catalog import RunError, RunFolder
from hspace.data.disk import disk_needs, pending_sample_bytes, require_space
from hspace.tasks.config import RunConfig, evaluated_rows


@dataclass
class Facts:
    """What the checks learnt by loading things, for the plan."""

    device: str = "cpu"
    unet: object = None
    scheduler: object = None
    h_shape: tuple[int, int, int] | None = None
    point_shapes: dict = field(default_factory=dict)  # sample.h_points -> h's shape there
    image_shape: tuple[int, int, int] | None = None
    conditioning: object = None  # a text-conditioned model's guided conditioning of one prompt (the probe)
    annotator_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    evaluator_names: tuple[str, ...] | None = None


def _static_problems(cfg: RunConfig) -> list[str]:
    """The rules that need no file: counts and names of one section against another."""
    from hspace.tasks.config_fields import resolve_eta

    p: list[str] = []
    s, d, ev, f = cfg.sample, cfg.directions, cfg.evaluate, cfg.figures
    n, steps = s.n, s.steps
    if len(set(s.h_points)) != len(s.h_points) or s.h_point in s.h_points:
        p.append("sample.h_points: name each extra point once, and not sample.h_point again")
    try:
        resolve_eta(s.eta, steps)
    except RunError as e:
        p.append(f"sample.eta: {str(e).removeprefix('--')}")
    if ev.methods:
        from hspace.tasks.evaluate import method_problem

        p += [problem for problem in map(method_problem, ev.methods) if problem]
    held = d.held_out_of({})
    ranked = n - held
    if held >= n - 1:
        p.append(
            f"directions.held_out: {held} of sample.n {n} leaves {ranked} sample(s) to build directions from; "
            f"lower it below {n - 1} or raise sample.n"
        )
    elif 2 * d.top > ranked:
        p.append(
            f"directions.top: {d.top} top and {d.top} bottom samples need {2 * d.top}, but sample.n - "
            f"directions.held_out = {ranked}; lower it to {max(1, ranked // 2)} or raise sample.n"
        )
    evaluating = ev.enabled and d.latent == "h"
    rows = evaluated_rows(cfg)
    if evaluating:
        reserved = ev.calibration_n if ev.gamma == "auto" else 0
        needed = (ev.n or 1) + reserved
        what = f"evaluate.n {ev.n or 1}" + (f" + evaluate.calibration_n {reserved} (gamma auto)" if reserved else "")
        if held < needed:
            fix = (
                f"lower evaluate.n to {held - reserved}"
                if held > reserved and ev.n
                else f"lower evaluate.calibration_n to {held - 1}"
                if reserved and held > 1
                else f"raise directions.held_out to {needed}"
            )
            p.append(f"evaluate.n: {what} = {needed} held-out samples, directions.held_out has {held}; {fix}")
        for name in rows:
            m = re.fullmatch(r"(pc|random)(\d+)", name)
            if m and (not cfg.pca.enabled or int(m.group(2)) >= cfg.pca.components):
                k = cfg.pca.components
                p.append(f"evaluate.directions: {name} is not made by the pca stage (pca.components {k})")
            elif not m and name not in d.attributes and name not in d.prompt_pairs:
                p.append(
                    f"evaluate.directions: {name!r} is not among directions.attributes ({', '.join(d.attributes)}); "
                    "add it there or drop it"
                )
    p += _compare_problems(cfg, held)
    p += _latent_svd_problems(cfg)
    conditions = cfg.disentangle.conditions
    for attribute, against in conditions.items():
        for a in [attribute, *against]:
            if a not in d.attributes:
                known = ", ".join(d.attributes)
                p.append(f"disentangle.conditions: {a!r} is not among directions.attributes ({known})")
            elif evaluating and ev.disentangled and a not in rows:
                p.append(f"disentangle.conditions: {a!r} is not among the evaluated directions ({', '.join(rows)})")
        if attribute in against:
            p.append(f"disentangle.conditions: {attribute} is projected against itself; remove it from its own list")
    if cfg.pca.enabled:
        limit = min(n - 1, cfg.pca.batch_size) if cfg.pca.method == "ipca" else n - 1
        if cfg.pca.components > limit:
            p.append(
                f"pca.components: {cfg.pca.components} exceeds {limit} (sample.n - 1"
                + (", pca.batch_size for ipca" if cfg.pca.method == "ipca" else "")
                + f"); lower it to {limit}"
            )
        if cfg.pca.reference_step is not None and cfg.pca.reference_step >= steps:
            p.append(f"pca.reference_step: {cfg.pca.reference_step} is not a step of sample.steps {steps}")
        if f.pcs > cfg.pca.components:
            p.append(f"figures.pcs: {f.pcs} exceeds pca.components {cfg.pca.components}; lower it")
    if f.sample >= n:
        p.append(f"figures.sample: {f.sample} is not a sample of sample.n {n}")
    if f.name_samples > n:
        p.append(f"figures.name_samples: {f.name_samples} exceeds sample.n {n}")
    jstep = f.jacobian_step if f.jacobian_step is not None else steps // 5
    if f.jacobian and jstep >= steps:
        p.append(f"figures.jacobian_step: {jstep} is not a step of sample.steps {steps} (0..{steps - 1})")
    if cfg.jacobian.step >= steps:
        p.append(f"jacobian.step: {cfg.jacobian.step} is not a step of sample.steps {steps} (0..{steps - 1})")
    if cfg.jacobian.sample >= n:
        p.append(f"jacobian.sample: {cfg.jacobian.sample} is not a sample of sample.n {n}")
    if cfg.name.n is not None and cfg.name.n > n:
        p.append(f"name.n: {cfg.name.n} exceeds sample.n {n}")
    return p


def _compare_problems(cfg: RunConfig, held: int) -> list[str]:
    """The comparison's samples, methods and attributes against the rest of the config."""
    from hspace.tasks.compare import method_problems

    c, d, p = cfg.compare, cfg.directions, []
    if c is None:
        return p
    if c.n + c.calibration_n > held:
        p.append(
            f"compare.n: compare.n {c.n} + compare.calibration_n {c.calibration_n} = {c.n + c.calibration_n} "
            f"held-out samples, directions.held_out has {held}; lower them or raise directions.held_out"
        )
    p += method_problems(c.methods)
    p += [f"compare.attributes: {a!r} is not among directions.attributes ({', '.join(d.attributes)})"
          for a in c.attributes if a not in d.attributes]  # fmt: skip
    return p


def _latent_svd_problems(cfg: RunConfig) -> list[str]:
    """The SVD of x_t against the sampling: x_t stored, enough samples to probe."""
    s, p = cfg.latent_svd, []
    if s is None:
        return p
    if not cfg.sample.store_xt:
        p.append("latent_svd: needs sample.store_xt: true (the x_t of every step it decomposes)")
    for key, value in (("n", s.n), ("probe_n", s.probe_n)):
        if value is not None and value > cfg.sample.n:
            p.append(f"latent_svd.{key}: {value} exceeds sample.n {cfg.sample.n}")
    if s.probe_indices > s.k:
        p.append(f"latent_svd.probe_indices: {s.probe_indices} exceeds latent_svd.k {s.k}")
    return p


def _text_problems(cfg: RunConfig, ref, facts: Facts) -> list[str]:
    """Prompts against the model (text-conditioned or not); loads the text parts of an SD
    model (a damaged VAE or text encoder is found here, before any work)."""
    from hspace.data import models
    from hspace.tasks.sample import text_config

    try:
        text = text_config(cfg.sample, ref, facts.unet)
    except RunError as e:
        return [f"sample.prompt: {e}"]
    if not text:
        return []
    facts.image_shape = (3, text["image_size"], text["image_size"])
    try:
        setup = models.text_for(ref, text)
        facts.conditioning = setup.conditioning(setup.prompts[:1])
    except RunError as e:
        return [f"sample.model: {e}"]
    return []


def _load_problems(cfg: RunConfig, facts: Facts) -> list[str]:
    """The rules that load something: device, model, annotators, evaluator (names included)."""
    from hspace.data import models
    from hspace.data.annotators import load_annotator
    from hspace.hcore.hooks import HPointError, NoMidBlockError, h_shape
    from hspace.tasks.avi import config_problems as avi_problems
    from hspace.tasks.clip_edits import config_problems
    from hspace.tasks.config_fields import flow_eta_problem
    from hspace.tasks.diffae import config_problems as diffae_problems
    from hspace.tasks.layers import config_problems as layers_problems
    from hspace.tasks.sample import resolve_device

    p: list[str] = []
    try:
        facts.device = resolve_device(cfg.device)
    except RunError as e:
        p.append(f"device: {e}")
    try:
        ref = models.resolve(cfg.sample.model)
        import torch

        facts.unet, facts.scheduler = models.load(ref, dtype=getattr(torch, cfg.sample.dtype))
        facts.h_shape = tuple(h_shape(facts.unet, cfg.sample.h_point))
        facts.point_shapes = {point: tuple(h_shape(facts.unet, point)) for point in cfg.sample.h_points}
        size = facts.unet.config.sample_size
        facts.image_shape = (facts.unet.config.out_channels, size, size)
        train_steps = facts.scheduler.config.num_train_timesteps
        if problem := flow_eta_problem(facts.scheduler, cfg.sample.eta, cfg.sample.steps):
            p.append(f"sample.eta: {problem}")
        if cfg.sample.steps > train_steps:
            p.append(f"sample.steps: {cfg.sample.steps} exceeds the model's {train_steps} training timesteps")
        if cfg.latent_svd is not None and cfg.latent_svd.k > size:
            p.append(f"latent_svd.k: {cfg.latent_svd.k} exceeds the latent's side {size} (matrices {size} x {size})")
        p += avi_problems(cfg, ref.kind, (facts.unet.config.in_channels, size, size)) + config_problems(cfg, ref.kind)
        p += diffae_problems(cfg, models.image_size(ref, facts.unet.config)) + layers_problems(cfg, facts.unet)
        p += _text_problems(cfg, ref, facts)
        if ref.kind == "pixel" and (cfg.directions.prompt_pairs or cfg.directions.prompt_pair):
            p.append(
                "directions.prompt_pairs: prompt pairs need a text-conditioned model (Stable Diffusion); drop them"
            )
    except (RunError, NoMidBlockError, HPointError) as e:
        p.append(f"{'sample.h_point' if isinstance(e, HPointError) else 'sample.model'}: {e}")
    for spec in cfg.annotate.annotators:
        try:
            facts.annotator_names[spec] = tuple(load_annotator(spec, "cpu").names)
        except RunError as e:
            p.append(f"annotate.annotators: {spec}: {e}")
    ev, d = cfg.evaluate, cfg.directions
    evaluating = ev.enabled and d.latent == "h"
    if evaluating:
        try:
            facts.evaluator_names = tuple(load_annotator(ev.evaluator, "cpu", prompts=ev.prompts).names)
        except RunError as e:
            p.append(f"evaluate.evaluator: {e}")
    produced = {a for names in facts.annotator_names.values() for a in names}
    if len(facts.annotator_names) == len(cfg.annotate.annotators):  # every annotator loaded: names are known
        missing = [a for a in d.attributes if a not in produced]
        if missing:
            p.append(
                f"directions.attributes: {', '.join(missing)} not scored by annotate.annotators "
                f"({', '.join(sorted(produced))}); drop it or add an annotator that scores it"
            )
        first = cfg.annotate.annotators[0] if cfg.annotate.annotators else None
        if cfg.figures.efficiency and d.latent == "h" and d.attributes and first:
            if d.attributes[0] not in facts.annotator_names[first]:
                p.append(
                    f"figures.efficiency: Fig. 8 scores {d.attributes[0]} (the first of directions.attributes) "
                    f"with the first annotator {first.split(':')[0]}, which does not score it; reorder either list "
                    "or set figures.efficiency: false"
                )
    if evaluating and facts.evaluator_names is not None:
        rows = [r for r in evaluated_rows(cfg) if not re.fullmatch(r"(pc|random)\d+", r)]
        missing = [r for r in rows if r not in facts.evaluator_names]
        if missing:
            kind = ev.evaluator.split(":")[0]
            fix = (
                "add a [positive, negative] prompt pair for each to evaluate.prompts"
                if kind == "clip"
                else "evaluate with one that scores them"
            )
            p.append(
                f"evaluate.evaluator: {kind} does not score {', '.join(missing)} (evaluated directions); "
                f"its Table-1 diagonal would be missing; {fix}"
            )
    return p


def config_problems(cfg: RunConfig, load: bool = True) -> tuple[list[str], Facts]:
    """Every problem of ``cfg`` as one line each (empty: it fits), and what loading learnt."""
    facts = Facts()
    problems = _static_problems(cfg)
    if load:
        problems += _load_problems(cfg, facts)
    return problems, facts


def check_config(cfg: RunConfig, where: str = "the config", load: bool = True) -> Facts:
    """``config_problems`` as one RunError listing them all (the CLI exits 2 with it)."""
    problems, facts = config_problems(cfg, load)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise RunError(f"{where} has {len(problems)} problem(s); nothing was started or written:\n{lines}")
    return facts


# ------------------------------------------------------------------------------------ plan


def unet_passes(cfg: RunConfig) -> dict[str, int]:
    """Sample-passes of the UNet (one sample through the UNet at one step) per stage of the
    pipeline, as each stage declares them (``Stage.cost``)."""
    from hspace.tasks.stages import pipeline_stages, registry

    stages = registry()
    return {name: stages[name].cost(cfg) if stages[name].cost else 0 for name in pipeline_stages()}


def check_disk(cfg: RunConfig, out, facts: Facts) -> dict:
    """`hspace run` before any work: the bytes of the stages that would run (the plan's)
    against the free space of OUT's file system; RunError (one line) when they do not fit."""
    plan = make_plan(cfg, out, facts, probe=False)
    stages = ", ".join(s["stage"] for s in plan["stages"] if s["state"] == "run")
    require_space(out, plan["disk_needed"], f"this run ({stages})")
    return plan


def probe_seconds(facts: Facts, cfg: RunConfig, batch: int = 16, repeats: int = 3) -> float:
    """Seconds per sample-pass of the UNet on the chosen device and dtype (a short timed probe)."""
    import torch

    dtype = getattr(torch, cfg.sample.dtype)
    unet = facts.unet.to(facts.device)
    batch = min(batch, cfg.sample.batch_size)
    from hspace.hcore.conditioning import unet_output

    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size).to(facts.device, dtype)
    cond = facts.conditioning  # SD: the guided pass of the sampler (2 U-Net rows per sample)
    with torch.no_grad():
        unet_output(unet, x, 500, cond)  # warm-up (kernels, allocations)
        if facts.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            unet_output(unet, x, 500, cond)
        if facts.device.startswith("cuda"):
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (repeats * batch)


def make_plan(cfg: RunConfig, out, facts: Facts, probe: bool = True) -> dict:
    """What `hspace run --config cfg --out OUT` would do (nothing is written)."""
    from hspace.tasks.stages import creating_stage, pipeline_stages, registry, stage_key

    run = RunFolder(out)
    record = None
    if run.exists():
        try:
            record = run.record()
        except RunError:
            record = None
    states: dict[str, str] = {}
    for name in pipeline_stages():
        stage = registry()[name]
        if record is None or record.config.get("n") != cfg.sample.n:
            states[name] = "run"
            continue
        stages = record.stage_dicts()
        key = stage_key(stage, cfg, stages, record.model.fingerprint)
        fresh = stage.is_fresh(run, stages.get(name, {}), key) and all(states.get(i) != "run" for i in stage.inputs)
        states[name] = "skip (cached)" if fresh else "run"
    passes = unet_passes(cfg)
    seconds = probe_seconds(facts, cfg) if probe else None
    n, steps = cfg.sample.n, cfg.sample.steps
    c = facts.unet.config if facts.unet is not None else None
    latent = c and (c.in_channels, c.sample_size, c.sample_size)
    needs = disk_needs(cfg, facts.h_shape, facts.image_shape, latent, facts.point_shapes)
    disk = {label: b for label, (_, b) in needs.items()}
    sampling = creating_stage().name  # the stage that makes samples.zarr
    left = pending_sample_bytes(run) if states.get(sampling) == "run" else None
    if left is not None:  # resuming: only the unfinished shards
        needs = {k: v for k, v in needs.items() if v[0] != sampling} | {"unfinished shards": (sampling, left)}
    needed = sum(b for stage, b in needs.values() if states.get(stage) == "run")
    stages = [
        {
            "stage": name,
            "state": states[name],
            "unet_passes": passes[name] if states[name] == "run" else 0,
            "seconds": None if seconds is None or states[name] != "run" else passes[name] * seconds,
        }
        for name in pipeline_stages()
    ]
    return {
        "out": str(out),
        "model": cfg.sample.model,
        "device": facts.device,
        "dtype": cfg.sample.dtype,
        "h_shape": list(facts.h_shape),
        "samples": n,
        "steps": steps,
        "seconds_per_sample_pass": seconds,
        "stages": stages,
        "disk_bytes": disk,
        "disk_needed": needed,  # by the stages that would run
        "total_seconds": None if seconds is None else sum(s["seconds"] or 0 for s in stages),
    }
