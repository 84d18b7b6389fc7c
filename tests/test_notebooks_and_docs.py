"""The notebooks run top to bottom and the documentation builds without warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path) -> None:
    """Every notebook executes without an error (its own asserts included)."""
    notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert outputs, "a notebook that shows nothing"
    if path.name == "legality.ipynb":  # its matrices render as HTML tables
        assert any("text/html" in o.get("data", {}) for o in outputs)


def test_notebooks_exist() -> None:
    """There is at least one notebook to run."""
    assert NOTEBOOKS


def test_docs_build(tmp_path: Path) -> None:
    """Sphinx builds the docs with warnings as errors."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "-q",
            "-b",
            "html",
            str(ROOT / "docs"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpr-reboot" in (tmp_path / "fidelity.html").read_text(encoding="utf-8")
