"""Run a notebook the way Jupyter does, inside a throw-away copy of the project.

Jupyter starts a notebook's kernel in the notebook's own folder (notebooks/). Each run here copies
notebooks/ and grid/ into a temporary project with an empty log/, executes the notebook with
papermill (SMOKE=True and nothing else: the notebook must find the project root by itself) from
notebooks/ or from the root, and checks that nothing was written under notebooks/ and that no
SMOKE output reached report/. The real repository is never written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def make_project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    shutil.copytree(REPO / "notebooks", proj / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(REPO / "grid", proj / "grid")
    (proj / "log").mkdir()
    return proj


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def execute(path: Path, tmp_path: Path, monkeypatch, where: str) -> tuple[Path, dict]:
    """Execute notebook ``path`` (SMOKE=True) in a project copy; return (project, executed notebook)."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.delenv("CIFARLAB_ROOT", raising=False)
    proj = make_project(tmp_path)
    before = _tree(proj / "notebooks")
    out = tmp_path / f"executed-{path.name}"
    papermill.execute_notebook(str(proj / "notebooks" / path.name), str(out), parameters={"SMOKE": True},
                               kernel_name="python3", cwd=str(proj / "notebooks" if where == "notebooks" else proj),
                               progress_bar=False, execution_timeout=300)
    assert _tree(proj / "notebooks") == before, "the notebook wrote under notebooks/"
    assert not (proj / "report").exists(), "SMOKE output reached report/"
    return proj, json.loads(out.read_text())


def outputs_text(nb: dict) -> str:
    """All text the executed notebook showed (stream output and plain-text results)."""
    parts = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                parts.append("".join(o["text"]))
            elif "data" in o and "text/plain" in o["data"]:
                parts.append("".join(o["data"]["text/plain"]))
    return "\n".join(parts)


def summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["finished"] is True
    return s


def check_outputs(name: str, proj: Path, nb: dict) -> None:
    """At least one real output of each notebook: a table value, a figure file, a number in range."""
    smoke = proj / "log" / "smoke"
    img = smoke / "img"
    text = outputs_text(nb)
    if name == "01_cifar_training":
        s = summary(smoke / "cpu-fashion" / "lenet5")
        assert s["epochs_completed"] == 2 and 0.0 <= s["test_acc"] <= 1.0
        assert f"'test_acc': {s['test_acc']}" in text  # the summary cell shows the run's own figure
    elif name == "02_modifications":
        for run in ("baseline", "act-gelu", "loss-mse", "opt-adam"):
            summary(smoke / "modification-50ep" / run)
        for family in ("activation", "loss", "optimizer"):
            assert (img / f"modification-50ep-{family}.png").stat().st_size > 1000
    elif name == "03_grad_cam":
        assert (img / "grad-cam.png").stat().st_size > 1000
        assert (img / "insight" / "confusion.png").is_file()
        assert "ROAD (combined)" in text
    elif name == "04_batchnorm":
        s = summary(smoke / "bn" / "vgg_a_light-fashion")
        assert s["comparison"] and len(list((smoke / "bn" / "vgg_a_light-fashion").rglob("*.png"))) >= 6
        assert "vgg_a_light_bn vs vgg_a_light" in text  # the answers table was shown
    elif name == "05_dessilbi":
        for run in ("lenet5_slbi", "lenet5_sgd", "lenet5_slbi_lam12"):
            s = summary(smoke / "slbi" / run)
            assert 0.0 <= s["test_acc"] <= 1.0
        table = (smoke / "slbi" / "lenet5_slbi" / "prune_table.csv").read_text()
        assert "conv3" in table and "80" in table
        assert "lambda 12" in text
    elif name == "06_dropout":
        for run in ("b0-none", "b0-channel-0.1", "b2-path-0.1", "b2-layer-0.1"):
            summary(smoke / "dropout" / run)
        assert list(img.glob("*.png"))
    elif name == "07_edropout":
        s = summary(smoke / "edropout" / "edropout")
        assert 0.0 <= s["test_acc"] <= 1.0
        summary(smoke / "edropout" / "original")
        summary(smoke / "edropout" / "random50")
        assert (img / "edropout.png").is_file()
    elif name == "08_report":
        readme = (smoke / "report" / "README.md").read_text()
        assert "lenet5-gelu" in readme and "report-smoke" in readme
    else:
        raise AssertionError(f"no output check for notebook {name}: add one to tests/notebook_runner.py")
