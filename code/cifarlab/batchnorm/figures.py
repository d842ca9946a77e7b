"""Figures, numbers and answers of the BatchNorm study, from the files in its run directory.

Reads CSVs only (pandas) and draws with matplotlib's object API (Agg, no pyplot state), so the
report can call it without importing the training code. Figures are written through
report.curves.save_figure (atomic, no software metadata: same data, same bytes).

Per seed, every model of the study on one plot (BN models in blue shades, plain ones in red):
- ``landscape``: the course figure; per model the band between the min and max training loss
  over the learning rates at every step (fill_between): the raw band faint, a moving average
  over ``smooth`` steps on top; diverged rates are named with the step they diverged at.
- ``course_predictiveness``: the course's gradient predictiveness, the band (min..max over the
  rates) of ||g_t - g_(t-1)||, the change between consecutive steps' gradients.
- ``course_beta``: the course's effective beta-smoothness, the max over the rates of
  ||g_t - g_(t-1)|| / ||w_t - w_(t-1)|| (the max difference in gradient over the distance moved).
- ``probe_loss``, ``probe_grad_diff``, ``probe_beta``: Santurkar's probes at the relative step
  sizes (a fraction eta_rel of the gradient step, the same distance for both networks; the
  absolute ones when a run has no relative ones): the band over eta of L(w - eta g), of
  ||grad L(w) - grad L(w - eta g)||, and the max over eta of their ratio to ||eta g||.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cifarlab.batchnorm.landscape import BAND_CSV, LOSSES_CSV, RUNS_CSV

PROBES_CSV = "probes.csv"  # written by batchnorm/probe_callback.py in each probe run
PROBE_LABELS = {
    "loss": ("Santurkar loss landscape: L(w - eta g) over eta", "loss"),
    "grad_diff": ("Santurkar gradient predictiveness: ||grad L(w) - grad L(w - eta g)|| over eta", "l2 distance"),
    "beta": ("Santurkar effective beta-smoothness: max over eta of ||grad diff|| / ||eta g||", "beta"),
}
FIGURES = ("landscape", "course_predictiveness", "course_beta", "probe_loss", "probe_grad_diff", "probe_beta")


def has_bn(name: str) -> bool:
    """Model names with BatchNorm carry ``_bn`` (vgg_a_bn, vgg_a_bn_full, vgg_a_light_bn)."""
    return "_bn" in name


def unit(model: str, seed) -> str:
    """The key of one (model, seed) in the study's tables and summary.json."""
    return f"{model}/seed{seed}"


def _style(name: str, i: int) -> dict:
    """BN models in blue shades, plain ones in red shades, so 'with/without BN' reads at a glance."""
    bn = ["tab:blue", "tab:cyan", "navy"]
    plain = ["tab:red", "tab:orange", "darkred"]
    return {"color": (bn if has_bn(name) else plain)[i % 3]}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average ignoring NaN (window 1 = raw)."""
    if window <= 1 or len(values) == 0:
        return values
    return pd.Series(values).rolling(window, center=True, min_periods=1).mean().to_numpy()


def auto_window(steps: int) -> int:
    """Moving-average window for a curve of ``steps`` points: about 1% of them (1 = raw)."""
    return max(1, int(steps) // 100)


# -- loading -------------------------------------------------------------------------------------
def _with_seed(df: pd.DataFrame, default_seed) -> pd.DataFrame:
    """Studies written before seeds were recorded: one seed, the study's."""
    if "seed" not in df:
        df.insert(1, "seed", default_seed if default_seed is not None else 0)
    return df


