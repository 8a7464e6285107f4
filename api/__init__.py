"""hspace from Python: notebooks and your own scripts.

Open a run folder and read its arrays lazily (no Prefect starts), load direction files
(checked when they are applied, as on the command line), apply directions inside a plain
diffusers pipeline, and run a stage or the whole pipeline with a config object, through
the same runner as the ``hspace`` command::

    import hspace

    run = hspace.open_run("runs/pipeline")
    run.h                      # zarr array (n, T, C, H, W), read on indexing
    run.scores()               # {"Smiling": array (n,), ...}
    run.pca()                  # per-step components, explained variance, ...
    run.table1()               # the eval/ leakage tables as {direction: {attribute: value}}
    smile = run.direction("Smiling")          # or hspace.load_direction("PACK/Smiling")

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(...))
    with hspace.apply(pipe, smile, gamma=2.0):
        images = pipe(num_inference_steps=smile.steps, eta=1.0, generator=g).images

    hspace.run_stage("pca", "runs/pipeline", {"pca": {"components": 5}})
"""

# Every `hspace.X` import (the CLI's too) runs this file first: nothing heavy is imported
# here, each name loads its module on first use (PEP 562), so `hspace inspect` stays fast.
_WHERE = {
    "apply": "hspace._applying",
    "DirectionMismatch": "hspace._applying",
    "Direction": "hspace._directions",
    "load_direction": "hspace._directions",
    "Run": "hspace._reading",
    "open_run": "hspace._reading",
    "run_pipeline": "hspace._stages",
    "run_stage": "hspace._stages",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hspace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
