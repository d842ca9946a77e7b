"""The front doors: `python -m cifarlab` commands and train.sh's grid runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cifarlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("train", "models", "datasets", "report", "bench"):
        assert cmd in out


def test_train_help_shows_the_contract_flags():
    out = subprocess.run([sys.executable, "-m", "cifarlab", "train", "--help"], cwd=REPO,
                         capture_output=True, text=True).stdout
    for flag in ("--model", "--dataset", "--epochs", "--batch-size", "--lr", "--optimizer", "--scheduler",
                 "--loss", "--seed", "--data-root", "--train-subset", "--run-dir", "--config", "--resume",
                 "--net-type", "--depth", "--arg1", "--block-type", "--drop-type", "--drop-rate",
                 "--report-ratio", "--norm", "--tensorboard"):
        assert flag in out, flag


def test_models_and_datasets_commands(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"resnet18", "wrn28_10", "vgg_a_bn", "lenet5", "resnet20"} <= set(names)
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("cifar10", "cifar100", "fashion", "kmnist", "mnist", "svhn", "flowers102", "synthetic"):
        assert name in out


def test_unknown_command_is_one_error_line(capsys):
    assert main(["fly"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _grid(tmp_path, text):
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "g.txt").write_text(text)
    return grid


def run_train_sh(tmp_path, grid, **env):
    full = {**os.environ, "GRID_DIR": str(grid), "LOG": str(tmp_path / "log"), "GRID_GROUPS": "g", **env}
    return subprocess.run(["bash", str(REPO / "train.sh")], cwd=REPO, env=full, capture_output=True, text=True)


def test_train_sh_dry_run_skips_finished_and_resumes_unfinished(tmp_path):
    grid = _grid(tmp_path, "# a comment\na train --model lenet5\nb train --model resnet20\nc train --model vgg_a\n")
    log = tmp_path / "log" / "g"
    (log / "a").mkdir(parents=True)
    (log / "a" / "summary.json").write_text(json.dumps({"finished": True}))
    (log / "b").mkdir()
    (log / "b" / "config.yaml").write_text("model: resnet20\n")
    r = run_train_sh(tmp_path, grid, DRY_RUN="1", EPOCHS="3", DATASET="fashion")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "--model resnet20" in lines[0] and lines[0].endswith("--resume")
    assert f"--run-dir {log / 'b'}" in lines[0] and "--epochs 3" in lines[0] and "--dataset fashion" in lines[0]
    assert "--model vgg_a" in lines[1] and "--resume" not in lines[1]
    assert "skip (finished)" in r.stderr


def test_train_sh_unknown_group(tmp_path):
    grid = _grid(tmp_path, "a train --model lenet5\n")
    r = run_train_sh(tmp_path, grid, GRID_GROUPS="nope", DRY_RUN="1")
    assert r.returncode == 2 and r.stderr.startswith("error: no grid file")


def test_every_grid_line_parses_with_its_command():
    """Each line of the shipped grid must be accepted by the CLI parser (no typos in flags)."""
    from cifarlab.cli import build_parser

    parser = build_parser()
    for f in sorted((REPO / "grid").glob("*.txt")):
        for line in f.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            name, cmd, *args = line.split()
            parser.parse_args([cmd, *args, "--run-dir", f"/tmp/x/{name}"])


def test_train_sh_reads_groups_from_the_environment(tmp_path):
    """bash shadows GROUPS; train.sh still honours one passed in its environment (env GROUPS=...)."""
    grid = _grid(tmp_path, "a train --model lenet5\n")
    (grid / "other.txt").write_text("z train --model resnet20\n")
    env = {k: v for k, v in os.environ.items() if k != "GRID_GROUPS"}
    r = subprocess.run(["bash", str(REPO / "train.sh")], cwd=REPO, capture_output=True, text=True,
                       env={**env, "GRID_DIR": str(grid), "LOG": str(tmp_path / "log"), "GROUPS": "other",
                            "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert "--model resnet20" in r.stdout and "--model lenet5" not in r.stdout


def _bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "cifarlab", "bench", *args, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_bench_throughput_runs_both_loops_and_ends_with_the_ratio(tmp_path):
    proc = _bench(tmp_path, "throughput", "--model", "lenet5", "--steps", "2", "--repeats", "1",
                  "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio cifarlab/classic (train images/s): ") and last.endswith("x")
    (saved,) = tmp_path.glob("throughput-lenet5-cpu-*.json")
    r = json.loads(saved.read_text())
    assert r["ratio"] == r["cifarlab"]["train_images_per_s"] / r["classic"]["train_images_per_s"]
    assert f"{r['ratio']:.2f}x" in last
    # the classic loop ran on glibc's untouched heap, the Trainer with its own tuning
    assert r["classic"]["cpu_heap_tuned"] is False and r["cifarlab"]["cpu_heap_tuned"] is True


def test_bench_optimizer_times_every_optimizer_against_sgd(tmp_path):
    from cifarlab.config import OPTIMIZERS

    proc = _bench(tmp_path, "optimizer", "--model", "lenet5", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    (saved,) = tmp_path.glob("optimizer-lenet5-cpu-*.json")
    r = json.loads(saved.read_text())
    assert list(r["ms_per_step"]) == list(OPTIMIZERS)
    assert r["ratio_to_sgd"]["sgd"] == 1.0
    for name in OPTIMIZERS:
        assert r["ratio_to_sgd"][name] == r["ms_per_step"][name] / r["ms_per_step"]["sgd"]
        assert name in proc.stdout


def test_bench_bad_input_is_one_error_line(tmp_path):
    proc = _bench(tmp_path, "throughput", "--model", "lenet5", "--steps", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --steps must be positive, got 0"
    proc = _bench(tmp_path, "optimizer", "--model", "nonet")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown model 'nonet'")
    assert not list(tmp_path.iterdir())
