"""The BatchNorm study (course project part 2; Santurkar et al. 2018) in the report.

Study runs are the run directories written by ``python -m cifarlab bn`` (summary.json with
"study": "bn"; grid/bn.txt puts them in log/bn/). For each: the landscape figure (min-max band
of the training loss over the learning rates, with and without BN), the three probe figures,
a table of the numbers, and one sentence per question: is BN's band narrower, its beta
smaller, its gradient more predictive. Figures are redrawn from the CSVs, so the section is
the same whenever it is rebuilt from the same runs.
"""
from __future__ import annotations

import math
from pathlib import Path

from cifarlab.report.build import DASH, find_runs, fmt_duration
from cifarlab.report.registry import register_section


def _is_study(run) -> bool:
    return run.summary.get("study") == "bn" or (run.path / "study.yaml").is_file()


def _num(v, digits: int = 4) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return DASH
    return f"{v:.{digits}g}"


def _table(models: list[str], land: dict, probe: dict, summary: dict) -> str:
    head = ("| model | BN | band width mean | band width median | diverged rates | rates without progress | "
            "beta median | beta mean | median \\|\\|g\\|\\| | max grad diff (mean) | loss spread along -g | "
            "probe run test acc | probe overhead |")
    lines = [head, "|" + "---|" * 13]
    overhead, acc = summary.get("probe_overhead_pct") or {}, summary.get("probe_test_acc") or {}
    for m in models:
        a, p = land.get(m, {}), probe.get(m, {})
        div = ", ".join(f"{lr:g} (step {s})" for lr, s in a.get("diverged", [])) or "none"
        stuck = ", ".join(f"{lr:g}" for lr in a.get("no_progress", [])) or "none"
        ov, ac = overhead.get(m), acc.get(m)
        lines.append(f"| {m} | {'yes' if '_bn' in m else 'no'} | {_num(a.get('band_width_mean'))} | "
                     f"{_num(a.get('band_width_median'))} | {div if a else DASH} | {stuck if a else DASH} | "
                     f"{_num(p.get('beta_median'))} | {_num(p.get('beta_mean'))} | {_num(p.get('grad_norm_median'))} | "
                     f"{_num(p.get('grad_diff_max_mean'))} | {_num(p.get('loss_spread_mean'))} | "
                     f"{_num(100 * ac, 3) + '%' if _num(ac) != DASH else DASH} | "
                     f"{_num(ov, 3) + '%' if _num(ov) != DASH else DASH} |")
    return "\n".join(lines)


