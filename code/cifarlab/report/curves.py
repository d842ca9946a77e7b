"""A run's curves.png from its metrics.csv: loss and accuracy, train vs validation.

The Trainer calls ``plot_run_curves(run_dir)`` after every epoch, so this stays cheap: no
pyplot (no global figure state, safe in any thread or backend), one small Agg figure, and
metrics.csv read with the csv module rather than pandas. Output is byte-stable: PNG metadata
carries no software version, so re-plotting the same metrics gives the same file.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

# PNG text chunks: matplotlib writes "Software: matplotlib version ..." by default; dropping it
# makes the bytes depend on the data only (no timestamp is written for PNG).
PNG_METADATA = {"Software": None}


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """metrics.csv -> {column: [floats]}; empty or non-numeric cells become NaN."""
    cols: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key is None:
                    continue
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    v = math.nan
                cols.setdefault(key, []).append(v)
    return cols


def as_percent(values: list[float]) -> list[float]:
    """Accuracies to percent. Fractions (all finite values <= 1) are scaled by 100, so curves
    read the same whether a run logged 0.93 or 93.0."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and max(finite) <= 1.0:
        return [v * 100.0 for v in values]
    return list(values)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a figure atomically and deterministically (fixed dpi, no software metadata)."""
    from cifarlab.utils import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def integer_epochs(ax) -> None:
    """Epoch axes get whole-number ticks (no 2.5 epochs)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(metrics: dict[str, list[float]], path: str | Path, title: str | None = None) -> Path:
    """Two panels: loss (train, val) and accuracy % (train, val) against epoch, saved to ``path``."""
    return save_figure(curves_figure(metrics, title), path)


def curves_figure(metrics: dict[str, list[float]], title: str | None = None):
    """The two-panel curves as a matplotlib Figure (the run's curves.png and the live plot)."""
    from matplotlib.figure import Figure

    epochs = metrics.get("epoch") or list(range(1, 1 + max((len(v) for v in metrics.values()), default=0)))
    fig = Figure(figsize=(8, 3.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split, style in (("train", "-"), ("val", "--")):
        loss = metrics.get(f"{split}_loss")
        if loss:
            ax_loss.plot(epochs[: len(loss)], loss, style, label=split, marker="." if len(loss) < 20 else None)
        acc = metrics.get(f"{split}_acc")
        if acc:
            ax_acc.plot(epochs[: len(acc)], as_percent(acc), style, label=split,
                        marker="." if len(acc) < 20 else None)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        integer_epochs(ax)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_run_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Plot <run_dir>/metrics.csv into <run_dir>/curves.png (or ``out``); None if no metrics yet."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        return None
    metrics = read_metrics(metrics_path)
    if not metrics.get("epoch"):
        return None
    return plot_curves(metrics, out or run_dir / "curves.png", title=run_dir.name)
