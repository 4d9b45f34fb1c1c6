"""Result tables: Markdown, CSV and JSON writers, and a bar chart."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-Markdown table of ``rows`` (columns: union of keys, in first-seen order)."""
    if not rows:
        return "(no results)"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_results(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, stem: str = "results"
) -> dict[str, Path]:
    """Write ``rows`` as ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    paths["md"].write_text(markdown_table(rows, cols) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    paths["json"].write_text(json.dumps(list(rows), indent=2) + "\n", encoding="utf-8")
    return paths


def bar_chart(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    errors: Mapping[str, Sequence[float]] | None,
    path: str | Path,
    title: str = "",
    ylabel: str = "%",
) -> Path:
    """Grouped bar chart (one group per metric, one bar per method) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 2), 4), dpi=120)
    for i, (name, vals) in enumerate(series.items()):
        err = errors.get(name) if errors else None
        bars = ax.bar(
            x + (i - (len(series) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=name
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    top = max((max(v) for v in series.values() if len(v)), default=1.0)
    ax.set_ylim(0, top * (1.3 + 0.1 * len(series)))  # headroom for the legend above the bars
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_predictions(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write ``predict``'s rows (path, label_1, score_1, ...) as ``predictions.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return path
