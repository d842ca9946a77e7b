"""The BatchNorm study (course project part 2; Santurkar et al. 2018) in the report.

Study runs are the run directories written by ``run_study`` / ``python -m cifarlab bn``
(summary.json with "study": "bn"; grid/bn.txt puts them in log/bn/). For each: the setup,
hardware, wall time and command; per model pair and seed a table of medians with the yes/no
answer to each question (is BN's band narrower, are its gradients more predictive, is its beta
smaller), under Santurkar's definition and the course's, and the evidence when BN's advantage
does not show; which definition each figure uses; the figures of every seed; the numbers per
model and seed; the probe overhead when the study measured it. Figures and numbers are redrawn
from the CSVs, so the section is the same whenever it is rebuilt from the same runs.
"""
from __future__ import annotations

import math
from pathlib import Path

from cifarlab.report.build import DASH, find_runs, fmt_duration
from cifarlab.report.registry import register_section

DEFINITIONS = [
    "Loss landscape (course): one model per learning rate from the same initial weights on the same batches; at "
    "every step the min and the max of their training losses, the band between them shaded.",
    "Gradient predictiveness (course): ||g_t - g_(t-1)||, the change between the gradients of consecutive training "
    "steps (each at its own weights, on its own batch), min..max over the rates at every step.",
    "Effective beta-smoothness (course): at every step the max over the rates of ||g_t - g_(t-1)|| / "
    "||w_t - w_(t-1)||, the difference in gradient over the distance moved.",
    "Santurkar's probes (probe_*.png): every K steps of a probe run, on that step's batch, move from w along the "
    "mini-batch gradient g by step sizes eta: the band over eta of L(w - eta g) (loss) and of "
    "||grad L(w) - grad L(w - eta g)|| (gradient predictiveness), and beta = max over eta of that difference over "
    "||eta g||. The figures and answers use relative step sizes: eta ||g|| = eta_rel x lr sqrt(P) (a fraction of "
    "the length of one Adam step that moves each of the P weights by lr, the paper's 'up to 0.4 times the gradient "
    "step'), so both networks of a pair are moved by the same distances; absolute etas are recorded beside them. "
    "BatchNorm in train mode (batch statistics), fp32, the reference gradient at w with the same dropout mask as "
    "the shifted ones.",
]


def _is_study(run) -> bool:
    return run.summary.get("study") == "bn" or (run.path / "study.yaml").is_file()


def _num(v, digits: int = 4) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return DASH
    return f"{v:.{digits}g}"


def _pct(v) -> str:
    return _num(v, 3) + "%" if _num(v) != DASH else DASH


def _units_table(models, seeds, land: dict, probe: dict, summary: dict) -> str:
    from cifarlab.batchnorm.figures import has_bn, unit

    head = ("| model | seed | BN | band width median | diverged rates | rates without progress | course "
            "\\|\\|g_t - g_(t-1)\\|\\| median | course beta median | probes | beta median (relative) | "
            "beta median (absolute) | median \\|\\|g\\|\\| | probe run test acc | probe time |")
    lines = [head, "|" + "---|" * 14]
    acc, over = summary.get("probe_test_acc") or {}, summary.get("probe_overhead_pct") or {}
    for m in models:
        for s in seeds:
            k = unit(m, s)
            a, p = land.get(k, {}), probe.get(k, {})
            div = ", ".join(f"{lr:g} (step {st})" for lr, st in a.get("diverged", [])) or "none"
            stuck = ", ".join(f"{lr:g}" for lr in a.get("no_progress", [])) or "none"
            ac = acc.get(k, acc.get(m))
            rel = p.get("beta_median") if p.get("kind") == "rel" else None
            lines.append(f"| {m} | {s} | {'yes' if has_bn(m) else 'no'} | {_num(a.get('band_width_median'))} | "
                         f"{div if a else DASH} | {stuck if a else DASH} | {_num(a.get('course_change_max_median'))} | "
                         f"{_num(a.get('course_beta_median'))} | {p.get('probes', DASH)} | {_num(rel)} | "
                         f"{_num(p.get('beta_abs_median'))} | {_num(p.get('grad_norm_median'))} | "
                         f"{_pct(100 * ac) if isinstance(ac, (int, float)) else DASH} | {_pct(over.get(k, over.get(m)))} |")
    return "\n".join(lines)


