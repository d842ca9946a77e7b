"""Build report/README.md from run directories: one table per experiment group, then sections.

A run directory is any folder under the log root holding summary.json, config.yaml or
metrics.csv (DESIGN.md's contract); its group is the folder above it relative to the log root
(log/all-200ep/resnet18 -> group "all-200ep"). Finished, unfinished and diverged runs are all
shown, so the report can be rebuilt while a grid is still running.

Each run's log.txt and curves.png are linked where they are (relative to README.md): those small
files of log/ are committed with the report (checkpoints are not).

Determinism: runs and groups are sorted by name, numbers have fixed formats, nothing depends
on the clock, and figures are written by curves.save_figure (no software metadata), so two
builds from the same logs give byte-identical files. This module reads files only; it never
imports the training code.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifarlab.errors import CifarlabError
from cifarlab.report.curves import as_percent, integer_epochs, plot_run_curves, read_metrics, save_figure
from cifarlab.report.registry import sections

RUN_MARKERS = ("summary.json", "config.yaml", "metrics.csv")
DASH = "—"


@dataclass
class Run:
    """What one run directory says about itself (any of the three files may be missing)."""

    path: Path
    group: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    # -- derived facts, each with a fallback for runs that have not finished ----------------
    @property
    def model(self) -> str:
        return str(self.summary.get("model") or self.config.get("model") or DASH)

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or self.config.get("dataset") or DASH)

    @property
    def finished(self) -> bool:
        return bool(self.summary.get("finished"))

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged"))

    @property
    def epochs_planned(self) -> int | None:
        v = self.summary.get("epochs", self.config.get("epochs"))
        return int(v) if isinstance(v, (int, float)) else None

    @property
    def epochs_done(self) -> int:
        v = self.summary.get("epochs_completed")
        if isinstance(v, (int, float)):
            return int(v)
        return len(self.metrics.get("epoch", []))

    @property
    def best_epoch_and_acc(self) -> tuple[int | None, float | None]:
        """(best epoch, best validation accuracy in %) from summary.json, else from metrics.csv."""
        if self.summary.get("best_epoch"):
            acc = self.summary.get("best_val_acc")
            return int(self.summary["best_epoch"]), (None if acc is None else as_percent([float(acc)])[0])
        acc = self.metrics.get("val_acc") or []
        finite = [(v, i) for i, v in enumerate(acc) if math.isfinite(v)]
        if not finite:
            return None, None
        best, idx = max(finite, key=lambda t: (t[0], -t[1]))  # first epoch reaching the maximum
        return int(self.metrics["epoch"][idx]), as_percent(acc)[idx]

    @property
    def wall_time_s(self) -> float | None:
        v = self.summary.get("wall_time_s")
        if isinstance(v, (int, float)):
            return float(v)
        times = [t for t in self.metrics.get("epoch_time_s", []) if math.isfinite(t)]
        return sum(times) if times else None

    @property
    def status(self) -> str:
        if self.diverged:
            return f"**diverged** (epoch {self.epochs_done + 1})"
        if self.finished:
            return "finished"
        planned = self.epochs_planned
        return f"unfinished ({self.epochs_done}/{planned if planned is not None else '?'} ep)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a half-written or foreign file: treat the run as having no summary
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(path: str | Path, log_root: str | Path | None = None) -> Run:
    path = Path(path)
    root = Path(log_root) if log_root is not None else path.parent
    rel_parent = Path(os.path.relpath(path.resolve().parent, root.resolve())).as_posix()
    if path.resolve() == root.resolve():  # the log root is itself a run directory
        group = root.resolve().parent.name
    elif rel_parent == os.curdir:  # runs directly under the log root: the root names the group
        group = root.resolve().name
    else:
        group = rel_parent
    run = Run(path=path, group=group, name=path.name)
    if (path / "config.yaml").is_file():
        run.config = _read_yaml(path / "config.yaml")
    if (path / "summary.json").is_file():
        run.summary = _read_json(path / "summary.json")
    if (path / "metrics.csv").is_file():
        try:
            run.metrics = read_metrics(path / "metrics.csv")
        except (OSError, ValueError):
            run.metrics = {}
    return run


def find_runs(log_root: str | Path, group: str | None = None) -> list[Run]:
    """Every run directory under ``log_root`` (optionally one group), sorted by (group, name).

    A run's own sub-folders (checkpoints/, tensorboard/) are not searched."""
    root = Path(log_root)
    if not root.is_dir():
        return []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(m in filenames for m in RUN_MARKERS):
            found.append(Path(dirpath))
            dirnames[:] = []  # a run directory's children are not runs
    runs = [load_run(p, root) for p in found]
    if group is not None:
        runs = [r for r in runs if r.group == group]
    return sorted(runs, key=lambda r: (r.group, r.name))