def load_landscape(run_dir: str | Path, default_seed=None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(band, runs) tables of a study run directory, or None when it has no landscape."""
    run_dir = Path(run_dir)
    if not (run_dir / BAND_CSV).is_file() or not (run_dir / RUNS_CSV).is_file():
        return None
    band = _with_seed(pd.read_csv(run_dir / BAND_CSV), default_seed)
    runs = _with_seed(pd.read_csv(run_dir / RUNS_CSV), default_seed)
    return band, runs


def load_losses(run_dir: str | Path, default_seed=None) -> pd.DataFrame | None:
    f = Path(run_dir) / LOSSES_CSV
    return _with_seed(pd.read_csv(f), default_seed) if f.is_file() else None


def probe_dirs(run_dir: str | Path, models, seeds) -> dict[tuple[str, int], Path]:
    """(model, seed) -> the probe run's directory: probes/<model>/seed<s>, or probes/<model>
    (a study from before seeds, for its single seed)."""
    run_dir = Path(run_dir)
    out = {}
    for m in models:
        for s in seeds:
            d = run_dir / "probes" / m / f"seed{s}"
            if not d.is_dir() and len(seeds) == 1 and (run_dir / "probes" / m / PROBES_CSV).is_file():
                d = run_dir / "probes" / m
            out[(m, s)] = d
    return out


def load_probes(dirs: dict) -> pd.DataFrame:
    """(model, seed) (or a model name) -> run directory holding probes.csv; the rows of all, with
    ``model`` and ``seed`` columns (``kind`` "abs" for files written before relative steps)."""
    frames = []
    for key, d in sorted(dirs.items(), key=lambda t: str(t[0])):
        model, seed = key if isinstance(key, tuple) else (key, 0)
        f = Path(d) / PROBES_CSV
        if f.is_file():
            df = pd.read_csv(f)
            if len(df):
                df.insert(0, "model", model)
                df.insert(1, "seed", seed)
                if "kind" not in df:
                    df["kind"] = "abs"
                frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["model", "seed", "step", "epoch", "kind", "eta", "loss", "grad_diff", "ratio",
                                     "beta", "grad_norm"])
    return pd.concat(frames, ignore_index=True)


def probe_kind(probes: pd.DataFrame) -> str:
    """The step sizes the figures and answers use: relative when the runs have them."""
    return "rel" if "kind" in probes and (probes["kind"] == "rel").any() else "abs"


def probe_steps(probes: pd.DataFrame, kind: str | None = None) -> pd.DataFrame:
    """One row per (model, seed, step) for one kind of step size: min/max over eta of loss and
    grad_diff, beta (max ratio), ||g|| and the largest distance moved."""
    cols = ["model", "seed", "step", "loss_min", "loss_max", "grad_diff_min", "grad_diff_max", "beta",
            "grad_norm", "distance_max", "grad_diff_rel"]
    if probes.empty:
        return pd.DataFrame(columns=cols)
    kind = kind or probe_kind(probes)
    p = probes[probes["kind"] == kind] if "kind" in probes else probes
    if p.empty:
        return pd.DataFrame(columns=cols)
    if "distance" not in p:
        p = p.assign(distance=p["eta"] * p["grad_norm"])
    out = p.groupby(["model", "seed", "step"], sort=True).agg(
        loss_min=("loss", "min"), loss_max=("loss", "max"), grad_diff_min=("grad_diff", "min"),
        grad_diff_max=("grad_diff", "max"), beta=("ratio", "max"), grad_norm=("grad_norm", "first"),
        distance_max=("distance", "max")).reset_index()
    # scale-free predictiveness: the largest gradient change over the gradient's own length
    out["grad_diff_rel"] = out["grad_diff_max"] / out["grad_norm"].where(out["grad_norm"] > 0)
    return out


# -- numbers ---------------------------------------------------------------------------------------
def no_progress(losses: pd.DataFrame, model: str, tol: float = 0.02, seed=None) -> list[float]:
    """Rates of ``model`` whose loss over the last 10% of their steps is still within ``tol``
    (relative) of their step-0 loss, or above it: rates that did not train. A band over rates that
    all fail alike is narrow without the landscape being smooth, so the report names them."""
    out = []
    sel = losses[losses["model"] == model]
    if seed is not None and "seed" in sel:
        sel = sel[sel["seed"] == seed]
    for lr, g in sel.groupby("lr", sort=True):
        vals = g.sort_values("step")["loss"].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        if len(vals) < 2:
            continue
        tail = vals[-max(1, len(vals) // 10):].mean()
        if tail >= (1 - tol) * vals[0]:
            out.append(float(lr))
    return out


def _med(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else math.nan


def _mean(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _max(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.max()) if len(v) else math.nan


def landscape_stats(band: pd.DataFrame, runs: pd.DataFrame, losses: pd.DataFrame | None = None) -> dict[str, dict]:
    """Per (model, seed) (key ``unit``): band width (median, mean, last 10% of the steps, over the
    steps with >= 2 rates alive), divergences, rates without progress, and the course's measures
    (median over steps of the max over the rates of ||g_t - g_(t-1)||, and of the course beta)."""
    band, runs = _with_seed(band.copy(), 0), _with_seed(runs.copy(), 0)
    out = {}
    for (model, seed), b in band.groupby(["model", "seed"], sort=True):
        ok = b[b["n_alive"] >= 2]
        width = (ok["max"] - ok["min"]).to_numpy(float)
        r = runs[(runs["model"] == model) & (runs["seed"] == seed)]
        div = r[r["diverged"].astype(str).str.lower() == "true"]
        last = ok.tail(max(1, len(ok) // 10))
        out[unit(model, seed)] = {
            "model": model, "seed": int(seed),
            "band_width_median": _med(width), "band_width_mean": _mean(width),
            "band_width_last10pct": _mean(last["max"] - last["min"]) if len(last) else math.nan,
            "steps": int(len(b)),
            "lrs": [float(v) for v in r["lr"]],
            "final_losses": ([float(v) for v in r["final_loss"]] if "final_loss" in r else []),
            "diverged": [(float(lr), int(s)) for lr, s in zip(div["lr"], div["diverged_step"])],
            "no_progress": no_progress(losses, model, seed=seed) if losses is not None else [],
            "course_change_max_median": _med(b["change_max"]) if "change_max" in b else math.nan,
            "course_beta_median": _med(b["beta"]) if "beta" in b else math.nan,
        }
    return out


def probe_stats(probes: pd.DataFrame) -> dict[str, dict]:
    """Per (model, seed) (key ``unit``), at the step sizes the answers use (``probe_kind``):
    medians over the probed steps of beta, of the largest gradient difference and of the loss
    spread along -g, with ||g||, the distance moved and the absolute-step beta for reference."""
    kind = probe_kind(probes)
    out = {}
    per = probe_steps(probes, kind)
    absolute = probe_steps(probes, "abs") if kind == "rel" else per
    for (model, seed), s in per.groupby(["model", "seed"], sort=True):
        a = absolute[(absolute["model"] == model) & (absolute["seed"] == seed)]
        out[unit(model, seed)] = {
            "model": model, "seed": int(seed), "kind": kind, "probes": int(len(s)),
            "beta_median": _med(s["beta"]), "beta_mean": _mean(s["beta"]), "beta_max": _max(s["beta"]),
            "grad_diff_max_median": _med(s["grad_diff_max"]),
            "loss_spread_median": _med(s["loss_max"] - s["loss_min"]),
            "grad_norm_median": _med(s["grad_norm"]),
            "grad_diff_rel_median": _med(s["grad_diff_rel"]),
            "distance_max_median": _med(s["distance_max"]),
            "beta_abs_median": _med(a["beta"]),
        }
    return out


def pairs(models) -> list[tuple[str, str]]:
    """(without BN, with BN) pairs among the models: vgg_a with vgg_a_bn (or vgg_a_bn_full),
    vgg_a_light with vgg_a_light_bn."""
    models = set(models)
    out = []
    for m in sorted(models):
        if has_bn(m):
            continue
        for cand in (m + "_bn", m + "_bn_full"):
            if cand in models:
                out.append((m, cand))
                break
    return out


def _g(v) -> str:
    return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.4g}"


# (key, question, source, stat, definition): lower is better for BN in every row
QUESTIONS = [
    ("band", "Is BN's loss band narrower?", "landscape", "band_width_median",
     "course landscape: median over steps of (max - min) training loss over the rates"),
    ("predictive", "Are BN's gradients more predictive?", "probes", "grad_diff_max_median",
     "Santurkar, relative steps: median over probed steps of max over eta of ||grad L(w) - grad L(w - eta g)||"),
    ("predictive_rel", "Are BN's gradients more predictive, relative to their length?", "probes",
     "grad_diff_rel_median",
     "Santurkar's probes made scale-free: median over probed steps of max over eta of ||grad diff|| / ||g||"),
    ("predictive_course", "Are BN's gradients more predictive? (course)", "landscape", "course_change_max_median",
     "course: median over steps of the max over the rates of ||g_t - g_(t-1)||"),
    ("beta", "Is BN's beta smaller?", "probes", "beta_median",
     "Santurkar, relative steps: median over probed steps of max over eta of ||grad diff|| / ||eta g||"),
    ("beta_course", "Is BN's beta smaller? (course)", "landscape", "course_beta_median",
     "course: median over steps of the max over the rates of ||g_t - g_(t-1)|| / ||w_t - w_(t-1)||"),
]


def _answer(plain: float, bn: float) -> str:
    if not (isinstance(plain, (int, float)) and isinstance(bn, (int, float))
            and math.isfinite(plain) and math.isfinite(bn)):
        return "n/a"
    return "yes" if bn < plain else "no"


def answers(land: dict[str, dict], probe: dict[str, dict], models, seeds) -> list[dict]:
    """One record per model pair and seed: every question's numbers and its yes/no answer, and
    the reasons found when BN's advantage does not show."""
    out = []
    for plain, bn in pairs(models):
        for seed in seeds:
            a, b = unit(plain, seed), unit(bn, seed)
            rows = []
            for key, question, source, stat, definition in QUESTIONS:
                src = land if source == "landscape" else probe
                pv, bv = src.get(a, {}).get(stat, math.nan), src.get(b, {}).get(stat, math.nan)
                if key == "predictive" and probe.get(b, {}).get("kind") == "abs":
                    definition = definition.replace("relative steps", "absolute steps")
                if key in ("beta", "predictive_rel") and probe.get(b, {}).get("kind") == "abs":
                    definition = definition.replace("relative steps", "absolute steps")
                rows.append({"key": key, "question": question, "definition": definition,
                             "plain": pv, "bn": bv, "answer": _answer(pv, bv)})
            out.append({"plain": plain, "bn": bn, "seed": seed, "questions": rows,
                        "notes": _notes(plain, bn, seed, land, probe, rows)})
    return out


def _notes(plain, bn, seed, land, probe, rows) -> list[str]:
    """Evidence that explains a 'no': rates that diverged or never trained, step sizes that
    moved the networks by different distances."""
    if all(r["answer"] != "no" for r in rows):
        return []
    notes = []
    for m in (plain, bn):
        lst = land.get(unit(m, seed), {})
        if lst.get("diverged"):
            notes.append(f"{m}: rates that diverged (they leave the band from that step): "
                         + ", ".join(f"lr {lr:g} at step {s}" for lr, s in lst["diverged"]))
        if lst.get("no_progress"):
            notes.append(f"{m}: rates that never left their initial loss (last 10% of the steps within 2% of "
                         f"step 0): lr " + ", ".join(f"{lr:g}" for lr in lst["no_progress"])
                         + "; a band over rates that fail alike is narrow without the landscape being smooth")
    pa, pb = probe.get(unit(plain, seed), {}), probe.get(unit(bn, seed), {})
    by_key = {r["key"]: r for r in rows}
    ga, gb = pa.get("grad_norm_median"), pb.get("grad_norm_median")
    if (by_key.get("predictive", {}).get("answer") == "no" and isinstance(ga, float) and isinstance(gb, float)
            and math.isfinite(ga) and math.isfinite(gb) and gb > ga):
        rel = by_key.get("predictive_rel", {})
        rb, rp = rel.get("bn", math.nan), rel.get("plain", math.nan)
        how = ("about as much" if abs(rb / rp - 1) < 0.05 else "less" if rb < rp else "more") if rp > 0 else "n/a"
        notes.append(f"BN's gradients are longer (median ||g|| {_g(gb)} vs {_g(ga)}) and gradient differences scale "
                     f"with them; relative to their own length they change {how} with BN ({_g(rb)} vs {_g(rp)})")
    la = land.get(unit(plain, seed), {})
    if (by_key.get("band", {}).get("answer") == "yes" and la and not la.get("diverged") and not la.get("no_progress")
            and any(r["answer"] == "no" for r in rows if r["key"] != "band")):
        notes.append(f"without BN every rate trained (none diverged or stalled): at these Adam rates {plain} is not "
                     f"in the regime where BN's smoothing pays (rates at which the plain network diverges or stalls), "
                     f"and BN's effect shows in how little the loss depends on the rate (the band), not in the "
                     f"local gradient measures")
    lb = land.get(unit(bn, seed), {})
    if (by_key.get("band", {}).get("answer") == "no" and la.get("final_losses") and lb.get("final_losses")
            and la.get("lrs") == lb.get("lrs")):
        per_rate = ", ".join(f"{lr:g}: {_g(x)} / {_g(y)}" for lr, x, y in zip(la["lrs"], la["final_losses"],
                                                                          lb["final_losses"]))
        lower = all(y < x for x, y in zip(la["final_losses"], lb["final_losses"]))
        notes.append(f"final training loss per rate (lr: no BN / BN) {per_rate}"
                     + ("; BN ends lower at every rate, but its rates spread more: the band measures how much "
                        "the loss depends on the rate, not how low it gets" if lower else ""))
    for santurkar, course in (("predictive", "predictive_course"), ("beta", "beta_course")):
        if by_key.get(santurkar, {}).get("answer") == "yes" and by_key.get(course, {}).get("answer") == "no":
            notes.append(f"{by_key[santurkar]['question'].rstrip('?')}: yes by Santurkar's probes, no by the course's "
                         f"measure: the course compares g_t and g_(t-1) on different mini-batches one optimizer step "
                         f"apart, so batch-to-batch gradient noise enters it; the probes keep the batch fixed and move "
                         f"along -g only")
    if pa.get("kind") == "abs" or pb.get("kind") == "abs":
        notes.append(f"the probes used absolute step sizes: median ||g|| {_g(pb.get('grad_norm_median'))} (BN) vs "
                     f"{_g(pa.get('grad_norm_median'))}, so the networks were probed at different distances")
    if pa and pb and min(pa.get("probes", 0), pb.get("probes", 0)) < 50:
        notes.append(f"few probed steps ({pb.get('probes')} and {pa.get('probes')}): the medians are noisy")
    return notes


def comparison_lines(ans: list[dict]) -> list[str]:
    """Plain sentences, one per pair and seed: the three answers with their numbers."""
    lines = []
    for rec in ans:
        q = {r["key"]: r for r in rec["questions"]}

        def part(key, course_key=None):
            r = q[key]
            text = f"**{r['answer']}** ({_g(r['bn'])} vs {_g(r['plain'])}"
            if course_key:
                c = q[course_key]
                text += f"; course definition: {c['answer']}, {_g(c['bn'])} vs {_g(c['plain'])}"
            return text + ")"

        line = (f"{rec['bn']} vs {rec['plain']}, seed {rec['seed']}: band narrower? {part('band')}; "
                f"gradients more predictive? {part('predictive', 'predictive_course')}, relative to their length "
                f"{q['predictive_rel']['answer']} ({_g(q['predictive_rel']['bn'])} vs {_g(q['predictive_rel']['plain'])}); "
                f"beta smaller? {part('beta', 'beta_course')}.")
        if rec["notes"]:
            line += " Evidence: " + "; ".join(rec["notes"]) + "."
        lines.append(line)
    return lines


def answers_table(rec: dict) -> str:
    """Markdown: one row per question for one pair and seed."""
    head = (f"| question | measure (median; lower is better) | {rec['plain']} (no BN) | {rec['bn']} (BN) | answer |\n"
            "|---|---|---|---|---|")
    rows = [f"| {r['question']} | {r['definition'].replace('|', '&#124;')} | {_g(r['plain'])} | {_g(r['bn'])} | "
            f"**{r['answer']}** |" for r in rec["questions"]]
    return "\n".join([head] + rows)


# -- figures -------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    from cifarlab.report.curves import save_figure  # lazy: report imports this module

    return save_figure(fig, path, dpi=110)


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    return fig, fig.subplots()


def _log_if_wide(ax, values) -> None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) and v.min() > 0 and v.max() / v.min() > 50:  # early spikes dwarf the rest
        ax.set_yscale("log")


