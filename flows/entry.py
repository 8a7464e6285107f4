"""The `hspace` console script: a command goes to the warm worker where one runs and fits
(flows/warm_worker.py), else it runs in this process. Kept tiny: it decides before typer,
rich, torch or Prefect are imported."""

from __future__ import annotations

import os
import sys

from hspace.flows import apply_defaults

LOCAL = {"server", "schedule"}  # managing the worker, or serving for hours: always here


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--warm-worker"]:
        return warm_worker()
    apply_defaults()
    if argv and argv[0] not in LOCAL and not argv[0].startswith("-") and os.environ.get("HSPACE_NO_WORKER") != "1":
        from hspace.flows.warm_worker import run_remote

        code = run_remote(argv)
        if code is not None:
            sys.exit(code)
    from hspace.flows.cli import app

    app(prog_name="hspace")


def warm_worker() -> None:
    from pathlib import Path

    from hspace.flows import warm_worker as worker

    def preload() -> None:
        import diffusers  # noqa: F401
        import prefect.flow_engine  # noqa: F401
        import torch  # noqa: F401

        import hspace.flows.cli  # noqa: F401
        import hspace.flows.runner  # noqa: F401
        from hspace.tasks.stages import registry

        for stage in registry().values():  # every stage module and what it imports at the top
            stage.body  # noqa: B018

    def run(argv: list[str]) -> int:
        from hspace.flows.cli import app

        app(argv, prog_name="hspace")
        return 0

    apply_defaults()
    # CUDA must not be initialised before a fork: torch's availability check by NVML, not cuInit
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    worker.serve(preload, run, Path(worker.state_path()).with_name("hspace-worker.log"))


if __name__ == "__main__":
    main()