# -- formatting: fixed formats so that rebuilding gives the same bytes ------------------------
def fmt_count(n, unit: str = "") -> str:
    """11173962 -> '11.17M'; 285162 -> '0.29M'; 5322 -> '5.3K'; None -> dash."""
    if not isinstance(n, (int, float)) or (isinstance(n, float) and not math.isfinite(n)):
        return DASH
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    if n >= 1e5:
        return f"{n / 1e6:.2f}M{unit}"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K{unit}"
    return f"{int(n)}{unit}"


def fmt_float(v, digits: int = 2) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return DASH
    return f"{v:.{digits}f}"


def fmt_duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return DASH
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def markdown_table(df) -> str:
    """A pandas DataFrame as a GitHub markdown table (pandas' to_markdown needs tabulate)."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [cell(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join([" --- "] * len(cols)) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _link(label: str, target: Path | None, out_dir: Path) -> str:
    if target is None or not target.is_file():
        return DASH
    return f"[{label}]({Path(os.path.relpath(target, out_dir)).as_posix()})"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "runs"


# -- the per-group table --------------------------------------------------------------------
def run_files(run: Run, img_dir: Path) -> dict[str, Path | None]:
    """The run's log.txt and curves.png (committed with log/, DESIGN.md); a run that has
    metrics but no curves.png yet gets one plotted into img_dir instead."""
    log = run.path / "log.txt"
    curves = run.path / "curves.png"
    if not curves.is_file() and run.metrics.get("epoch"):
        curves = plot_run_curves(run.path, out=img_dir / f"curves-{slug(run.group)}-{slug(run.name)}.png")
    return {"log": log if log.is_file() else None,
            "curves": curves if curves is not None and curves.is_file() else None}


def group_table(runs: list[Run], out_dir: Path, links: dict[str, dict[str, Path | None]] | None = None):
    """One row per run: the seed's table (architecture, #params, error %, process) plus FLOPs,
    best epoch, wall time and the run's state; a hardware column when the group's runs ran on
    different machines (the caption lists them, the column says which run ran where)."""
    import pandas as pd

    machines = {_hardware(r) for r in runs} - {None}
    rows = []
    for run in runs:
        best_epoch, best_val = run.best_epoch_and_acc
        planned = run.epochs_planned
        files = (links or {}).get(str(run.path), {})
        rows.append({
            "run": run.name,
            "architecture": run.model,
            "#params": fmt_count(run.summary.get("params")),
            "FLOPs": fmt_count(run.summary.get("flops")),
            "error (%)": fmt_float(run.summary.get("test_error")),
            "best val acc (%)": fmt_float(best_val),
            "best epoch": DASH if best_epoch is None else str(best_epoch),
            "epochs": f"{run.epochs_done}/{planned if planned is not None else '?'}",
            "wall time": fmt_duration(run.wall_time_s),
            **({"hardware": _hardware(run) or DASH} if len(machines) > 1 else {}),
            "status": run.status,
            "log": _link("log", files.get("log"), out_dir),
            "curves": _link("img", files.get("curves"), out_dir),
        })
    return pd.DataFrame(rows)


def _hardware(run: Run) -> str | None:
    """The machine a run's summary names (runs from before summary.json had "hardware": its device)."""
    return run.summary.get("hardware") or run.summary.get("device") or None


