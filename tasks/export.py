"""`hspace export RUN --directions A,B --out PACK/`: a run's directions as a shareable pack
(data/packs.py): the files, an index, a model card and a preview grid rendered by the model."""

from __future__ import annotations

from pathlib import Path

from hspace.data.catalog import RunError, RunFolder


def export_pack(run_dir: Path, names: list[str] | None, out: Path, device: str = "cpu") -> Path:
    """Write the pack of ``names`` (default: every direction of the run) into ``out``; every
    direction is checked against the run's model and schedule first, nothing is written for a
    refused one. Returns the index path."""
    import torch

    from hspace.data import models
    from hspace.data.directions import load_run_directions
    from hspace.data.eval_folder import EvalFolder
    from hspace.data.packs import PackFolder, model_card
    from hspace.data.stores import package_versions
    from hspace.tasks.edit import SampleSpec, render_edits
    from hspace.tasks.sample import run_model, run_text

    run = RunFolder(Path(run_dir))
    meta = run.read()
    have = [p.stem for p in run.direction_files("*")]
    names = names or have
    if not names:
        raise RunError(f"{run_dir} has no directions to export; run `hspace directions` or `hspace pca` first")
    unet, scheduler = run_model(meta)
    loaded = load_run_directions(run, meta, names, unet, scheduler)
    pack = PackFolder(Path(out))
    pack.prepare()
    summary = EvalFolder(run.eval).summary() or {}
    table = EvalFolder(run.eval).leakage("original")
    cfg = meta["config"]
    entries = {}
    for name, (_, md) in zip(names, loaded, strict=True):
        gamma = summary.get("original", {}).get("gamma", {}).get(name)
        row = table.get(name)
        entries[name] = {
            "file": pack.add(name, run.direction(name)).name,
            "method": md.get("method"),
            "source": md.get("source"),
            "scale_unit": md.get("scale_unit"),
            "gamma": gamma,
            "calibrated": name in summary.get("calibration", {}).get("original", {}),
            "table1": row,
            "own_change": None if row is None or name not in row else row[name],
            "leakage": summary.get("original", {}).get("per_direction", {}).get(name),
        }
    schedule = {k: cfg.get(k) for k in ("steps", "eta", "clip_sample", "h_point")}
    schedule |= {"scheduler": meta["model"]["scheduler"]}
    if "edit_branch" in cfg:
        schedule["edit_branch"] = cfg["edit_branch"]
    index = {
        "model": {k: meta["model"].get(k) for k in ("id", "revision", "fingerprint")},
        "schedule": schedule,
        "run": str(Path(run_dir).resolve()),
        "hspace_version": package_versions().get("hspace"),
        "directions": entries,
    }
    gammas = [float(entries[n]["gamma"] or 1.0) for n in names]
    cells = [[[(i, s * g)] for s in (-1.0, 0.0, 1.0)] for i, g in enumerate(gammas)]
    spec = SampleSpec(models.replay_for_run(meta, run_text(meta)), 0)
    with torch.no_grad():
        images = render_edits(unet, scheduler, spec, [v for v, _ in loaded], cells)
    from hspace.data.figures import grid_image, save_grid

    rows = [f"{n} (γ={g:.2g})" for n, g in zip(names, gammas, strict=True)]
    save_grid(pack.preview, grid_image(images, rows, ["-γ", "0", "+γ"], title=f"{models.model_kind(meta)} sample 0"))
    pack.write_readme(model_card(index))
    return pack.write_index(index)
