"""Report section for EDropout (issue 8): the paper's table from run directories.

Runs live in log/edropout*/ (grid/edropout.txt). A run's role is read from its summary.json /
config.yaml, not from its name: EDropout search (``edropout_mode`` "search"), random-mask
baseline ("random", with its ``edropout_random_keep``), or the original network (EDropout off).
Rows are (dataset, model, epochs, training images): the paper's columns — original accuracy,
EDropout(F), EDropout(P), R — followed by the random-mask baselines at 25/50/75% of the units
kept (test accuracy of the masked network, its R in brackets). All accuracies are top-1 test
accuracy of the best-validation checkpoint. Reads files only; deterministic.
"""
from __future__ import annotations

import math
from pathlib import Path

from cifarlab.report.build import DASH, Run, find_runs, fmt_duration, fmt_float, markdown_table
from cifarlab.report.curves import as_percent, integer_epochs, save_figure
from cifarlab.report.registry import register_section

GROUP_PREFIX = "edropout"
RANDOM_KEEPS = (0.25, 0.5, 0.75)
# Salehinejad & Valaee, Fashion-MNIST (REFERENCE §4): original / F / P, R kept
PAPER_FASHION = [("resnet18", 93.87, 93.45, 93.57, 50.43), ("resnet34", 93.61, 92.80, 92.57, 46.94),
                 ("resnet50", 93.34, 92.91, 92.97, 45.14)]


def role(run: Run) -> tuple[str, float | None]:
    """("edropout" | "random" | "original", keep fraction for random)."""
    mode = run.summary.get("edropout_mode")
    keep = run.summary.get("edropout_random_keep", run.config.get("edropout_random_keep"))
    if mode is None:
        if not run.config.get("edropout"):
            return "original", None
        mode = "random" if keep is not None else "search"
    return ("random", float(keep)) if mode == "random" else ("edropout", None)


def pct(v) -> float | None:
    return 100.0 * float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def setting_key(run: Run) -> tuple:
    n = run.summary.get("train_images") or run.config.get("train_subset")
    return (run.dataset, run.model, run.epochs_planned or 0, int(n) if isinstance(n, (int, float)) else 0)


def paper_table(runs: list[Run]):
    import pandas as pd

    settings: dict[tuple, dict] = {}
    for run in runs:
        kind, keep = role(run)
        s = settings.setdefault(setting_key(run), {})
        if kind == "random":
            s[f"random{keep:g}"] = run
        else:
            s.setdefault(kind, run)
    rows = []
    for (dataset, model, epochs, n), s in sorted(settings.items()):
        e, o = s.get("edropout"), s.get("original")
        row = {"model": model, "dataset": dataset, "epochs": epochs, "train images": f"{n:,}" if n else DASH,
               "original": fmt_float(pct(o.summary.get("test_acc")) if o else None),
               "EDropout(F)": fmt_float(pct(e.summary.get("test_acc_F")) if e else None),
               "EDropout(P)": fmt_float(pct(e.summary.get("test_acc_P")) if e else None),
               "R (%)": fmt_float(e.summary.get("params_kept_pct") if e else None)}
        for keep in RANDOM_KEEPS:
            r = s.get(f"random{keep:g}")
            acc = fmt_float(pct(r.summary.get("test_acc")) if r else None)
            kept = r.summary.get("params_kept_pct") if r else None
            row[f"random {int(keep * 100)}%"] = acc if kept is None else f"{acc} ({kept:.1f})"
        rows.append(row)
    return pd.DataFrame(rows)