def _band(ax, x, lo, hi, color, label, smooth):
    """The raw band faint, its moving average on top (with edge lines)."""
    if smooth > 1:
        ax.fill_between(x, lo, hi, alpha=0.12, color=color, lw=0)
        lo, hi = _smooth(lo, smooth), _smooth(hi, smooth)
    ax.fill_between(x, lo, hi, alpha=0.4, color=color, label=label, lw=0)
    ax.plot(x, lo, color=color, lw=0.6)
    ax.plot(x, hi, color=color, lw=0.6)


def _finish(ax, fig, title, ylabel, path) -> Path:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def _models_in(df: pd.DataFrame):
    return sorted(df.groupby("model"), key=lambda t: (has_bn(t[0]), t[0]))


def plot_landscape(band: pd.DataFrame, runs: pd.DataFrame, path: str | Path, seed=None, smooth: int | None = None,
                   title: str = "") -> Path:
    """The course figure for one seed: per model, the min..max training loss over the rates."""
    fig, ax = _figure()
    band, runs = _with_seed(band, 0), _with_seed(runs, 0)
    if seed is not None:
        band, runs = band[band["seed"] == seed], runs[runs["seed"] == seed]
    window = smooth if smooth is not None else auto_window(band.groupby("model").size().max() if len(band) else 0)
    for i, (model, b) in enumerate(_models_in(band)):
        st = _style(model, i)
        r = runs[runs["model"] == model]
        label = f"{model} (lr {', '.join(f'{v:g}' for v in r['lr'])})"
        div = r[r["diverged"].astype(str).str.lower() == "true"]
        if len(div):
            label += "\ndiverged: " + ", ".join(f"lr {lr:g} at step {int(s)}"
                                                for lr, s in zip(div["lr"], div["diverged_step"]))
            for s in div["diverged_step"]:
                ax.axvline(int(s), color=st["color"], ls=":", lw=1)
        _band(ax, b["step"].to_numpy(), b["min"].to_numpy(float), b["max"].to_numpy(float), st["color"], label,
              window)
    _log_if_wide(ax, band[["min", "max"]].to_numpy(float))
    head = title or ("Loss landscape (course): min-max band of the training loss over the learning rates"
                     + (f", seed {seed}" if seed is not None else ""))
    if window > 1:
        head += f"\nevery step: raw band faint, moving average over {window} steps on top"
    return _finish(ax, fig, head, "training loss", path)


