"""Figures and numbers of the BatchNorm study, from the files in its run directory.

Reads CSVs only (pandas) and draws with matplotlib's object API (Agg, no pyplot state), so the
report can call it without importing the training code. Figures are written through
report.curves.save_figure (atomic, no software metadata: same data, same bytes).

- ``plot_landscape``: the course figure; per model the band between the min and max training
  loss over the learning rates at each step (fill_between), all models on one plot; the legend
  names the rates that diverged and the step they diverged at.
- ``plot_probe``: one Santurkar quantity against the training step, all models on one plot:
  the band over eta of L(w - eta g) ("loss"), of ||grad L(w) - grad L(w - eta g)|| ("grad_diff"),
  or the effective beta-smoothness (a line).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cifarlab.batchnorm.landscape import BAND_CSV, LOSSES_CSV, RUNS_CSV

PROBES_CSV = "probes.csv"  # written by analysis/bn_probe_callback.py in each probe run
PROBE_LABELS = {
    "loss": ("loss landscape: L(w - eta g) over eta", "loss"),
    "grad_diff": ("gradient predictiveness: ||grad L(w) - grad L(w - eta g)|| over eta", "l2 distance"),
    "beta": ("effective beta-smoothness: max over eta of ||grad diff|| / ||eta g||", "beta"),
}


def has_bn(name: str) -> bool:
    """Model names with BatchNorm carry ``_bn`` (vgg_a_bn, vgg_a_bn_full, vgg_a_light_bn)."""
    return "_bn" in name


def _style(name: str, i: int) -> dict:
    """BN models in blue shades, plain ones in red shades, so 'with/without BN' reads at a glance."""
    bn = ["tab:blue", "tab:cyan", "navy"]
    plain = ["tab:red", "tab:orange", "darkred"]
    return {"color": (bn if has_bn(name) else plain)[i % 3]}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average ignoring NaN (window 1 = raw)."""
    if window <= 1 or len(values) == 0:
        return values
    s = pd.Series(values)
    return s.rolling(window, center=True, min_periods=1).mean().to_numpy()