def detail_table(runs: list[Run]):
    import pandas as pd

    rows = []
    for run in runs:
        kind, keep = role(run)
        s = run.summary
        frozen = s.get("edropout_frozen_epoch")
        rows.append({
            "run": f"{run.group}/{run.name}", "role": kind if keep is None else f"random {keep:g}",
            "units kept (%)": fmt_float(s.get("units_kept_pct")),
            "R (%)": fmt_float(s.get("params_kept_pct")),
            "params (export)": f"{s['pruned_params']:,}" if isinstance(s.get("pruned_params"), int) else DASH,
            "test acc P": fmt_float(pct(s.get("test_acc_P", s.get("test_acc")))),
            "test acc F": fmt_float(pct(s.get("test_acc_F"))),
            "pruned export acc": fmt_float(pct(s.get("test_acc_pruned"))),
            "frozen at epoch": str(frozen) if frozen is not None else DASH,
            "wall time": fmt_duration(s.get("wall_time_s")),
            "device": str(s.get("device") or DASH),
        })
    return pd.DataFrame(rows)


def figure(runs: list[Run], path: Path) -> Path | None:
    """Validation accuracy per epoch: EDropout (P and F) against the original and the baselines;
    right: units kept by the EDropout state."""
    from matplotlib.figure import Figure

    runs = [r for r in runs if r.metrics.get("epoch") and r.metrics.get("val_acc")]
    if not runs:
        return None
    fig = Figure(figsize=(10, 3.6))
    ax, ax2 = fig.subplots(1, 2)
    for run in runs:
        kind, keep = role(run)
        label = f"{run.group}/{run.name}"
        ep = run.metrics["epoch"]
        if kind == "edropout":
            ax.plot(ep, as_percent(run.metrics["val_acc"]), label=f"{label} (P)", marker=".")
            if run.metrics.get("val_acc_F"):
                ax.plot(ep, as_percent(run.metrics["val_acc_F"]), label=f"{label} (F)", marker=".", ls="--")
            if run.metrics.get("units_kept_pct"):
                ax2.plot(ep, run.metrics["units_kept_pct"], label=f"{label}: units", marker=".")
            if run.metrics.get("params_kept_pct"):
                ax2.plot(ep, run.metrics["params_kept_pct"], label=f"{label}: R", marker=".", ls="--")
        else:
            ax.plot(ep, as_percent(run.metrics["val_acc"]), label=label, marker=".", alpha=0.7)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy")
    ax2.set(xlabel="epoch", ylabel="% kept", title="EDropout state: units and parameters kept")
    for a in (ax, ax2):
        integer_epochs(a)
        a.grid(True, alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


@register_section("EDropout: energy-based dropout and pruning", order=70)
def edropout_section(log_root: Path, img_dir: Path) -> str | None:
    runs = [r for r in find_runs(log_root) if r.group.split("/")[0].startswith(GROUP_PREFIX)]
    if not runs:
        return None
    parts = [
        "Salehinejad & Valaee (TNNLS 2021), issue 8. Test accuracy (%) of the best-validation "
        "checkpoint. *original*: the same recipe without EDropout; *EDropout(F)*: the EDropout-trained "
        "network with every unit on; *EDropout(P)*: with the best state (pruned); *R*: % of parameters "
        "kept, counting the next layer's removed inputs (from the physically pruned export); "
        "*random NN%*: a fixed random state keeping NN% of the units from the first step "
        "(R in brackets).", "",
        markdown_table(paper_table(runs)), "",
    ]
    if min((r.epochs_planned or 0) for r in runs) < 50:
        parts += ["Runs this short (single seed, small training subsets) demonstrate the mechanics; "
                  "differences of several points between them are within run-to-run noise.", ""]
    parts += [
        "Paper (Fashion-MNIST, 200 epochs, GPU): "
        + "; ".join(f"{m} {o:.2f} / {f:.2f} / {p:.2f} at R {r:.2f}%" for m, o, f, p, r in PAPER_FASHION)
        + " (original / F / P).", "",
        markdown_table(detail_table(runs)), "",
    ]
    fig = figure(runs, img_dir / "edropout.png")
    if fig is not None:
        parts += [f"![EDropout validation accuracy and state]({'img/' + fig.name})", ""]
    return "\n".join(parts)
