"""Terminal views of catalog records for `hspace inspect` and `hspace list` (rich
tables). Read-only; no torch, no Prefect."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def human(nbytes: float | None) -> str:
    if nbytes is None:
        return "missing"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def table(title: str, columns: list[str], rows) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*[str(x) for x in row])
    return table


SHOWN = {"state", "key", "inputs", "seconds", "outputs", "output_bytes", "started", "updated"}


def show_run(report: dict, console: Console) -> None:
    """`hspace inspect`: model, config, lock, arrays, shards, stage records."""
    model = report["model"]
    console.print(
        f"[bold]run[/] {report['run']}   model [bold]{model.get('id')}[/] (sha256 "
        f"{model.get('fingerprint', '')[:12]}, revision {model.get('revision')})"
    )
    console.print("config: " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
    if report["lock"]:
        console.print(f"[yellow]locked[/] by pid {report['lock'].get('pid')} since {report['lock'].get('started')}")
    console.print(
        table(
            "arrays",
            ["store", "array", "shape", "dtype", "chunks", "shards", "on disk", "raw"],
            (
                (
                    a["store"],
                    a["name"],
                    tuple(a["shape"]),
                    a["dtype"],
                    tuple(a["chunks"]),
                    tuple(a["shards"]) if a["shards"] else "-",
                    human(a["bytes_on_disk"]),
                    human(a["bytes_raw"]),
                )
                for a in report["arrays"]
            ),
        )
    )
    for problem in report["errors"]:
        console.print(f"[red]{problem}[/]")
    s = report.get("shards", {})
    if "error" in s:
        console.print(f"[red]samples.zarr: {s['error']}[/]")
    elif s:
        pend = s["pending"]
        console.print(f"shards: {s['done']}/{s['total']} done" + (f", pending: {pend[:20]}" if pend else ""))
    console.print(
        table(
            "stages",
            ["stage", "state", "fingerprint", "inputs", "seconds", "outputs (on disk)", "details"],
            (
                (
                    name,
                    st.get("state", "?"),
                    st.get("key", ""),
                    ", ".join(st.get("inputs", [])),
                    st.get("seconds", ""),
                    ", ".join(f"{o} ({human(b)})" for o, b in list(st.get("output_bytes", {}).items())[:4]),
                    ", ".join(f"{k}={v}" for k, v in st.items() if k not in SHOWN)[:300],
                )
                for name, st in report["stages"].items()
            ),
        )
    )


def show_runs(entries: list[dict], root: Path, console: Console) -> None:
    """`hspace list`: one row per run folder, stage marks, headline leakage."""
    from hspace.tasks.stages import pipeline_stages

    if not entries:
        console.print(f"no run folders under {root}")
        return
    marks = {"done": "[green]✓[/]", "pending": "[dim]·[/]"}
    mark = lambda s: marks.get(s) or ("[red]✗[/]" if s.startswith("failed") else "[yellow]…[/]")  # noqa: E731

    def leak(lk: dict | None) -> str:
        if not lk or lk.get("offdiagonal") is None:
            return ""
        change = lk.get("disentangled")
        if not change:
            return f"{lk['offdiagonal']:.3g}"
        return f"{change['before']:.3g} -> {change['after']:.3g} ({change['change']:+.0%}, {change['kept']:.0%} kept)"

    console.print(
        table(
            "",
            ["run", "model", "created", "n x T", "state", "stages", "leakage"],
            (
                (
                    os.path.relpath(e["path"], root),
                    Path(str(e.get("model") or "")).name,
                    (e.get("created") or "")[:16],
                    f"{e.get('n') or ''} x {e.get('steps') or ''}",
                    e["state"],
                    "".join(mark(s) for s in e["stages"].values()),
                    leak(e.get("leakage")),
                )
                for e in entries
            ),
        )
    )
    console.print(
        "stages: " + " ".join(pipeline_stages()) + " (pipeline runs; single commands list their own) - "
        "✓ done, ✗ failed, … running, · pending; leakage: mean |off-diagonal| of Table 1, original -> "
        "disentangled (change, share of the diagonal kept). Per stage: --json"
    )


# ------------------------------------------------------------------------- log lines


class OneLine(logging.Formatter):
    """'warning: ...' on one line (no wrapping, no timestamp table)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def show_plan(plan: dict, console: Console) -> None:
    """`hspace run --plan`: stages run or skipped, UNet passes, disk, time estimate."""
    per = plan["seconds_per_sample_pass"]
    console.print(
        f"[bold]plan[/] for {plan['out']}: model {plan['model']} on {plan['device']} ({plan['dtype']}), "
        f"{plan['samples']:,} samples x {plan['steps']} steps, h = {'x'.join(map(str, plan['h_shape']))}"
        + (f"; probe: {per * 1000:.2f} ms per sample-pass of the UNet" if per is not None else "")
    )
    rows = [
        (s["stage"], s["state"], f"{s['unet_passes']:,}" if s["unet_passes"] else "-", duration(s["seconds"]))
        for s in plan["stages"]
    ]
    console.print(table("stages", ["stage", "would", "UNet sample-passes", "estimate"], rows))
    c, h, w = plan["h_shape"]
    h_bytes = plan["disk_bytes"]["h (samples.zarr)"]
    console.print(
        f"disk: h = {plan['samples']:,} x {plan['steps']} x {c}x{h}x{w} x 2 B = {h_bytes / 1e9:.3g} GB "
        f"({human(h_bytes)})"
        + "".join(f"; {k} {human(v)}" for k, v in plan["disk_bytes"].items() if not k.startswith("h "))
    )
    if plan["total_seconds"] is not None:
        console.print(
            f"time: about {duration(plan['total_seconds'])} of UNet passes (the probe's rate x the passes above; "
            "annotation, PCA and I/O come on top); nothing was written"
        )
