"""The experiment grid: run lines of grid/<group>.txt into log/<group>/<run>/, skipping
finished runs and resuming unfinished ones. One function for the notebooks, train.sh (through
``python -m cifarlab grid``) and the tests.

A grid line is ``<run-name> <command> <args...>`` (``#`` starts a comment line), where
<command> is a cifarlab subcommand that trains into ``--run-dir`` (train, slbi, bn).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.paths import grid_dir as default_grid_dir
from cifarlab.paths import log_dir as default_log_dir


@dataclass
class GridRun:
    group: str
    name: str
    command: str
    args: list[str]
    run_dir: Path
    flags: list[str] = field(default_factory=list)  # overrides appended to every line

    @property
    def status(self) -> str:
        """"finished", "resume" (a run directory with a config) or "new"."""
        summary = self.run_dir / "summary.json"
        if summary.is_file():
            try:
                if json.loads(summary.read_text()).get("finished"):
                    return "finished"
            except json.JSONDecodeError:
                pass
        return "resume" if (self.run_dir / "config.yaml").is_file() else "new"

    def argv(self) -> list[str]:
        """The CLI arguments of this run (without ``python -m cifarlab``)."""
        out = [self.command, *self.args, "--run-dir", str(self.run_dir), *self.flags]
        return out + ["--resume"] if self.status == "resume" else out

    def shell(self, python: str = "python") -> str:
        return f"{python} -m cifarlab " + shlex.join(self.argv())


def available_groups(grid_dir: str | Path | None = None) -> list[str]:
    folder = Path(grid_dir) if grid_dir else default_grid_dir()
    return sorted(p.stem for p in folder.glob("*.txt"))


def override_flags(overrides: dict[str, Any] | None) -> list[str]:
    """{"epochs": 2, "train_subset": 256, "progress": "off", "amp": None} -> CLI flags
    (True -> --flag, False -> --no-flag, None -> left out, lists -> comma-separated,
    dicts -> k=v,k=v)."""
    flags: list[str] = []
    for key, value in (overrides or {}).items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, dict):  # --model-kwargs depth=8,widen=2
            flags += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            flags += [flag, str(value)]
    return flags


def read_grid(group: str, grid_dir: str | Path | None = None, log_root: str | Path | None = None,
              only: Iterable[str] | None = None, overrides: dict[str, Any] | None = None,
              extra: str | Iterable[str] = ()) -> list[GridRun]:
    """The runs of grid/<group>.txt (``only``: these run names, in the file's order)."""
    folder = Path(grid_dir) if grid_dir else default_grid_dir()
    path = folder / f"{group}.txt"
    if not path.is_file():
        raise ConfigError(f"no grid file {path} (groups: {' '.join(available_groups(folder)) or 'none'})")
    log_root = Path(log_root) if log_root else default_log_dir()
    extra_flags = shlex.split(extra) if isinstance(extra, str) else list(extra)
    flags = override_flags(overrides) + extra_flags
    runs = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = shlex.split(raw)
        if len(parts) < 2:
            raise ConfigError(f"{path}:{lineno}: expected '<run-name> <command> <args...>', got {raw!r}")
        name, command, *args = parts
        runs.append(GridRun(group, name, command, args, log_root / group / name, flags))
    if only is not None:
        wanted = list(only)
        missing = [n for n in wanted if n not in {r.name for r in runs}]
        if missing:
            raise ConfigError(f"{path}: no run named {', '.join(missing)} "
                              f"(runs: {' '.join(r.name for r in runs)})")
        runs = [r for r in runs if r.name in wanted]
    return runs


@dataclass
class GridResult:
    run: GridRun
    status: str  # finished (skipped) | done | failed | planned
    returncode: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "done", "planned")


def run_grid(groups: str | Iterable[str] | None = None, *, only: Iterable[str] | None = None,
             overrides: dict[str, Any] | None = None, extra: str | Iterable[str] = (),
             gpus: Iterable[str | int] | None = None, dry_run: bool = False,
             grid_dir: str | Path | None = None, log_root: str | Path | None = None,
             echo: Callable[[str], None] | None = None, check: bool = False) -> list[GridResult]:
    """Run the grid's lines: finished runs are skipped, unfinished ones resumed (--resume).

    Without ``gpus`` the runs train one after another in this process (a notebook sees their
    progress bars and live plots); with ``gpus=["0", "1"]`` each GPU gets a queue of
    subprocesses (CUDA_VISIBLE_DEVICES=<id>, output in <run-dir>/stdout.txt), run in parallel.
    ``dry_run`` prints the commands only. A failed run is reported and the others still run;
    with ``check=True`` a CifarlabError naming the failed runs is raised at the end.
    """
    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    if groups is None:
        groups = available_groups(grid_dir)
    elif isinstance(groups, str):
        groups = groups.split()
    runs = [r for g in groups for r in read_grid(g, grid_dir, log_root, only, overrides, extra)]
    results: list[GridResult] = []
    todo: list[GridRun] = []
    for run in runs:
        if run.status == "finished":
            echo(f"skip (finished): {run.run_dir}")
            results.append(GridResult(run, "finished"))
        else:
            todo.append(run)
    if dry_run:
        for run in todo:
            print(run.shell(_python()))
        return results + [GridResult(r, "planned") for r in todo]
    gpu_list = [str(g) for g in (gpus or [])]
    if len(gpu_list) <= 1:
        env = {"CUDA_VISIBLE_DEVICES": gpu_list[0]} if gpu_list else None
        for run in todo:
            results.append(_run_one(run, echo, env, in_process=not gpu_list))
    else:
        results += _run_queues(todo, gpu_list, echo)
    failed = [r for r in results if not r.ok]
    if failed:
        message = f"{len(failed)} of {len(results)} runs failed: " + ", ".join(str(r.run.run_dir) for r in failed)
        if check:
            raise CifarlabError(message)
        echo(message)
    return results


def _python() -> str:
    return sys.executable or "python"


def _run_one(run: GridRun, echo, env: dict | None, in_process: bool) -> GridResult:
    echo(f"[{_now()}] {'GPU ' + env['CUDA_VISIBLE_DEVICES'] + ': ' if env else ''}{run.shell(_python())}")
    if in_process:
        from cifarlab.cli import main

        code = main(run.argv())
    else:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir / "stdout.txt", "a") as out:
            code = subprocess.call([_python(), "-m", "cifarlab", *run.argv()], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    if code != 0:
        echo(f"failed ({code}): {run.shell(_python())}")
    return GridResult(run, "done" if code == 0 else "failed", code)


def _run_queues(todo: list[GridRun], gpus: list[str], echo) -> list[GridResult]:
    """One queue per GPU (job i -> GPU i mod N); the queues run in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    def queue(i: int) -> list[GridResult]:
        return [_run_one(run, echo, {"CUDA_VISIBLE_DEVICES": gpus[i]}, in_process=False)
                for j, run in enumerate(todo) if j % len(gpus) == i]

    with ThreadPoolExecutor(len(gpus)) as pool:
        return [r for rs in pool.map(queue, range(len(gpus))) for r in rs]


def _now() -> str:
    import time

    return time.strftime("%H:%M:%S")
