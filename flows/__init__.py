"""The fronts: Prefect flows that wire the stages, the `hspace` CLI, the runner both the CLI
and ``import hspace`` call, and the scheduled runs."""

import os


def apply_defaults() -> None:
    """Defaults that make Prefect usable offline and quiet (a fresh server's database needs
    more than the default 20 s to start; no analytics), set before
    anything imports prefect; the user's environment wins. The CLI and the worker's client
    both apply them, so a worker started by one command fits the next."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