def plot_course(band: pd.DataFrame, quantity: str, path: str | Path, seed=None, smooth: int | None = None) -> Path:
    """The course's gradient predictiveness band ("predictiveness") or beta curve ("beta")."""
    if quantity not in ("predictiveness", "beta"):
        raise ValueError("quantity must be 'predictiveness' or 'beta'")
    fig, ax = _figure()
    band = _with_seed(band, 0)
    if seed is not None:
        band = band[band["seed"] == seed]
    window = smooth if smooth is not None else auto_window(band.groupby("model").size().max() if len(band) else 0)
    for i, (model, b) in enumerate(_models_in(band)):
        st = _style(model, i)
        x = b["step"].to_numpy()
        label = f"{model} ({'with' if has_bn(model) else 'without'} BN)"
        if quantity == "predictiveness" and "change_min" in b:
            _band(ax, x, b["change_min"].to_numpy(float), b["change_max"].to_numpy(float), st["color"], label, window)
        elif quantity == "beta" and "beta" in b:
            y = b["beta"].to_numpy(float)
            if window > 1:
                ax.plot(x, y, color=st["color"], lw=0.5, alpha=0.2)
            ax.plot(x, _smooth(y, window), color=st["color"], lw=1.2, label=label)
    col = ["change_min", "change_max"] if quantity == "predictiveness" else ["beta"]
    _log_if_wide(ax, band[[c for c in col if c in band]].to_numpy(float))
    if quantity == "predictiveness":
        head, ylabel = ("Gradient predictiveness (course): min-max over the rates of ||g_t - g_(t-1)||", "l2 distance")
    else:
        head, ylabel = ("Effective beta-smoothness (course): max over the rates of "
                        "||g_t - g_(t-1)|| / ||w_t - w_(t-1)||", "beta")
    head += (f", seed {seed}" if seed is not None else "") + (f"\nraw faint, moving average over {window} steps"
                                                              if window > 1 else "")
    return _finish(ax, fig, head, ylabel, path)


