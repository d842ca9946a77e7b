"""The DessiLBI section: SLBI vs SGD, W* accuracy, the regularisation path, the kernel picture,
the percentile prune table and physical pruning.

It reads the files that ``python -m cifarlab slbi`` leaves in a run directory (slbi_path.csv,
prune_table.csv, physical_prune.json, kernels_<layer>_{w,w_star}.npy, command.txt) plus the
contract files; runs are found in any group. Figures are written deterministically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from cifarlab.report.build import DASH, Run, find_runs, fmt_float, markdown_table
from cifarlab.report.curves import as_percent, integer_epochs, save_figure
from cifarlab.report.registry import register_section

MARKERS = ("prune_table.csv", "slbi_path.csv")


def slbi_runs(log_root: Path) -> list[Run]:
    return [r for r in find_runs(log_root) if any((r.path / m).is_file() for m in MARKERS)]


def _pct(v) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return DASH
    return fmt_float(100.0 * v if v <= 1.0 else v)


def _label(run: Run) -> str:
    return f"{run.group}/{run.name}"


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path) if path.is_file() else None


def runs_table(runs: list[Run]):
    import pandas as pd

    rows = []
    for r in runs:
        s, c = r.summary, r.config
        sel, tot = s.get("slbi_selected_filters"), s.get("slbi_total_filters")
        rows.append({"run": _label(r), "model": r.model, "dataset": r.dataset,
                     "optimizer": str(c.get("optimizer", DASH)),
                     "train images": str(s.get("train_images", c.get("train_subset") or DASH)),
                     "epochs": f"{r.epochs_done}/{r.epochs_planned if r.epochs_planned is not None else '?'}",
                     "test acc (%)": _pct(s.get("test_acc")), "test acc W* (%)": _pct(s.get("test_acc_wstar")),
                     "selected conv filters": DASH if sel is None else f"{sel}/{tot}",
                     "device": str(s.get("device", DASH)),
                     "wall time (min)": fmt_float(s["wall_time_s"] / 60, 1) if s.get("wall_time_s") else DASH,
                     "status": r.status})
    return pd.DataFrame(rows)


def curves_figure(runs: list[Run], path: Path) -> Path | None:
    """Validation accuracy per epoch: dense (solid) and W* (dashed) for every run."""
    from matplotlib.figure import Figure

    runs = [r for r in runs if r.metrics.get("epoch")]
    if not runs:
        return None
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for r in runs:
        ep = r.metrics["epoch"]
        line, = ax.plot(ep, as_percent(r.metrics.get("val_acc", [])), label=f"{_label(r)} dense")
        wstar = r.metrics.get("val_acc_wstar")
        if wstar and any(math.isfinite(v) for v in wstar):
            ax.plot(ep, as_percent(wstar), "--", color=line.get_color(), label=f"{_label(r)} W*")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    integer_epochs(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def path_figure(run: Run, path: Path) -> Path | None:
    """The regularisation path: Gamma's support (fraction of entries) per layer per epoch, and
    the last epoch's selected vs all filters/weights per layer."""
    from matplotlib.figure import Figure

    df = _read_csv(run.path / "slbi_path.csv")
    if df is None or df.empty:
        return None
    layers = list(dict.fromkeys(df["layer"]))
    fig = Figure(figsize=(10, 3.6))
    ax_path, ax_bar = fig.subplots(1, 2)
    for layer in layers:
        d = df[df["layer"] == layer]
        ax_path.plot(d["epoch"], 100.0 * d["support"] / d["numel"], label=layer,
                     marker="." if d["epoch"].nunique() < 20 else None)
    ax_path.set_xlabel("epoch")
    ax_path.set_ylabel("support of Gamma (% of entries)")
    ax_path.set_title("regularisation path", fontsize=9)
    integer_epochs(ax_path)
    ax_path.grid(True, alpha=0.3)
    ax_path.legend(fontsize=7)
    last = df[df["epoch"] == df["epoch"].max()]
    xs = range(len(last))
    ax_bar.bar(xs, last["total"], color="0.8", label="all (conv: filters, linear: weights)")
    ax_bar.bar(xs, last["selected"], color="C0", label="selected")
    for x, (_, row) in zip(xs, last.iterrows()):
        ax_bar.text(x, row["total"], f"{100 * row['ratio']:.0f}%", ha="center", va="bottom", fontsize=7)
    ax_bar.set_xticks(list(xs), list(last["layer"]), rotation=45, ha="right", fontsize=7)
    ax_bar.set_yscale("log")
    ax_bar.set_title(f"selected per layer, epoch {int(last['epoch'].iloc[0])} (ratio on top)", fontsize=9)
    ax_bar.legend(fontsize=7)
    fig.suptitle(f"{_label(run)}: {run.model} on {run.dataset}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def kernels_figure(runs: list[Run], path: Path) -> Path | None:
    """|W| of the picture layer's first 10x10 kernels: each run's W, and W* for SLBI runs."""
    import numpy as np
    from matplotlib.figure import Figure

    panels = []
    for r in runs:
        for f in sorted(r.path.glob("kernels_*_w.npy")) + sorted(r.path.glob("kernels_*_w_star.npy")):
            layer = f.name[len("kernels_"):].rsplit("_w", 1)[0].rstrip("_")
            kind = "W*" if f.name.endswith("_w_star.npy") else "W"
            panels.append((f"{r.name}: |{layer} {kind}|", np.load(f)))
    if not panels:
        return None
    fig = Figure(figsize=(2.6 * len(panels), 2.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)


def prune_table(runs: list[Run]):
    """Rows: pruned layers and percent (in the runs' order); one test-accuracy column per run."""
    import pandas as pd

    rows: dict[tuple[str, str], dict[str, str]] = {}
    cols = []
    for r in runs:
        df = _read_csv(r.path / "prune_table.csv")
        if df is None:
            continue
        col = f"{r.name} test acc (%)"
        cols.append(col)
        for _, row in df.iterrows():
            p = row["percent"]
            key = (str(row["layers"]), DASH if not math.isfinite(p) else f"{p:g}")
            rows.setdefault(key, {"pruned layers": key[0], "pruned (%)": key[1]})[col] = _pct(row["test_acc"])
    if not rows:
        return None
    return pd.DataFrame([{c: r.get(c, DASH) for c in ["pruned layers", "pruned (%)", *cols]} for r in rows.values()])


def physical_table(runs: list[Run]):
    import pandas as pd

    rows = []
    for r in runs:
        f = r.path / "physical_prune.json"
        if not f.is_file():
            continue
        for e in json.loads(f.read_text()):
            rows.append({"run": r.name, "pruned": e["name"],
                         "params": f"{e['params_before']:,} -> {e['params_after']:,}",
                         "FLOPs/image": f"{e['flops_before']:,} -> {e['flops_after']:,}",
                         "masked test acc (%)": _pct(e["masked_test_acc"]),
                         "pruned test acc (%)": _pct(e["pruned_test_acc"]),
                         "max |diff| of logits": f"{e['max_abs_diff']:.1e}",
                         f"speed-up (forward, batch {e['batch']})": f"{e['speedup']:.2f}x"})
    return pd.DataFrame(rows) if rows else None


def _img(path: Path | None, alt: str) -> list[str]:
    return [f"![{alt}](img/{path.name})", ""] if path is not None else []


@register_section("DessiLBI: structural sparsity and pruning", order=60)
def slbi_section(log_root: Path, img_dir: Path) -> str | None:
    runs = slbi_runs(Path(log_root))
    if not runs:
        return None
    img_dir = Path(img_dir)
    parts = ["Runs of `python -m cifarlab slbi` (grid `slbi`). SLBI keeps a sparse companion Gamma "
             "of every conv/linear weight (group sparsity per conv filter, element-wise for linear "
             "weights); W* is W on Gamma's support. Test accuracy is that of the best-validation "
             "checkpoint; the prune table and physical pruning are measured on that checkpoint "
             "(prune order: first epoch Gamma became nonzero, then magnitude).", ""]
    for r in runs:
        cmd = r.path / "command.txt"
        if cmd.is_file():
            parts += [f"- `{_label(r)}`: `{cmd.read_text().strip()}`"]
    parts += ["", markdown_table(runs_table(runs)), ""]
    parts += _img(curves_figure(runs, img_dir / "slbi-val-acc.png"), "validation accuracy, dense vs W*")
    for r in runs:
        if (r.path / "slbi_path.csv").is_file():
            parts += _img(path_figure(r, img_dir / f"slbi-path-{r.group.replace('/', '-')}-{r.name}.png"),
                          f"regularisation path of {r.name}")
    kern = kernels_figure(runs, img_dir / "slbi-kernels.png")
    if kern is not None:
        parts += ["Kernel picture (the seed's \"conv-slbi\" figure): |weight| of the first 10x10 "
                  "(output, input) 5x5 kernels tiled into a 50x50 image; darker is smaller.", ""]
        parts += _img(kern, "conv kernels with and without SLBI")
    table = prune_table(runs)
    if table is not None:
        parts += ["Test accuracy after zeroing p% of a layer (filters for conv, weights for linear, "
                  "with the matching bias); `w_star` is the whole network restricted to W*.", "",
                  markdown_table(table), ""]
    phys = physical_table(runs)
    if phys is not None:
        parts += ["Physical pruning (Torch-Pruning DependencyGraph): the smaller dense model against "
                  "the masked one it must equal. Masked = the pruned weights (`conv3@80%`) or W* "
                  "(`w_star`, output layer kept) with each removed channel silenced as a whole "
                  "(its bias and BatchNorm affine zeroed too), so its accuracy can differ from the "
                  "plain W* column above. The speed-up is measured on the machine of the run.", "",
                  markdown_table(phys), ""]
    return "\n".join(parts)
