"""The modification study (seed 004, "other inquiries"): activation, loss and optimizer.

Runs live in log/modification-50ep/ (grid/modification-50ep.txt). Which family a run belongs
to is read from its config.yaml, not from its name: a run is in the activation family when
it uses the baseline loss and optimizer (ce, sgd), in the loss family when it uses the
baseline activation and optimizer (relu, sgd), in the optimizer family when it uses the
baseline activation and loss (relu, ce). The baseline run (relu, ce, sgd) is therefore the
reference curve of all three figures. One figure per family, as in the seed: training curves
above, held-out (validation) curves below.
"""
from __future__ import annotations

import math
from pathlib import Path

from cifarlab.report.build import DASH, Run, find_runs, fmt_float, markdown_table
from cifarlab.report.curves import as_percent, integer_epochs, save_figure
from cifarlab.report.registry import register_section

GROUP_PREFIX = "modification"
BASELINE = {"activation": "relu", "loss": "ce", "optimizer": "sgd"}
FAMILIES = ("activation", "loss", "optimizer")
TITLES = {"activation": "Activation function", "loss": "Loss function", "optimizer": "Optimizer"}


def setting(run: Run) -> dict[str, str]:
    """The run's (activation, loss, optimizer); a missing activation is the models' ReLU."""
    cfg = run.config
    return {"activation": str(cfg.get("activation") or "relu"),
            "loss": str(cfg.get("loss") or "ce"),
            "optimizer": str(cfg.get("optimizer") or "sgd")}


def families(runs: list[Run]) -> dict[str, list[tuple[str, Run]]]:
    """family -> [(label, run)] sorted by label; a run joins each family whose other two
    settings are the baseline's."""
    out: dict[str, list[tuple[str, Run]]] = {f: [] for f in FAMILIES}
    for run in runs:
        s = setting(run)
        for fam in FAMILIES:
            if all(s[o] == BASELINE[o] for o in FAMILIES if o != fam):
                label = s[fam]
                if fam == "optimizer" and run.config.get("lr") is not None:
                    label = f"{s[fam]} (lr {float(run.config['lr']):g})"
                out[fam].append((label, run))
    for fam in FAMILIES:
        out[fam].sort(key=lambda t: (t[0] != BASELINE[fam] and not t[0].startswith(BASELINE[fam] + " "),
                                     t[0], t[1].name))
    return out


def family_figure(family: str, members: list[tuple[str, Run]], path: Path, subtitle: str) -> Path | None:
    """2x2 grid: train loss | train accuracy (above), validation loss | validation accuracy (below)."""
    from matplotlib.figure import Figure

    members = [(label, r) for label, r in members if r.metrics.get("epoch")]
    if not members:
        return None
    fig = Figure(figsize=(9, 6.5))
    axes = fig.subplots(2, 2, sharex=True)
    panels = [("train_loss", "training loss", axes[0][0]), ("train_acc", "training accuracy (%)", axes[0][1]),
              ("val_loss", "validation loss", axes[1][0]), ("val_acc", "validation accuracy (%)", axes[1][1])]
    for label, run in members:
        epochs = run.metrics["epoch"]
        for col, _title, ax in panels:
            ys = run.metrics.get(col)
            if not ys or not any(math.isfinite(v) for v in ys):
                continue
            if col.endswith("_acc"):
                ys = as_percent(ys)
            ax.plot(epochs[: len(ys)], ys, label=label, marker="." if len(epochs) < 20 else None)
    for col, title, ax in panels:
        ax.set_title(title, fontsize=9)
        integer_epochs(ax)
        ax.grid(True, alpha=0.3)
        if col.endswith("_loss"):
            finite = [v for _l, r in members for v in r.metrics.get(col, []) if math.isfinite(v) and v > 0]
            if finite and max(finite) / min(finite) > 50:  # an outlier (e.g. a diverging optimizer)
                ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0][1].legend(fontsize=8)
    fig.suptitle(f"{TITLES[family]} (upper: training, lower: validation) — {subtitle}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def family_rows(family: str, members: list[tuple[str, Run]]) -> list[dict[str, str]]:
    rows = []
    for label, run in members:
        best_epoch, best_val = run.best_epoch_and_acc
        train_loss = [v for v in run.metrics.get("train_loss", []) if math.isfinite(v)]
        planned = run.epochs_planned
        rows.append({"family": family, "setting": label, "run": run.name,
                     "final train loss": fmt_float(train_loss[-1] if train_loss else None, 4),
                     "best val acc (%)": fmt_float(best_val),
                     "test error (%)": fmt_float(run.summary.get("test_error")),
                     "best epoch": DASH if best_epoch is None else str(best_epoch),
                     "epochs": f"{run.epochs_done}/{planned if planned is not None else '?'}",
                     "status": run.status})
    return rows


def _subtitle(runs: list[Run]) -> str:
    models = sorted({r.model for r in runs})
    datasets = sorted({r.dataset for r in runs})
    epochs = sorted({str(r.epochs_planned) for r in runs if r.epochs_planned is not None})
    return f"{', '.join(models)} on {', '.join(datasets)}, {'/'.join(epochs) or '?'} epochs"


def render(log_root: Path, img_dir: Path, group: str) -> str | None:
    import pandas as pd

    runs = find_runs(log_root, group=group)
    if not runs:
        return None
    fams = families(runs)
    subtitle = _subtitle(runs)
    parts = [f"Group `{group}`: {subtitle}. Baseline: relu activation, cross-entropy loss, SGD; "
             "each figure varies one of the three. Upper row: training; lower row: held-out "
             "validation split (the test set only scores the best-validation checkpoint).", ""]
    rows = []
    for fam in FAMILIES:
        if not fams[fam]:
            continue
        fig = family_figure(fam, fams[fam], img_dir / f"{group}-{fam}.png", subtitle)
        if fig is not None:
            parts += [f"![{TITLES[fam]}](img/{fig.name})", ""]
        rows += family_rows(fam, fams[fam])
    outside = sorted(r.name for r in runs if not any(r in [m for _l, m in fams[f]] for f in FAMILIES))
    if rows:
        parts += [markdown_table(pd.DataFrame(rows)), ""]
    if outside:
        parts += [f"Runs that change more than one setting (not plotted): {', '.join(outside)}", ""]
    return "\n".join(parts)


@register_section("Modifications: activation, loss, optimizer", order=20)
def modifications_section(log_root: Path, img_dir: Path) -> str | None:
    log_root = Path(log_root)
    if not log_root.is_dir():
        return None
    groups = sorted(p.name for p in log_root.iterdir() if p.is_dir() and p.name.startswith(GROUP_PREFIX))
    parts = [md for md in (render(log_root, img_dir, g) for g in groups) if md]
    return "\n".join(parts) if parts else None