def plot_probe(probes: pd.DataFrame, quantity: str, path: str | Path, seed=None, title: str = "") -> Path:
    """One Santurkar quantity for every model: a band over the step sizes, or beta as a line."""
    if quantity not in PROBE_LABELS:
        raise ValueError(f"quantity must be one of {list(PROBE_LABELS)}")
    if seed is not None and "seed" in probes:
        probes = probes[probes["seed"] == seed]
    kind = probe_kind(probes)
    per = probe_steps(probes, kind)
    fig, ax = _figure()
    for i, (model, s) in enumerate(_models_in(per)):
        st = _style(model, i)
        x = s["step"].to_numpy()
        label = f"{model} ({'with' if has_bn(model) else 'without'} BN)"
        if quantity == "beta":
            ax.plot(x, s["beta"].to_numpy(float), marker=".", color=st["color"], label=label)
        else:
            _band(ax, x, s[f"{quantity}_min"].to_numpy(float), s[f"{quantity}_max"].to_numpy(float), st["color"],
                  label, 1)
    head, ylabel = PROBE_LABELS[quantity]
    sel = probes[probes["kind"] == kind] if "kind" in probes else probes
    if kind == "rel" and "eta_rel" in sel:
        sizes = sorted({round(float(e), 6) for e in sel["eta_rel"]})
        what = f"relative steps: eta ||g|| = eta_rel x lr sqrt(P), eta_rel in {{{', '.join(f'{e:g}' for e in sizes)}}}"
    else:
        sizes = sorted({float(e) for e in sel["eta"]}) if len(sel) else []
        what = f"absolute steps: eta in {{{', '.join(f'{e:g}' for e in sizes)}}}"
    ax.set_xlabel("training step")
    vals = per["beta"] if quantity == "beta" else per.get(f"{quantity}_max", pd.Series(dtype=float))
    _log_if_wide(ax, vals)
    return _finish(ax, fig, (title or head) + (f", seed {seed}" if seed is not None else "") + "\n" + what, ylabel,
                   path)


