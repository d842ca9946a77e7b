"""Every notebook in notebooks/ is thin, stored without outputs, and runs headless with SMOKE=True.

Papermill executes each one with the parameters SMOKE=True, LOG_ROOT and OUT pointing into a
temporary folder (so nothing lands in the repository's log/ or report/), from the repository
root, on the kernel "python3" — jupyter_client starts a kernelspec whose argv is "python" with
the interpreter running these tests, i.e. the project's venv.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


# Where these notebooks write when SMOKE is off; in SMOKE mode nothing may appear there. (Only
# these paths are watched: other people's runs may be writing elsewhere under log/ meanwhile.)
WATCHED = ("log/notebook", "log/notebook-smoke", "log/smoke", "log/modification-50ep",
           "report/README.md", "report/img", "report/runs")


def _snapshot() -> dict:
    files = {}
    for rel in WATCHED:
        root = REPO / rel
        for p in ([root] if root.is_file() else root.rglob("*") if root.is_dir() else []):
            if p.is_file():
                files[p] = p.stat().st_mtime_ns
    return files


def _code_cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_cifar_training.ipynb", "02_modifications.ipynb", "03_grad_cam.ipynb", "08_report.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_with_a_parameters_cell(path):
    cells = _code_cells(path)
    assert cells, "no code cells"
    first = cells[0]
    assert "parameters" in first.get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"
    assert "SMOKE" in "".join(first["source"]), "the parameters cell must define SMOKE"
    for cell in cells:
        assert not cell.get("outputs") and cell.get("execution_count") is None, "store notebooks without outputs"
    assert "import cifarlab" in path.read_text() or "from cifarlab" in path.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    # the kernel inherits this environment: headless plotting, one thread per process
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    log_root, out = tmp_path / "log", tmp_path / "out"
    before = _snapshot()
    papermill.execute_notebook(
        str(path), str(tmp_path / path.name),
        parameters={"SMOKE": True, "LOG_ROOT": str(log_root), "OUT": str(out)},
        kernel_name="python3", cwd=str(REPO), progress_bar=False, execution_timeout=240,
    )
    assert _snapshot() == before, "a notebook in SMOKE mode wrote into the repository's log/ or report/"