def _distinct(values) -> str:
    """The distinct values, numbers in numeric order ("50, 200"; "5,000, 50,000"), then text."""
    def key(v: str):
        try:
            return (0, float(v.replace(",", "")), v)
        except ValueError:
            return (1, 0.0, v)

    vals = sorted({str(v) for v in values if v not in (None, "", DASH)}, key=key)
    return ", ".join(vals) if vals else DASH


def group_caption(runs: list[Run]) -> str:
    """The labels a reader needs: dataset, epochs, training-set size, hardware (runs from before
    summary.json recorded it show their device; the group's NOTES.md names the machine)."""
    subsets = []
    for r in runs:
        n = r.summary.get("train_images") or r.config.get("train_subset")
        subsets.append(f"{int(n):,}" if isinstance(n, (int, float)) else None)
    return (f"dataset: {_distinct(r.dataset for r in runs)} · "
            f"epochs planned: {_distinct(r.epochs_planned for r in runs)} · "
            f"training images: {_distinct(subsets)} · "
            f"hardware: {_distinct(_hardware(r) for r in runs)}")


def group_figure(runs: list[Run], path: Path) -> Path | None:
    """Validation accuracy per epoch of every run of a group, on one axis."""
    from matplotlib.figure import Figure

    curves = [(r.name, r.metrics["epoch"], as_percent(r.metrics["val_acc"]))
              for r in runs if r.metrics.get("epoch") and r.metrics.get("val_acc")]
    curves = [c for c in curves if any(math.isfinite(v) for v in c[2])]
    if not curves:
        return None
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for name, epochs, acc in curves:
        ax.plot(epochs, acc, label=name, marker="." if len(epochs) < 20 else None)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)")
    integer_epochs(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def render_group(group: str, runs: list[Run], out_dir: Path, img_dir: Path) -> str:
    links = {str(r.path): run_files(r, img_dir) for r in runs}
    parts = [f"## Runs: {group}", "", group_caption(runs), ""]
    notes = runs[0].path.parent / "NOTES.md"  # a group's own description, e.g. the exact command
    if notes.is_file():
        parts += [notes.read_text().strip(), ""]
    parts += [markdown_table(group_table(runs, out_dir, links)), ""]
    fig = group_figure(runs, img_dir / f"runs-{slug(group)}.png")
    if fig is not None:
        parts += [f"![validation accuracy, {group}]({Path(os.path.relpath(fig, out_dir)).as_posix()})", ""]
    return "\n".join(parts)


def build_report(log_root: str | Path = "log", out_dir: str | Path = "report") -> Path:
    """Write <out_dir>/README.md (and figures in img/) from the run directories under ``log_root``."""
    log_root, out_dir = Path(log_root), Path(out_dir)
    runs = find_runs(log_root)
    if not runs:
        raise CifarlabError(f"no run directories under {log_root} (a run directory holds "
                            f"summary.json, config.yaml or metrics.csv)")
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    src = Path(os.path.relpath(log_root.resolve(), out_dir.resolve().parent)).as_posix()
    parts = ["# Results", "",
             f"Generated from the run directories under `{src}/` by "
             f"`python -m cifarlab report --log {src} --out {out_dir.name}` — do not edit by hand. "
             "Error is the test error of the best-validation checkpoint; unfinished runs show "
             "epochs done / planned.", ""]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    for group in sorted(groups):
        parts.append(render_group(group, groups[group], out_dir, img_dir))
    for _order, title, fn in sections():
        md = fn(log_root, img_dir)
        if md:
            parts += [f"## {title}", "", md.strip(), ""]
    readme = out_dir / "README.md"
    from cifarlab.utils import atomic_write_text

    atomic_write_text(readme, "\n".join(parts).rstrip() + "\n")
    return readme