# -- loading -------------------------------------------------------------------------------------
def load_landscape(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(band, runs) tables of a study run directory, or None when it has no landscape."""
    run_dir = Path(run_dir)
    if not (run_dir / BAND_CSV).is_file() or not (run_dir / RUNS_CSV).is_file():
        return None
    band = pd.read_csv(run_dir / BAND_CSV)
    runs = pd.read_csv(run_dir / RUNS_CSV)
    return band, runs


def load_losses(run_dir: str | Path) -> pd.DataFrame | None:
    f = Path(run_dir) / LOSSES_CSV
    return pd.read_csv(f) if f.is_file() else None


def load_probes(dirs: dict[str, Path]) -> pd.DataFrame:
    """label -> run directory holding probes.csv; rows of all, with a ``model`` column."""
    frames = []
    for label, d in sorted(dirs.items()):
        f = Path(d) / PROBES_CSV
        if f.is_file():
            df = pd.read_csv(f)
            if len(df):
                df.insert(0, "model", label)
                frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["model", "step", "epoch", "eta", "loss", "grad_diff", "ratio", "beta"])
    return pd.concat(frames, ignore_index=True)


def probe_steps(probes: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, step): min/max over eta of loss and grad_diff, and beta."""
    if probes.empty:
        return pd.DataFrame(columns=["model", "step", "loss_min", "loss_max", "grad_diff_min",
                                     "grad_diff_max", "beta"])
    g = probes.groupby(["model", "step"], sort=True)
    out = g.agg(loss_min=("loss", "min"), loss_max=("loss", "max"), grad_diff_min=("grad_diff", "min"),
                grad_diff_max=("grad_diff", "max"), beta=("ratio", "max"),
                **({"grad_norm": ("grad_norm", "first")} if "grad_norm" in probes else {})).reset_index()
    return out


# -- numbers ---------------------------------------------------------------------------------------
def no_progress(losses: pd.DataFrame, model: str, tol: float = 0.02) -> list[float]:
    """Rates of ``model`` whose loss over the last 10% of their steps is still within ``tol``
    (relative) of their step-0 loss, or above it: rates that did not train. A band over rates that
    all fail alike is narrow without the landscape being smooth, so the report names them."""
    out = []
    for lr, g in losses[losses["model"] == model].groupby("lr", sort=True):
        g = g.sort_values("step")
        vals = g["loss"].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        if len(vals) < 2:
            continue
        tail = vals[-max(1, len(vals) // 10):].mean()
        if tail >= (1 - tol) * vals[0]:
            out.append(float(lr))
    return out


def landscape_stats(band: pd.DataFrame, runs: pd.DataFrame, losses: pd.DataFrame | None = None) -> dict[str, dict]:
    """Per model: mean and median band width (steps with >= 2 models alive), final band, divergences,
    and (given the per-step losses) the rates that made no progress."""
    out = {}
    for model, b in band.groupby("model", sort=True):
        ok = b[b["n_alive"] >= 2]
        width = (ok["max"] - ok["min"]).to_numpy()
        r = runs[runs["model"] == model]
        div = r[r["diverged"].astype(str).str.lower() == "true"]
        last = b.tail(max(1, len(b) // 10))  # the last 10% of the steps
        out[model] = {
            "band_width_mean": float(width.mean()) if len(width) else math.nan,
            "band_width_median": float(np.median(width)) if len(width) else math.nan,
            "band_width_last10pct": float((last["max"] - last["min"]).mean()) if len(last) else math.nan,
            "steps": int(len(b)),
            "lrs": [float(v) for v in r["lr"]],
            "diverged": [(float(lr), int(s)) for lr, s in zip(div["lr"], div["diverged_step"])],
            "no_progress": no_progress(losses, model) if losses is not None else [],
        }
    return out


def probe_stats(probes: pd.DataFrame) -> dict[str, dict]:
    """Per model: median and mean beta, mean spread of loss and of grad_diff over eta."""
    out = {}
    for model, s in probe_steps(probes).groupby("model", sort=True):
        beta = s["beta"].to_numpy(dtype=float)
        beta = beta[np.isfinite(beta)]
        out[model] = {
            "probes": int(len(s)),
            "beta_median": float(np.median(beta)) if len(beta) else math.nan,
            "beta_mean": float(beta.mean()) if len(beta) else math.nan,
            "beta_max": float(beta.max()) if len(beta) else math.nan,
            "loss_spread_mean": float((s["loss_max"] - s["loss_min"]).mean()),
            "grad_diff_max_mean": float(s["grad_diff_max"].mean()),
            "grad_diff_spread_mean": float((s["grad_diff_max"] - s["grad_diff_min"]).mean()),
            "grad_norm_median": float(s["grad_norm"].median()) if "grad_norm" in s else math.nan,
        }
    return out


def pairs(models: list[str]) -> list[tuple[str, str]]:
    """(without BN, with BN) pairs among the models: vgg_a with vgg_a_bn (or vgg_a_bn_full)."""
    out = []
    for m in sorted(models):
        if has_bn(m):
            continue
        for cand in (m + "_bn", m + "_bn_full"):
            if cand in models:
                out.append((m, cand))
                break
    return out


def _g(v: float) -> str:
    return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.4g}"


def _verdict(bn: float, plain: float, better: str, worse: str, same: str) -> str:
    """'better' when the BN value is lower, 'worse' when higher; ties and missing values said so."""
    if not (math.isfinite(bn) and math.isfinite(plain)):
        return "not comparable (missing values)"
    if bn == plain:
        return same
    return better if bn < plain else worse


def comparison_lines(land: dict[str, dict], probe: dict[str, dict]) -> list[str]:
    """Plain sentences: is BN's band narrower, is its beta smaller, with the numbers."""
    lines = []
    for plain, bn in pairs(sorted(set(land) | set(probe))):
        if plain in land and bn in land:
            a, b = land[plain], land[bn]
            verdict = _verdict(b["band_width_mean"], a["band_width_mean"], "narrower", "NOT narrower",
                               "as wide as")
            note = ""
            if a["diverged"] or b["diverged"]:
                note = (" (diverged rates are excluded from the band after they diverge: "
                        + "; ".join(f"{m}: " + ", ".join(f"lr {lr:g} at step {s}" for lr, s in land[m]["diverged"])
                                    for m in (plain, bn) if land[m]["diverged"]) + ")")
            stuck = "; ".join(f"{m}: lr " + ", ".join(f"{lr:g}" for lr in land[m]["no_progress"])
                              for m in (plain, bn) if land[m].get("no_progress"))
            if stuck:
                note += (f". Rates that did not leave their initial loss (last 10% of the steps within 2% of "
                         f"step 0): {stuck}; a band over rates that fail alike is narrow without the "
                         f"landscape being smooth")
            verdict += "" if verdict in ("as wide as", "not comparable (missing values)") else " than"
            lines.append(f"Loss landscape: the band of **{bn}** is **{verdict}** that of {plain}: "
                         f"mean width (max - min training loss over the rates, per step) "
                         f"{_g(b['band_width_mean'])} vs {_g(a['band_width_mean'])}; median "
                         f"{_g(b['band_width_median'])} vs {_g(a['band_width_median'])}; last 10% of the "
                         f"steps {_g(b['band_width_last10pct'])} vs {_g(a['band_width_last10pct'])}{note}.")
        if plain in probe and bn in probe:
            a, b = probe[plain], probe[bn]
            verdict = _verdict(b["beta_median"], a["beta_median"], "smaller", "NOT smaller", "equal to")
            verdict += "" if verdict in ("equal to", "not comparable (missing values)") else " than"
            lines.append(f"Effective beta-smoothness: the beta of **{bn}** is **{verdict}** that of "
                         f"{plain}: median over probed steps {_g(b['beta_median'])} vs {_g(a['beta_median'])} "
                         f"(mean {_g(b['beta_mean'])} vs {_g(a['beta_mean'])}; {b['probes']} and "
                         f"{a['probes']} probes; median gradient norm ||g|| {_g(b.get('grad_norm_median'))} vs "
                         f"{_g(a.get('grad_norm_median'))}, so the same step sizes eta move the two networks "
                         f"by different distances ||eta g||).")
            verdict = _verdict(b["grad_diff_max_mean"], a["grad_diff_max_mean"], "more", "NOT more", "equally")
            lines.append(f"Gradient predictiveness: gradients of **{bn}** are **{verdict}** predictive: mean "
                         f"over probes of the largest ||grad L(w) - grad L(w - eta g)|| "
                         f"{_g(b['grad_diff_max_mean'])} vs {_g(a['grad_diff_max_mean'])}; loss spread along "
                         f"the gradient {_g(b['loss_spread_mean'])} vs {_g(a['loss_spread_mean'])}.")
    return lines


# -- figures -------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    from cifarlab.report.curves import save_figure  # lazy: report imports this module

    return save_figure(fig, path, dpi=110)


def plot_landscape(band: pd.DataFrame, runs: pd.DataFrame, path: str | Path, title: str = "",
                   smooth: int = 1) -> Path:
    """The course figure: per model, fill_between the min and max loss over the rates."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    notes = []
    for i, (model, b) in enumerate(sorted(band.groupby("model"), key=lambda t: (has_bn(t[0]), t[0]))):
        st = _style(model, i)
        steps = b["step"].to_numpy()
        lo, hi = _smooth(b["min"].to_numpy(float), smooth), _smooth(b["max"].to_numpy(float), smooth)
        r = runs[runs["model"] == model]
        lrs = ", ".join(f"{v:g}" for v in r["lr"])
        div = r[r["diverged"].astype(str).str.lower() == "true"]
        label = f"{model} (lr {lrs})"
        if len(div):
            what = ", ".join(f"lr {lr:g} at step {int(s)}" for lr, s in zip(div["lr"], div["diverged_step"]))
            label += f"\ndiverged: {what}"
            notes.append(f"{model}: {what}")
            for s in div["diverged_step"]:
                ax.axvline(int(s), color=st["color"], ls=":", lw=1)
        ax.fill_between(steps, lo, hi, alpha=0.35, color=st["color"], label=label, lw=0)
        ax.plot(steps, lo, color=st["color"], lw=0.6)
        ax.plot(steps, hi, color=st["color"], lw=0.6)
    finite = band[["min", "max"]].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 50:  # early spikes dwarf the rest
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss" + (f" (moving average, {smooth} steps)" if smooth > 1 else ""))
    head = title or "Loss landscape: min-max band of the training loss over learning rates"
    if notes:
        head += "\n(diverged models leave the band from the dotted line on)"
    ax.set_title(head, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_probe(probes: pd.DataFrame, quantity: str, path: str | Path, title: str = "") -> Path:
    """One Santurkar quantity for every model on one plot: a band over eta, or beta as a line."""
    from matplotlib.figure import Figure

    if quantity not in PROBE_LABELS:
        raise ValueError(f"quantity must be one of {list(PROBE_LABELS)}")
    per = probe_steps(probes)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, (model, s) in enumerate(sorted(per.groupby("model"), key=lambda t: (has_bn(t[0]), t[0]))):
        st = _style(model, i)
        x = s["step"].to_numpy()
        label = f"{model} ({'with' if has_bn(model) else 'without'} BN)"
        if quantity == "beta":
            ax.plot(x, s["beta"].to_numpy(float), marker=".", color=st["color"], label=label)
        else:
            lo, hi = s[f"{quantity}_min"].to_numpy(float), s[f"{quantity}_max"].to_numpy(float)
            ax.fill_between(x, lo, hi, alpha=0.35, color=st["color"], label=label, lw=0)
            ax.plot(x, lo, color=st["color"], lw=0.6)
            ax.plot(x, hi, color=st["color"], lw=0.6)
    head, ylabel = PROBE_LABELS[quantity]
    etas = sorted(set(float(e) for e in probes["eta"])) if "eta" in probes and len(probes) else []
    ax.set_title((title or head) + (f"\neta in {{{', '.join(f'{e:g}' for e in etas)}}}" if etas else ""),
                 fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    vals = per["beta"] if quantity == "beta" else per.get(f"{quantity}_max", pd.Series(dtype=float))
    finite = vals[np.isfinite(vals.astype(float))] if len(vals) else vals
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 50:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(per):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))