def _one_study(run, img_dir: Path) -> str:
    from cifarlab.batchnorm import figures as F

    s = run.summary
    slug = run.name if run.group == "bn" else f"{run.group}_{run.name}".replace("/", "_")
    models = list(s.get("models") or [])
    out = [f"### {run.group}/{run.name}"]
    if not s.get("finished"):
        out.append("_Unfinished study: the numbers below cover what has been written so far._")
    setup = (f"Dataset **{s.get('dataset', DASH)}**, {s.get('train_images') or s.get('train_subset') or DASH} "
             f"training images, {s.get('epochs', DASH)} epoch(s), batch {s.get('batch_size', DASH)}, Adam, "
             f"learning rates {', '.join(f'{v:g}' for v in s.get('lrs', []))}, seed {s.get('seed', DASH)}; "
             f"probes at lr {_num(s.get('probe_lr'))} every {s.get('probe_interval', DASH)} steps with "
             f"eta in {{{', '.join(f'{v:g}' for v in s.get('probe_etas', []))}}}. "
             f"Hardware: {s.get('hardware', DASH)}; wall time {fmt_duration(s.get('wall_time_s'))}.")
    out.append(setup)
    if s.get("command"):
        out.append(f"Command:\n\n```\n{s['command']}\n```")
    loaded = F.load_landscape(run.path)
    land, probe = {}, {}
    if loaded is not None:
        band, runs = loaded
        name = f"bn_{slug}_landscape.png"
        F.plot_landscape(band, runs, img_dir / name, smooth=int((s.get("smooth") or 1)))
        out.append(f"![loss landscape](img/{name})")
        land = F.landscape_stats(band, runs, F.load_losses(run.path))
        models = models or sorted(land)
    probes = F.load_probes({m: run.path / "probes" / m for m in models})
    if len(probes):
        for q in ("loss", "grad_diff", "beta"):
            name = f"bn_{slug}_probe_{q}.png"
            F.plot_probe(probes, q, img_dir / name)
            out.append(f"![{q}](img/{name})")
        probe = F.probe_stats(probes)
    if not land and not probe:
        out.append("_No landscape or probe files yet._")
        return "\n\n".join(out)
    out.append(_table(models, land, probe, s))
    out.append("Band width: mean over the steps (with at least two rates still finite) of the max minus the "
               "min training loss over the rates; a rate that diverged leaves the band from its divergence "
               "step on. beta: max over eta of ||grad L(w) - grad L(w - eta g)|| / ||eta g||, per probed step.")
    lines = F.comparison_lines(land, probe)
    if lines:
        out.append("\n".join(f"- {line}" for line in lines))
    sp = s.get("speedup")
    if isinstance(sp, dict) and sp.get("speedup"):
        out.append(f"Concurrent training (vmap over the {sp['models']} rates' stacked parameters) against one "
                   f"rate after another, {sp['steps']} step(s) of {sp.get('model', DASH)} on {sp.get('device', DASH)}: "
                   f"{sp['sequential_s']:.2f}s sequential vs {sp['concurrent_s']:.2f}s concurrent, "
                   f"speed-up x{sp['speedup']:.2f}.")
    return "\n\n".join(out)


def _overhead(runs) -> str | None:
    """Probe overhead of ordinary training runs with probes (config probe_interval > 0): the
    callback's own timer, and the epoch time against a run that differs only in probe_interval."""
    probed = [r for r in runs if not _is_study(r) and (r.config.get("probe_interval") or 0) > 0
              and r.summary.get("probe_overhead_pct") is not None]
    if not probed:
        return None

    def key(run):
        return {k: v for k, v in run.config.items() if k not in ("probe_interval", "run_dir", "run_name", "resume")}

    lines = ["Probe overhead (training runs with and without the probe callback; the timer measures the time "
             "spent inside the probes against the rest of the epoch):", "",
             "| run | model | dataset | train images | interval | probes | overhead (timer) | epoch time vs run without probes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in probed:
        twin = next((o for o in runs if o is not r and (o.config.get("probe_interval") or 0) == 0
                     and key(o) == key(r)), None)
        ab = DASH
        if twin is not None:
            t1, t0 = sum(r.metrics.get("epoch_time_s", [])), sum(twin.metrics.get("epoch_time_s", []))
            if t0 > 0:
                ab = f"{t1:.1f}s vs {t0:.1f}s ({100 * (t1 / t0 - 1):+.1f}%, {twin.name})"
        lines.append(f"| {r.group}/{r.name} | {r.model} | {r.dataset} | {r.summary.get('train_images', DASH)} | "
                     f"{r.config.get('probe_interval')} | {r.summary.get('probe_count', DASH)} | "
                     f"{_num(r.summary.get('probe_overhead_pct'), 3)}% | {ab} |")
    return "\n".join(lines)


@register_section("BatchNorm study", order=30)
def bn_section(log_root: Path, img_dir: Path) -> str | None:
    runs = find_runs(log_root)
    studies = [r for r in runs if _is_study(r)]
    overhead = _overhead(runs)
    if not studies and overhead is None:
        return None
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    intro = ("VGG-A with and without BatchNorm (course project part 2). Loss landscape: one model per "
             "learning rate, the training loss at every step, the band between the min and max over the "
             "rates. Probes (Santurkar et al. 2018) every K steps on the current batch, moving along the "
             "mini-batch gradient g: the loss L(w - eta g), gradient predictiveness "
             "||grad L(w) - grad L(w - eta g)|| and the effective beta-smoothness.")
    parts = [intro] + [_one_study(r, img_dir) for r in studies]
    return "\n\n".join(parts + ([overhead] if overhead else []))
