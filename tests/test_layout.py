"""Jupyter-first layout: the project root, the one grid runner, the run-directory lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.paths import project_root
from cifarlab.train.grid import override_flags, read_grid, run_grid

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "lenet5", "--dataset", "synthetic:1x28x28", "--train-subset", "64", "--test-subset", "32",
        "--batch-size", "32", "--progress", "off"]


# -- the project root ------------------------------------------------------------------------
def test_project_root_is_found_from_notebooks_and_below(monkeypatch):
    monkeypatch.delenv("CIFARLAB_ROOT", raising=False)
    assert project_root(REPO / "notebooks") == REPO
    assert project_root(REPO / "code" / "cifarlab" / "train") == REPO
    assert project_root(REPO) == REPO


def test_project_root_outside_a_checkout_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFARLAB_ROOT", raising=False)
    (tmp_path / "grid").mkdir()  # grid/ alone is not a project: log/ is missing
    assert project_root(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv("CIFARLAB_ROOT", str(tmp_path / "elsewhere"))
    assert project_root(REPO) == (tmp_path / "elsewhere").resolve()


def test_default_run_dir_and_data_root_resolve_against_the_root(tmp_path, monkeypatch):
    from cifarlab.config import make_config

    monkeypatch.delenv("CIFARLAB_ROOT", raising=False)
    monkeypatch.chdir(REPO / "notebooks")
    cfg = make_config(model="lenet5", experiment="x")
    assert cfg.resolved_run_dir() == REPO / "log" / "x" / "lenet5"


# -- the grid runner -------------------------------------------------------------------------
def _grid(tmp_path, text):
    grid = tmp_path / "grid"
    grid.mkdir(exist_ok=True)
    (grid / "g.txt").write_text(text)
    return grid


def test_override_flags():
    assert override_flags({"epochs": 2, "train_subset": None, "hflip": False, "cutout": True,
                           "lrs": [0.1, 0.01], "dataset": "fashion", "model_kwargs": {"depth": 8, "widen": 2}}) == [
        "--epochs", "2", "--no-hflip", "--cutout", "--lrs", "0.1,0.01", "--dataset", "fashion",
        "--model-kwargs", "depth=8,widen=2"]


def test_read_grid_selects_runs_and_reports_bad_names(tmp_path):
    grid = _grid(tmp_path, "# c\na train --model lenet5\n\nb train --model resnet20  # not a comment\n")
    runs = read_grid("g", grid, tmp_path / "log", only=["b"])
    assert [(r.name, r.command, r.run_dir) for r in runs] == [("b", "train", tmp_path / "log" / "g" / "b")]
    with pytest.raises(Exception, match="no run named zz"):
        read_grid("g", grid, tmp_path / "log", only=["zz"])
    with pytest.raises(Exception, match="no grid file .*groups: g"):
        read_grid("nope", grid, tmp_path / "log")


def test_run_grid_trains_skips_finished_and_resumes_unfinished(tmp_path, capsys):
    grid = _grid(tmp_path, "a train " + " ".join(TINY) + "\nb train " + " ".join(TINY) + "\n")
    log = tmp_path / "log"
    results = run_grid("g", grid_dir=grid, log_root=log, overrides={"epochs": 1})
    assert [r.status for r in results] == ["done", "done"]
    for name in "ab":
        assert json.loads((log / "g" / name / "summary.json").read_text())["finished"] is True
    # finished runs are skipped, not retrained (their files stay as they were)
    before = (log / "g" / "a" / "summary.json").stat().st_mtime_ns
    results = run_grid("g", grid_dir=grid, log_root=log, overrides={"epochs": 1})
    assert [r.status for r in results] == ["finished", "finished"]
    assert (log / "g" / "a" / "summary.json").stat().st_mtime_ns == before
    # an unfinished run (config written, no finished summary) is continued with --resume
    (log / "g" / "b" / "summary.json").unlink()
    runs = read_grid("g", grid, log)
    assert runs[1].status == "resume" and runs[1].argv()[-1] == "--resume"
    results = run_grid("g", grid_dir=grid, log_root=log, overrides={"epochs": 2})
    assert [r.status for r in results] == ["finished", "done"]
    summary = json.loads((log / "g" / "b" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["finished"]


def test_grid_command_dry_run_and_unknown_group(tmp_path, capsys):
    grid = _grid(tmp_path, "a train --model lenet5\n")
    assert main(["grid", "g", "--grid-dir", str(grid), "--log", str(tmp_path / "log"), "--dry-run",
                 "--epochs", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].endswith(f"train --model lenet5 --run-dir {tmp_path / 'log' / 'g' / 'a'} --epochs 3")
    assert main(["grid", "zz", "--grid-dir", str(grid)]) == 2
    assert capsys.readouterr().err.startswith("error: no grid file")


# -- the run-directory lock ------------------------------------------------------------------
HOLD = """
import sys, time
from cifarlab.train.rundir import RunDirectory
lock = RunDirectory(sys.argv[1]).lock()
lock.acquire()
print("locked", flush=True)
time.sleep(3600)  # killed by the test; long enough for a slow, loaded machine
"""


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cifarlab", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_run_directory_in_use_is_refused_and_untouched(tmp_path):
    run = tmp_path / "run"
    r = _cli("train", *TINY, "--epochs", "1", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    (run / "summary.json").unlink()  # make it an unfinished run that --resume could continue
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        for extra in ([], ["--resume"]):
            r = _cli("train", *TINY, "--epochs", "2", "--run-dir", str(run), *extra)
            assert r.returncode == 2
            assert r.stderr == f"error: {run} is in use by process {holder.pid}\n"
            assert _snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock file is still there, but it does not block --resume
    assert (run / ".lock").is_file()
    r = _cli("train", *TINY, "--epochs", "2", "--run-dir", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2
    assert not (run / ".lock").exists()  # released at the end of the run


def test_the_grid_runner_reports_a_run_in_use_and_goes_on(tmp_path):
    grid = _grid(tmp_path, "a train " + " ".join(TINY) + "\nb train " + " ".join(TINY) + "\n")
    log = tmp_path / "log"
    (log / "g" / "a").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(log / "g" / "a")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        results = run_grid("g", grid_dir=grid, log_root=log, overrides={"epochs": 1})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert [r.status for r in results] == ["failed", "done"]
    assert sorted(p.name for p in (log / "g" / "a").iterdir()) == [".lock"]


def test_run_grid_check_raises_after_running_the_others(tmp_path):
    from cifarlab.errors import CifarlabError

    grid = _grid(tmp_path, "bad train --model no_such_model\ngood train " + " ".join(TINY) + "\n")
    log = tmp_path / "log"
    with pytest.raises(CifarlabError, match=r"1 of 2 runs failed: .*bad"):
        run_grid("g", grid_dir=grid, log_root=log, overrides={"epochs": 1}, check=True)
    assert json.loads((log / "g" / "good" / "summary.json").read_text())["finished"]


# -- best.pt stays small enough for git --------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "slbi"])
def test_best_pt_keeps_optimizer_state_only_for_slbi(tmp_path, optimizer):
    """best.pt is for evaluation and analysis: Adam's moments (2x the model) stay in last.pt;
    SLBI's Gamma is optimizer state that W* needs, so an SLBI best.pt keeps it."""
    import torch

    run = tmp_path / optimizer
    assert main(["train", *TINY, "--epochs", "1", "--optimizer", optimizer, "--lr", "0.01",
                 "--run-dir", str(run)]) == 0
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["optimizer"]["state"], "last.pt must keep the optimizer state for --resume"
    if optimizer == "slbi":
        gammas = [s["gamma"] for s in best["optimizer"]["state"].values() if "gamma" in s]
        assert gammas and len(best["optimizer"]["state"]) == len(last["optimizer"]["state"])
    else:
        assert best["optimizer"] is None and best["scheduler"] is None
        assert (run / "checkpoints" / "best.pt").stat().st_size < 0.6 * (run / "checkpoints" / "last.pt").stat().st_size
    assert best["model"].keys() == last["model"].keys()
