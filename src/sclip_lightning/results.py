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
    """One panel per metric (``groups``), one horizontal bar per method, saved as PNG.

    Each panel has its own scale from 0, so a 5-point recall and an 80-point accuracy are
    both readable; the methods are named once, on the left, in the order given, and a dashed
    line marks the first method's value (the baseline) in every panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(series)
    y = np.arange(len(names))[::-1]  # first method on top
    colours = [f"C{i % 10}" for i in range(len(names))]
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(2.2 * len(groups) + 2.8, 0.42 * len(names) + 1.3),
        dpi=120,
        sharey=True,
        squeeze=False,
    )
    for j, (ax, group) in enumerate(zip(axes[0], groups, strict=True)):
        vals = [series[n][j] for n in names]
        err = [errors[n][j] for n in names] if errors else [0.0] * len(names)
        ax.barh(y, vals, xerr=err if errors else None, color=colours, capsize=2, height=0.7)
        top = max(v + e for v, e in zip(vals, err, strict=True))
        for yi, v, e in zip(y, vals, err, strict=True):
            ax.text(v + e + 0.02 * top, yi, f"{v:.1f}", va="center", fontsize=7)
        ax.axvline(vals[0], color="0.3", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, max(top, 1e-9) * 1.3)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, names, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
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
