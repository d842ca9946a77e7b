"""Every notebook in notebooks/ is thin, stored without outputs, and runs headless with SMOKE=True
from notebooks/ - where Jupyter starts its kernel - writing nothing there (tests/notebook_runner.py).
test_notebooks_from_root.py runs them once more from the project root."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from notebook_runner import NOTEBOOKS, check_outputs, execute


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
    source = "".join("".join(c["source"]) for c in cells)
    assert "from cifarlab" in source
    # the course parts' Python APIs, not argv lists, and the project root found by the package
    assert "cli(" not in source and "import main as" not in source
    assert "notebook_paths(" in "".join(cells[1]["source"]), "the cell after the parameters must find the root"


def test_no_notebook_repeats_a_cell_of_another():
    seen: dict[str, str] = {}
    for path in NOTEBOOKS:
        for cell in _code_cells(path)[1:]:  # parameters cells legitimately share names
            src = "".join(cell["source"]).strip()
            if len(src.splitlines()) >= 3:
                assert src not in seen, f"{path.name} repeats a cell of {seen[src]}"
                seen[src] = path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_from_the_notebooks_folder(path, tmp_path, monkeypatch):
    proj, nb = execute(path, tmp_path, monkeypatch, where="notebooks")
    check_outputs(path.stem, proj, nb)
