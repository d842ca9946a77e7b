"""Structural dropout (Cai et al. 2019; issue 7) in the report.

A dropout run is any run directory whose config.yaml builds a dropout study's network
(``net_type`` set, ``report_ratio`` on, or a ``*_drop`` model with a rate above 0); grid/dropout.txt and grid/dropout-fashion.txt put
them in log/dropout*/. Each group is its own study (its own data size and length), rendered as:
  * the test error per level and rate for each block type; where a setting ran with several
    seeds, mean +- sample standard deviation (n);
  * the verdict per block type: for each level its best setting (the one repeated over the most
    seeds, then the lowest mean error) against the no-dropout baseline, and whether the gain
    exceeds the seed-to-seed spread (gain > std of the baseline + std of the setting, both over
    >= 2 seeds), with the variance shift beside it;
  * a per-run table with the final variance-shift ratios, and the variance-shift figure:
    eval/train ratio of the input variance of the first, middle and last norm layer after dropout,
    per epoch (one seed per setting).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from cifarlab.dropout.layers import parse_drop_type
from cifarlab.errors import CifarlabError
from cifarlab.report.build import DASH, Run, find_runs, fmt_count, fmt_float, group_caption, markdown_table
from cifarlab.report.curves import integer_epochs, save_figure
from cifarlab.report.registry import register_section

LEVELS = ("none", "neuron", "channel", "path", "layer")
POSITIONS = ("first", "middle", "last")
FIGURE = "dropout-variance-shift.png"  # of the group "dropout"; other groups: dropout-variance-shift-<group>.png


def is_dropout_run(run: Run) -> bool:
    """A run of a dropout study: built with --net-type, tracking the variance shift, or a
    ``*_drop`` network with a dropout rate. A ``*_drop`` network trained at rate 0 for its own
    sake (the course table's pre-activation ResNet) is not one."""
    cfg = run.config
    if cfg.get("net_type") or cfg.get("report_ratio"):
        return True
    return str(cfg.get("model", "")).endswith("_drop") and float(cfg.get("drop_rate") or 0.0) > 0.0


def setting(run: Run) -> dict:
    """What a run varies: network, block type, level (none when the rate is 0), rate, mode."""
    cfg = run.config
    rate = float(cfg.get("drop_rate") or 0.0)
    try:
        level = parse_drop_type(cfg.get("drop_type")) or "none"
    except CifarlabError:  # a foreign config: show it rather than fail the report
        level = str(cfg.get("drop_type"))
    if rate == 0.0:
        level = "none"
    net = str(cfg.get("net_type") or str(cfg.get("model", "")).removesuffix("_drop"))
    if net == "resnet":
        net = "preresnet"
    kwargs = cfg.get("model_kwargs") or {}
    depth = cfg.get("depth")
    arg1 = cfg.get("arg1")
    arch = net + (f"-{depth}" if depth is not None else "") + (f" arg1={arg1:g}" if arg1 is not None else "")
    if kwargs:
        arch += " " + ",".join(f"{k}={kwargs[k]}" for k in sorted(kwargs))
    return {"arch": arch, "block_type": int(cfg.get("block_type") or 0), "level": level, "rate": rate,
            "mode": str(kwargs.get("drop_mode", "row")) if level in ("path", "layer") else DASH,
            "norm": str(cfg.get("norm") or "bn")}


def _level_rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else len(LEVELS)


def _sort_key(run: Run):
    s = setting(run)
    return (s["arch"], s["norm"], s["block_type"], _level_rank(s["level"]), s["rate"], s["mode"], run.name)


def _final(run: Run, column: str) -> float | None:
    vals = [v for v in run.metrics.get(column, []) if math.isfinite(v)]
    return vals[-1] if vals else None


def setting_key(run: Run) -> tuple:
    """A setting without its seed: runs that differ only in the seed are repeats of it."""
    s = setting(run)
    return (s["arch"], s["norm"], s["block_type"], _level_rank(s["level"]), s["level"], s["rate"], s["mode"])


def _seed(run: Run) -> int:
    return int(run.config.get("seed") or 0)


def seed_stats(runs: list[Run]) -> dict[tuple, dict]:
    """Per setting: the test errors over its seeds, their mean, sample std (None for one seed), n,
    and the mean final variance ratio (over the three tracked layers and the seeds)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.summary.get("test_error") is not None:
            groups.setdefault(setting_key(run), []).append(run)
    out = {}
    for key, members in groups.items():
        errors = [float(r.summary["test_error"]) for r in sorted(members, key=_seed)]
        ratios = []
        for r in members:
            vals = [_final(r, f"ratio_var_{pos}") for pos in POSITIONS]
            if all(v is not None for v in vals):
                ratios.append(sum(vals) / len(vals))
        out[key] = {"errors": errors, "mean": statistics.fmean(errors), "n": len(errors),
                    "std": statistics.stdev(errors) if len(errors) > 1 else None,
                    "var_ratio": statistics.fmean(ratios) if ratios else None}
    return out


def fmt_mean_std(st: dict) -> str:
    if st["n"] == 1:
        return fmt_float(st["mean"])
    return f"{st['mean']:.2f} ± {st['std']:.2f} (n={st['n']})"


def error_pivot(runs: list[Run]):
    """Rows (level, rate), one column per block type: test error in % of the best-val checkpoint
    (mean +- std over seeds where a setting has several)."""
    import pandas as pd

    cells: dict[tuple, dict[str, str]] = {}
    block_types = sorted({setting(r)["block_type"] for r in runs})
    for key, st in seed_stats(runs).items():
        _arch, _norm, bt, rank, level, rate, mode = key
        cells.setdefault((rank, level, rate, mode), {})[f"block type {bt}"] = fmt_mean_std(st)
    rows = []
    for key in sorted(cells):
        _rank, level, rate, mode = key
        row = {"level": level, "rate": fmt_float(rate, 2), "mode": mode}
        row.update({f"block type {b}": cells[key].get(f"block type {b}", DASH) for b in block_types})
        rows.append(row)
    return pd.DataFrame(rows)


def verdicts(runs: list[Run]) -> list[str]:
    """Per block type and level: its best rate against no dropout, and whether the gain exceeds
    the seed-to-seed spread (gain > std(baseline) + std(setting), each over >= 2 seeds). The best
    rate is the one repeated over the most seeds (the grid repeats the setting that won on the
    first seed), then the lowest mean error."""
    stats = seed_stats(runs)
    lines = []
    for bt in sorted({k[2] for k in stats}):
        base = [(k, st) for k, st in stats.items() if k[2] == bt and k[4] == "none"]
        if not base:
            continue
        _, bst = min(base, key=lambda t: (-t[1]["n"], t[1]["mean"]))
        shift = f", variance ratio {bst['var_ratio']:.3f}" if bst["var_ratio"] is not None else ""
        parts = [f"- block type {bt}: no dropout {fmt_mean_std(bst)}{shift}"]
        for level in LEVELS[1:]:
            cands = [(k, st) for k, st in stats.items() if k[2] == bt and k[4] == level]
            if not cands:
                continue
            # the setting repeated over seeds (the grid repeats the best of the first seed), else the lowest error
            k, st = min(cands, key=lambda t: (-t[1]["n"], t[1]["mean"], t[0][5]))
            gain = bst["mean"] - st["mean"]
            if st["std"] is None or bst["std"] is None:
                judged = f"gain {gain:+.2f} points, one seed: spread not measured"
            elif gain > bst["std"] + st["std"]:
                judged = f"**helps**: gain {gain:.2f} points > spread {bst['std'] + st['std']:.2f}"
            elif gain > 0:
                judged = f"gain {gain:.2f} points within the spread {bst['std'] + st['std']:.2f}: not shown"
            else:
                judged = f"no gain ({gain:+.2f} points)"
            shift = f", variance ratio {st['var_ratio']:.3f}" if st["var_ratio"] is not None else ""
            parts.append(f"  - {level} (best rate {k[5]:g}{'' if k[6] == DASH else ', ' + k[6]}): "
                         f"{fmt_mean_std(st)}{shift}; {judged}")
        lines += parts
    return lines


def run_table(runs: list[Run]):
    import pandas as pd

    rows = []
    for run in runs:
        s = setting(run)
        row = {"run": run.name, "network": s["arch"], "norm": s["norm"], "block type": s["block_type"],
               "level": s["level"], "rate": fmt_float(s["rate"], 2), "mode": s["mode"], "seed": _seed(run),
               "#params": fmt_count(run.summary.get("params")),
               "error (%)": fmt_float(run.summary.get("test_error"))}
        for pos in POSITIONS:
            row[f"var ratio {pos}"] = fmt_float(_final(run, f"ratio_var_{pos}"), 3)
        row["epochs"] = str(run.epochs_done)
        rows.append(row)
    return pd.DataFrame(rows)


def variance_shift_figure(runs: list[Run], path: Path) -> Path | None:
    """One row per block type, one column per tracked layer (first, middle, last norm layer after
    dropout): eval/train ratio of the layer's input variance per epoch, one line per run."""
    from matplotlib.figure import Figure

    runs = [r for r in runs if r.metrics.get("epoch") and r.metrics.get("ratio_var_first")]
    first_seed: dict[tuple, Run] = {}
    for r in sorted(runs, key=_seed):  # one line per setting: its lowest seed
        first_seed.setdefault(setting_key(r), r)
    runs = [r for r in runs if first_seed[setting_key(r)] is r]
    if not runs:
        return None
    block_types = sorted({setting(r)["block_type"] for r in runs})
    colors = {"none": "black", "neuron": "tab:blue", "channel": "tab:orange", "path": "tab:green",
              "layer": "tab:red"}
    fig = Figure(figsize=(11, 1.0 + 2.8 * len(block_types)))
    axes = fig.subplots(len(block_types), 3, sharey=True, squeeze=False)
    for run in runs:
        s = setting(run)
        label = s["level"] + (f" {s['rate']:g}" if s["level"] != "none" else "")
        row = axes[block_types.index(s["block_type"])]
        for ax, pos in zip(row, POSITIONS):
            ys = run.metrics.get(f"ratio_var_{pos}", [])
            ax.plot(run.metrics["epoch"][: len(ys)], ys, color=colors.get(s["level"], "gray"), marker=".",
                    label=label, alpha=0.85)
    for bt, row in zip(block_types, axes):
        for ax, pos in zip(row, POSITIONS):
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(f"block type {bt}: {pos} norm layer after dropout", fontsize=9)
            integer_epochs(ax)
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel("input variance, eval / train")
        row[-1].legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    return save_figure(fig, path)


def shift_summary(runs: list[Run]) -> str:
    """One line per block type: the last epoch's variance ratio, averaged over the three tracked
    layers (and over the seeds), for each level and rate (the no-dropout run is the reference)."""
    lines = []
    stats = seed_stats(runs)
    for bt in sorted({setting(r)["block_type"] for r in runs}):
        parts = []
        for key in sorted(k for k in stats if k[2] == bt):
            st = stats[key]
            if st["var_ratio"] is None:
                continue
            level, rate = key[4], key[5]
            label = level + (f" {rate:g}" if level != "none" else "")
            parts.append(f"{label} {st['var_ratio']:.3f}")
        if parts:
            lines.append(f"- block type {bt}: " + ", ".join(parts))
    return "\n".join(lines)


def figure_name(group: str) -> str:
    return FIGURE if group == "dropout" else f"dropout-variance-shift-{group.replace('/', '-')}.png"


def render_group(group: str, runs: list[Run], img_dir: Path) -> list[str]:
    parts = [f"### {group}", "", group_caption(runs), "", markdown_table(error_pivot(runs)), ""]
    lines = verdicts(runs)
    if lines:
        parts += ["Does dropout help? Per level its best rate (the one repeated over seeds, else the lowest "
                  "error) against no dropout; a gain counts when it "
                  "exceeds the seed-to-seed spread (std of the baseline + std of the setting, each over its "
                  "seeds); variance ratio: last epoch, mean of the three tracked layers (and the seeds).", ""]
        parts += lines + [""]
    parts += [
        "Per run, with the variance shift at the last epoch (eval/train ratio of the input variance "
        "of the first, middle and last norm layer that follows a dropout layer; 1 = no shift):",
        "",
        markdown_table(run_table(runs)),
        "",
    ]
    summary = shift_summary(runs)
    if summary:
        parts += ["Variance ratio at the last epoch, mean of the three tracked layers:", "", summary, ""]
    name = figure_name(group)
    fig = variance_shift_figure(runs, img_dir / name)
    if fig is not None:
        parts += [f"![variance shift, {group}](img/{name})", ""]
    return parts


@register_section("Structural dropout", order=60)
def dropout_section(log_root: Path, img_dir: Path) -> str | None:
    runs = sorted((r for r in find_runs(log_root) if is_dropout_run(r)), key=_sort_key)
    if not runs:
        return None
    parts = [
        "Drop-neuron, drop-channel, drop-path and drop-layer (Cai et al. 2019) in networks built from "
        "the customizable conv block (block type 0: norm-relu-drop-conv, 2: drop-conv-norm-relu). "
        "Error: test error (%) of the best-validation checkpoint; level `none` is the same network "
        "with rate 0. One subsection per group (each its own data size and length).",
        "",
    ]
    by_group: dict[str, list[Run]] = {}
    for run in runs:
        by_group.setdefault(run.group, []).append(run)
    for group in sorted(by_group):
        parts += render_group(group, by_group[group], img_dir)
    return "\n".join(parts)
