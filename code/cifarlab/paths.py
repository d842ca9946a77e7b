"""The project root: the folder holding grid/ and log/, against which the package's default
folders (grid/, log/, report/, data/) resolve.

Jupyter starts a notebook's kernel in the notebook's own folder (notebooks/), a shell usually
sits in the root, a script may run anywhere below it: all of them must find the same log/.
``project_root()`` walks up from the working directory to the first folder holding both grid/
and log/; outside a checkout (a notebook copied next to an installed package) it is the working
directory. ``CIFARLAB_ROOT`` overrides the search.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_ROOT = "CIFARLAB_ROOT"
MARKERS = ("grid", "log")


def project_root(start: str | Path | None = None) -> Path:
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser().resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / m).is_dir() for m in MARKERS):
            return folder
    return here


def grid_dir() -> Path:
    return project_root() / "grid"


def log_dir() -> Path:
    return project_root() / "log"


def report_dir() -> Path:
    return project_root() / "report"


def data_dir() -> Path:
    return project_root() / "data"


def notebook_paths(log_root: str | Path | None = None, out: str | Path | None = None,
                   smoke: bool = False) -> tuple[Path, Path, Path]:
    """(root, log, img) for a notebook: the project root, where runs go (``log_root`` or
    <root>/log; SMOKE runs under <log>/smoke so they never mix with real ones) and where figures
    go (``out`` or <root>/report/img; <log>/smoke/img for SMOKE runs)."""
    root = project_root()
    log = Path(log_root).expanduser() if log_root else root / "log"
    if smoke:
        log = log / "smoke"
    img = Path(out).expanduser() if out else (log / "img" if smoke else root / "report" / "img")
    return root, log, img