def draw_study(run_dir: str | Path, out_dir: str | Path, models, seeds, prefix: str = "", smooth: int | None = None,
               default_seed=None) -> dict[str, Path]:
    """Every figure of a study, per seed: ``{"<figure>_seed<s>": path}`` (FIGURES names the six)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    loaded = load_landscape(run_dir, default_seed)
    probes = load_probes(probe_dirs(run_dir, models, seeds))
    for seed in seeds:
        tag = f"seed{seed}"
        if loaded is not None and (loaded[0]["seed"] == seed).any():
            band, runs = loaded
            figs[f"landscape_{tag}"] = plot_landscape(band, runs, out_dir / f"{prefix}landscape_{tag}.png", seed,
                                                      smooth)
            if "change_max" in band:
                for q in ("predictiveness", "beta"):
                    figs[f"course_{q}_{tag}"] = plot_course(band, q, out_dir / f"{prefix}course_{q}_{tag}.png",
                                                            seed, smooth)
        if len(probes) and (probes["seed"] == seed).any():
            for q in PROBE_LABELS:
                figs[f"probe_{q}_{tag}"] = plot_probe(probes, q, out_dir / f"{prefix}probe_{q}_{tag}.png", seed)
    return figs


def study_numbers(run_dir: str | Path, models, seeds, default_seed=None) -> dict:
    """landscape and probe stats per (model, seed), the answers per pair and seed, the sentences."""
    run_dir = Path(run_dir)
    land, probe = {}, {}
    loaded = load_landscape(run_dir, default_seed)
    if loaded is not None:
        land = landscape_stats(*loaded, load_losses(run_dir, default_seed))
    probes = load_probes(probe_dirs(run_dir, models, seeds))
    if len(probes):
        probe = probe_stats(probes)
    ans = answers(land, probe, models, seeds)
    return {"landscape": land, "probes": probe, "answers": ans, "comparison": comparison_lines(ans)}
