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

from hspace._applying import DirectionMismatch, apply
from hspace._directions import Direction, load_direction
from hspace._reading import Run, open_run
from hspace._stages import run_pipeline, run_stage

__all__ = [
    "Direction",
    "DirectionMismatch",
    "Run",
    "apply",
    "load_direction",
    "open_run",
    "run_pipeline",
    "run_stage",
]
