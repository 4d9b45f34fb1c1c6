"""Every notebook executes clean on small settings (SCLIP_NB_STEPS) and matches its source."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_clean(path, tmp_path, synthetic_root, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), (
        f"{path.name} is stored with outputs: clear them (jupytext --sync)"
    )
    paired = jupytext.read(path.with_suffix(".py"))
    code = lambda n: [c.source for c in n.cells if c.cell_type == "code"]  # noqa: E731
    assert code(paired) == code(nb), f"{path.name} and its .py differ: run jupytext --sync"
    monkeypatch.setenv("SCLIP_NB_STEPS", "6")
    monkeypatch.setenv("SCLIP_NB_OUT", str(tmp_path / "out"))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "each notebook draws at least one plot"
