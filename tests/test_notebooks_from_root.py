"""The notebooks once more, executed from the project root (a shell's `jupyter nbconvert` or
papermill run from the root): same outputs, nothing under notebooks/ (tests/notebook_runner.py).
A separate file so pytest-xdist runs the two sets on different workers."""
from __future__ import annotations

import pytest

from notebook_runner import NOTEBOOKS, check_outputs, execute


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_from_the_project_root(path, tmp_path, monkeypatch):
    proj, nb = execute(path, tmp_path, monkeypatch, where="root")
    check_outputs(path.stem, proj, nb)
