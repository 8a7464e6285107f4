"""RUN/eval/ (the catalog's): Table-1 tables, heatmaps, PC names and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Table 1's variants, in the order they are shown: the directions as built, projected by eq.
# (11) with the norm kept (the default), and eq. (11) as written (no rescaling)
TABLES = ("original", "disentangled", "as_written")


def table_title(label: str, summary: dict) -> str:
    """How a table is named on screen; ``disentangled`` is eq. (11) as written itself when
    the evaluation ran with keep_norm off."""
    if label == "disentangled":
        return "eq. (11), norm kept" if summary.get("keep_norm", True) else "eq. (11) as written"
    return {"original": "original", "as_written": "eq. (11) as written"}[label]


def leakage_change(summary: dict, label: str = "disentangled") -> dict | None:
    """How a projected table compares with the original one in summary.json: mean
    |off-diagonal| before and after, its relative change, and the share of the mean
    |diagonal| kept; None where either table or a mean is missing (or zero)."""
    before, after = summary.get("original") or {}, summary.get(label) or {}
    off, diag = before.get("mean_offdiagonal"), before.get("mean_diagonal")
    off_after, diag_after = after.get("mean_offdiagonal"), after.get("mean_diagonal")
    rows = [d for d in after.get("per_direction_own") or {} if d in (before.get("per_direction_own") or {})]
    if rows and len(rows) < len(before.get("per_direction_own")):  # fewer rows projected (prompt pairs are not):
        pick = lambda table, key: [table[key][d] for d in rows if table[key][d] is not None]  # noqa: E731
        means = [
            sum(v) / len(v) if v else None
            for v in (
                pick(before, "per_direction"),
                pick(before, "per_direction_own"),
                pick(after, "per_direction"),
                pick(after, "per_direction_own"),
            )
        ]
        off, diag, off_after, diag_after = means  # the same directions before and after
    if off_after is None or diag_after is None or not off or not diag:
        return None
    return {"before": off, "after": off_after, "change": off_after / off - 1, "kept": diag_after / diag}


def leaked_more(summary: dict, tolerance: float = 0.0) -> list[dict]:
    """Directions that leak more after a projection than before (eq. (11) does not promise
    less leakage: projecting out correlated directions can move a direction towards other
    attributes): [{table, direction, before, after}] from summary.json's per-direction means."""
    before = (summary.get("original") or {}).get("per_direction") or {}
    worse = []
    for label in TABLES[1:]:
        after = (summary.get(label) or {}).get("per_direction") or {}
        for name, b in before.items():
            a = after.get(name)
            if a is not None and b is not None and a > b * (1 + tolerance):
                worse.append({"table": label, "direction": name, "before": b, "after": a})
    return worse


def calibration_misses(summary: dict) -> dict[str, dict]:
    """{direction: its calibration record} for every direction --gamma auto could not bring to
    its target (scored at its strongest gamma instead), from summary.json."""
    return {d: c for t in (summary.get("calibration") or {}).values() for d, c in t.items() if c.get("failed")}


class EvalFolder:
    """RUN/eval/: Table-1 tables (csv, md, heatmap png) per label, the PC names, and
    summary.json (what `hspace list` and the report read)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write_leakage(
        self, label: str, matrix: np.ndarray, rows: list[str], columns: list[str], degrees: tuple = ()
    ) -> list[Path]:
        """leakage_<label>.csv / .md / .png (rows: directions, columns: attributes)."""
        from hspace.data.figures import heatmap

        self.path.mkdir(parents=True, exist_ok=True)
        pairs = list(zip(rows, matrix, strict=True))
        csv = ["direction," + ",".join(columns)] + [f"{r}," + ",".join(f"{x:.6f}" for x in row) for r, row in pairs]
        md = "| direction | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
        md += "".join(f"| {r} | " + " | ".join(f"{x:+.3f}" for x in row) + " |\n" for r, row in pairs)
        paths = [self.path / f"leakage_{label}.{ext}" for ext in ("csv", "md", "png")]
        paths[0].write_text("\n".join(csv) + "\n")
        paths[1].write_text(md)
        heatmap(matrix, rows, columns, f"leakage ({label})", degrees).save(paths[2])
        return paths

    def leakage_csv(self, label: str) -> Path:
        return self.path / f"leakage_{label}.csv"

    def leakage(self, label: str) -> dict[str, dict[str, float]]:
        """A Table-1 matrix as written: {row (direction's attribute): {column: value}}; {} if absent."""
        path = self.leakage_csv(label)
        if not path.exists():
            return {}
        lines = path.read_text().splitlines()
        columns = lines[0].split(",")[1:]
        table = {}
        for line in lines[1:]:
            row, *values = line.split(",")
            table[row] = {c: float(v) for c, v in zip(columns, values, strict=True)}
        return table

    def write_naming(self, table: list[dict], names: list[str], gamma: float, stem: str = "pc_names") -> Path:
        """STEM.json and STEM.md: the attribute each direction moves most (`hspace name`
        writes pc_names, the figures stage figure_pc_names)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"{stem}.json").write_text(json.dumps({"gamma": gamma, "directions": table}, indent=2))
        head = "| direction | ≈ | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names) + "\n"
        rows = "".join(
            f"| {r['direction']} | {r['name']} | " + " | ".join(f"{r['changes'][n]:+.3f}" for n in names) + " |\n"
            for r in table
        )
        text = f"Mean change of each attribute between γ = -{gamma:g} and +{gamma:g} (halved)\n\n" + head + rows
        (self.path / f"{stem}.md").write_text(text)
        return self.path / f"{stem}.md"

    def naming(self, stem: str = "pc_names") -> dict | None:
        path = self.path / f"{stem}.json"
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def write_summary(self, summary: dict) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        self.summary_path.write_text(json.dumps(summary, indent=2))
        return self.summary_path

    def summary(self) -> dict | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            return None

    def write_text(self, name: str, text: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / name).write_text(text)
        return self.path / name
