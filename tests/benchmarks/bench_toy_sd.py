"""toy-sd judged against the truth: the model's quality and the five studies of
SD-family directions, every number from the oracle.

    python tests/benchmarks/bench_toy_sd.py [--model toy-sd] [--run runs/toy-sd] [--n 512]
        [--write-quality] [--json docs/toy_sd_results.json]

1. Quality: VAE error on held-out renders; samples under the captions of held-out faces
   (the world's joint distribution of stated and unstated attributes) at guidance 1, 2, 4
   (default) and 7.5: prompt adherence, frequencies of unstated attributes, confidence; a
   linear probe of h_t per attribute. ``--write-quality`` stores them in the model's
   quality.json.
2. ``hspace run --config data/examples/toy_sd.yaml`` (timed; skipped when --run exists):
   eq. (10) directions from oracle annotations of the samples, eq. (11), prompt-pair
   directions, PCA names: its RUN/eval/summary.json and RUN/names.
3. Edit branch: every direction of the run at its calibrated gamma with the edit in both
   halves of the guided batch, in the conditional half only, in the unconditional only.
4. Transfer: the directions found under "a person" applied to held-out seeds drawn under
   other prompts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hspace.data.annotators import load_oracle  # noqa: E402
from hspace.data.toy import sd_quality as q  # noqa: E402

H_STEPS = (0, 5, 10, 19)
TRANSFER_PROMPTS = ["a person", "a man", "a young woman", "a old man wearing a hat", "a serious woman wearing glasses"]
ATTRS = ["Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Young"]


def quality(model, n: int, oracle) -> dict:
    unet, scheduler, text = q.load_toy_sd(model)
    out = {"vae": q.vae_quality(text.vae, oracle, n=1000)}
    print(
        f"VAE: PSNR {out['vae']['psnr_db']:.1f} dB, MSE {out['vae']['mse']:.5f}; oracle agreement render vs "
        "reconstruction " + ", ".join(f"{a} {out['vae'][f'agree_{a}']:.3f}" for a in ATTRS)
    )
    prompts, stated = q.heldout_captions(n)
    out["adherence_by_guidance"] = {}
    for s in (1.0, 2.0, 4.0, 7.5):
        text.guidance_scale = s
        t0 = time.time()
        got = q.caption_samples(unet, scheduler, text, oracle, prompts, h_steps=H_STEPS if s == 4.0 else ())
        a = q.adherence(got["scores"], got["names"], stated)
        out["adherence_by_guidance"][str(s)] = a
        print(
            f"guidance {s}: adherence {a['agree_mean']:.3f} ("
            + ", ".join(f"{k} {a[k]['agree']:.2f}" for k in ATTRS)
            + f", yaw {a['yaw']['agree']:.2f}), confidence {a['confidence']:.3f} [{time.time() - t0:.0f} s]"
        )
        if s == 4.0:
            out["adherence"] = a
            out["probe"] = q.probe(got["h"], got["scores"], got["names"], H_STEPS)
    for a in ATTRS:
        r = out["adherence"][a]
        print(
            f"  {a}: stated {r['stated']}, agree {r['agree']:.3f}; unstated freq {r['open_freq']:.3f} "
            f"(world {r['world_freq']:.3f}); probe "
            + ", ".join(f"{k} {v:.2f}" for k, v in out["probe"][a].items() if v is not None)
        )
    return out


def run_example(run: Path) -> float | None:
    if (run / "eval" / "summary.json").exists():
        return None
    t0 = time.time()
    cmd = [
        str(Path(sys.executable).parent / "hspace"),
        "run",
        "--config",
        str(ROOT / "data/examples/toy_sd.yaml"),
        "--out",
        str(run),
    ]
    subprocess.run(cmd, check=True)
    return time.time() - t0


def table(unet, scheduler, text, oracle, cfg, indices, vectors, gammas, rows) -> dict:
    from hspace.data.models import replay_for_run
    from hspace.hcore import metrics

    replay = replay_for_run({"config": cfg}, text)
    m = metrics.leakage_matrix(unet, scheduler, oracle, replay, indices, vectors, gammas)
    cols = list(oracle.names)
    keep = set(ATTRS)
    out = {}
    for i, r in enumerate(rows):
        own = float(m[i, cols.index(r)])
        leak = float(np.mean([abs(m[i, j]) for j, c in enumerate(cols) if c in keep and c != r]))
        out[r] = {"own": own, "leak": leak}
    return out


def studies(run: Path, oracle) -> dict:
    from hspace.data import directions as dirfile
    from hspace.data import models
    from hspace.data.catalog import RunFolder
    from hspace.data.eval_folder import EvalFolder

    rf = RunFolder(run)
    meta = rf.read()
    cfg = meta["config"]
    summary = EvalFolder(rf.eval).summary()
    unet, scheduler = models.load_for_run(meta)
    text = models.text_for_run(meta)
    names = summary["directions"]
    loaded = dirfile.load_run_directions(rf, meta, names, unet, scheduler)
    vectors = [v for v, _ in loaded]
    rows = [md["attribute"] for _, md in loaded]
    gammas = [summary["original"]["gamma"][d] for d in names]
    start = summary["held_out_from"]
    indices = list(range(start, start + 32))
    out: dict = {"run_summary": summary}
    out["branch"] = {}
    for branch in ("both", "cond", "uncond"):
        text.edit_branch = branch
        out["branch"][branch] = {}
        for d, r, v, g in zip(names, rows, vectors, gammas, strict=True):
            out["branch"][branch][d] = table(unet, scheduler, text, oracle, cfg, indices, [v], [g], [r])[r]
        print(
            f"edit branch {branch}: "
            + ", ".join(f"{d} {x['own']:+.2f}/{x['leak']:.3f}" for d, x in out["branch"][branch].items())
        )
    text.edit_branch = cfg.get("edit_branch", "both")
    out["transfer"] = {}
    for p in TRANSFER_PROMPTS:
        text.prompts = [p]
        text._cache.clear()
        out["transfer"][p] = {}
        for d, r, v, g in zip(names, rows, vectors, gammas, strict=True):
            out["transfer"][p][d] = table(unet, scheduler, text, oracle, cfg, indices, [v], [g], [r])[r]
        print(
            f"under {p!r}: " + ", ".join(f"{d} {x['own']:+.2f}/{x['leak']:.3f}" for d, x in out["transfer"][p].items())
        )
    for stem in ("pc_names", "figure_pc_names"):
        if (rf.eval / f"{stem}.json").exists():
            out["pca_names"] = json.loads((rf.eval / f"{stem}.json").read_text())
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a toy-sd folder (default: the shipped one)")
    ap.add_argument("--run", default="runs/toy-sd")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--write-quality", action="store_true")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--json", default="docs/toy_sd_results.json")
    args = ap.parse_args()
    oracle = load_oracle()
    results: dict = {}
    if not args.skip_quality:
        results["quality"] = quality(args.model, args.n, oracle)
        if args.write_quality:
            from hspace.data.models import TOY_SD_MODEL_DIR

            folder = Path(args.model) if args.model else TOY_SD_MODEL_DIR
            keep = {k: results["quality"][k] for k in ("vae", "adherence", "probe")}
            keep["measured"] = "bench_toy_sd.py, 2-core CPU, " + time.strftime("%Y-%m-%d")
            (folder / "quality.json").write_text(json.dumps(keep, indent=2))
    if args.quality_only:
        Path(args.json).with_suffix(".quality.json").write_text(json.dumps(results, indent=2, default=float))
        return
    run = Path(args.run)
    seconds = run_example(run)
    if seconds is not None:
        print(f"hspace run --config data/examples/toy_sd.yaml: {seconds:.0f} s")
        results["example_seconds"] = seconds
    results["studies"] = studies(run, oracle)
    Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