def _overhead_block(summary: dict) -> str | None:
    rows = summary.get("overhead")
    if not rows:
        return None
    lines = [f"Probe overhead, measured by this study (`--overhead`): per model a training run with the probe "
             f"callback every K steps and the same run without it, one after the other in one process (the probed "
             f"run first), {summary.get('hardware', DASH)}. Overhead = epoch time with probes / without - 1, over "
             f"the epochs compared (epoch 1 left out when there are more: it carries each run's warm-up); the timer "
             f"column is the callback's own clock (probe time / the rest of the epoch).", "",
             "| model | K | epochs compared | probes | without probes | with probes | overhead | timer | same weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['interval']} | {r.get('epochs_compared') or DASH} | {r.get('probes', DASH)} | "
                     f"{fmt_duration(r.get('plain_s'))} | {fmt_duration(r.get('probed_s'))} | "
                     f"{_pct(r.get('overhead_pct'))} | {_pct(r.get('timer_pct'))} | "
                     f"{'yes' if r.get('same_weights') else ('no' if r.get('same_weights') is False else DASH)} |")
    return "\n".join(lines)


def _one_study(run, img_dir: Path) -> str:
    from cifarlab.batchnorm import figures as F

    s = run.summary
    slug = run.name if run.group == "bn" else f"{run.group}_{run.name}".replace("/", "_")
    seeds = list(s.get("seeds") or [s.get("seed", 0)])
    models = list(s.get("models") or [])
    out = [f"### {run.group}/{run.name}"]
    if not s.get("finished"):
        out.append("_Unfinished study: the numbers below cover what has been written so far._")
    images = s.get("train_images")
    if isinstance(images, dict):
        images = ", ".join(sorted({str(v) for v in images.values()})) or None
    prec = s.get("precision") or {}
    interval = s.get("probe_interval")
    counts = sorted({p.get("probes") for p in (s.get("probes") or {}).values() if p.get("probes") is not None})
    rel = s.get("probe_rel_etas")
    out.append(
        f"Dataset **{s.get('dataset', DASH)}**, {images or s.get('train_subset') or 'all'} training images, "
        f"{s.get('epochs', DASH)} epoch(s), batch {s.get('batch_size', DASH)}, Adam, learning rates "
        f"{', '.join(f'{v:g}' for v in s.get('lrs', []))}, seed(s) {', '.join(str(v) for v in seeds)}; training in "
        f"{prec.get('training', DASH)}, probes in {prec.get('probes', 'the training precision')}. Probe runs at lr "
        f"{_num(s.get('probe_lr'))} every {interval if interval is not None else DASH} steps "
        f"({', '.join(str(c) for c in counts) or DASH} probed steps per run), absolute eta in "
        f"{{{', '.join(f'{v:g}' for v in s.get('probe_etas', []))}}}"
        + (f", relative eta_rel in {{{', '.join(f'{v:g}' for v in rel)}}}" if rel else "") + ".")
    out.append(f"Hardware: {s.get('hardware', DASH)}. Wall time: {fmt_duration(s.get('wall_time_s'))} of training "
               f"and probing over all stages.")
    if s.get("command"):
        out.append(f"Command:\n\n```\n{s['command']}\n```")
    if not models:
        return "\n\n".join(out + ["_No models recorded._"])
    numbers = F.study_numbers(run.path, models, seeds, default_seed=seeds[0])
    land, probe = numbers["landscape"], numbers["probes"]
    if not land and not probe:
        block = _overhead_block(s)
        out.append(block or "_No landscape or probe files yet._")
        return "\n\n".join(out)
    for rec in numbers["answers"]:
        block = [f"**{rec['bn']} (BN) vs {rec['plain']}, seed {rec['seed']}**", F.answers_table(rec)]
        if rec["notes"]:
            block.append("Evidence where BN's advantage does not show: " + "; ".join(rec["notes"]) + ".")
        out.append("\n\n".join(block))
    out.append("Which definition each figure uses:\n\n" + "\n".join(f"- {d}" for d in DEFINITIONS))
    figs = F.draw_study(run.path, img_dir, models, seeds, prefix=f"bn_{slug}_", smooth=s.get("smooth"),
                        default_seed=seeds[0])
    for seed in seeds:
        shown = [(name, path) for name, path in figs.items() if name.endswith(f"_seed{seed}")]
        if shown:
            out.append(f"Seed {seed}:\n\n" + "\n".join(f"![{name}](img/{Path(path).name})" for name, path in shown))
    out.append(_units_table(models, seeds, land, probe, s))
    block = _overhead_block(s)
    if block:
        out.append(block)
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
    intro = ("VGG-A with and without BatchNorm (course project part 2): the light pair (vgg_a_light, "
             "vgg_a_light_bn: 16/32 channels) trained to convergence on a CPU, and the full VGG-A pair. For each "
             "pair and seed the three questions (is BN's loss band narrower, are its gradients more predictive, is "
             "its beta smaller) are answered with numbers under the course's definitions (from the landscape runs) "
             "and Santurkar et al.'s (2018, from the probe runs).")
    parts = [intro] + [_one_study(r, img_dir) for r in studies]
    return "\n\n".join(parts + ([overhead] if overhead else []))
