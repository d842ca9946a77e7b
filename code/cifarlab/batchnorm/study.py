"""The BatchNorm study (course project part 2; Santurkar et al. 2018): ``run_study(...)``.

One call runs the whole study into one run directory (default log/bn/<models joined by '-'>);
notebook 04, ``python -m cifarlab bn`` (commands/bn.py) and the tests call it with keywords:

    from cifarlab.batchnorm import run_study
    result = run_study(models=("vgg_a_light", "vgg_a_light_bn"), dataset="fashion", epochs=5,
                       seeds=(0, 1), run_dir="log/bn/vgg_a_light-fashion")
    result.answers, result.figures, result.summary

Stages, per seed (the seed sets the initial weights, the data order and any subset):
1. Loss landscape (landscape.py): for every model, one model per rate in ``lrs`` (Adam, the
   course recipe ``bn``: no augmentation, no weight decay), the training loss of every step and
   the course's ||g_t - g_(t-1)|| and ||w_t - w_(t-1)||; the rates train concurrently (vmap) on a
   GPU and one after another on a CPU (``schedule``; same results). Files: landscape_losses.csv.gz,
   landscape_runs.csv, landscape_band.csv (one block per model and seed).
2. Probes (probe_callback.py): for every model one ordinary Trainer run at ``probe_lr`` with the
   probes every ``probe_interval`` steps (default: enough for ``probe_count`` probed steps), into
   probes/<model>/seed<s>/ (a full run directory with probes.csv), at the absolute ``etas`` and at
   ``relative_etas`` (fractions of the gradient step lr * sqrt(P)); the answers use the latter.
Then, once (first seed), when ``overhead=True``:
3. Probe overhead: per model, a training run with the probe callback at ``overhead_interval``
   (the callback's default) and the same run without it, into overhead/<model>/{probed,plain}/;
   their epoch times, the callback's own timer, and whether both end with the same weights.
Last: the figures of every seed (figures.py), summary.json ("finished": true) with the numbers
per (model, seed), the answers per model pair and seed, hardware, wall time and the command.

Divergence is part of the science: a rate whose loss turns non-finite is recorded as diverged
from that step and leaves the band; the study itself still finishes ("diverged": false).

Resume (``resume=True``; what train.sh passes when the folder holds config.yaml): the study's
settings must match study.yaml; every finished landscape (model, seed) is kept and only the
missing ones are trained (an unfinished one restarts: it is not checkpointed); each probe or
overhead run is skipped when finished and otherwise resumes from its own checkpoint through the
Trainer. A finished study is refused, as a finished training run is; ``load_study`` reads it.
The run directory is locked while the study runs.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from cifarlab.batchnorm.probe_callback import DEFAULT_ETAS, DEFAULT_PROBE_INTERVAL, DEFAULT_REL_ETAS
from cifarlab.errors import ConfigError, RunDirError
from cifarlab.machine import hardware_label

DEFAULT_MODELS = ("vgg_a_light", "vgg_a_light_bn")
DEFAULT_LRS = (1e-3, 2e-3, 1e-4, 5e-4)  # the course's example rates (Adam)
DEFAULT_SEEDS = (0, 1)
DEFAULT_DATASET = "fashion"
DEFAULT_EPOCHS = 5
DEFAULT_PROBE_COUNT = 60  # probed steps per probe run when the interval is left to the study
SCHEDULES = ("auto", "concurrent", "sequential")
STUDY_FILE = "study.yaml"
META_FILE = "landscape_meta.json"
# keys of study.yaml that a resumed study must repeat (else its parts would not fit together)
RESUME_KEYS = ("models", "lrs", "seeds", "dataset", "epochs", "batch_size", "train_subset", "probe_lr",
               "etas", "relative_etas", "probe_interval", "probe_count")


@dataclass
class StudyResult:
    """What ``run_study`` and ``load_study`` return: the run directory, summary.json's content,
    the figures (name -> path) and the answers (one record per model pair and seed)."""
    run_dir: Path
    summary: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.summary.get("finished"))

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def comparison(self) -> list[str]:
        return list(self.summary.get("comparison") or [])

    def tables(self) -> str:
        """The answers as markdown tables, one per model pair and seed."""
        from cifarlab.batchnorm.figures import answers_table

        return "\n\n".join(f"**{a['bn']} vs {a['plain']}, seed {a['seed']}**\n\n{answers_table(a)}"
                           for a in self.answers)


def load_study(run_dir: str | Path) -> StudyResult:
    """The result of a study already in ``run_dir`` (finished or not) from its summary.json, with
    the answers recomputed from its CSVs under the current definitions, as the report does: a
    study written by an older version shows the same answers in a notebook as in report/."""
    from cifarlab.batchnorm import figures as F

    run_dir = Path(run_dir)
    f = run_dir / "summary.json"
    if not f.is_file():
        raise RunDirError(f"{run_dir} holds no BatchNorm study summary (summary.json)")
    s = json.loads(f.read_text())
    models, seeds = list(s.get("models") or []), list(s.get("seeds") or [s.get("seed", 0)])
    if models:
        numbers = F.study_numbers(run_dir, models, seeds, default_seed=seeds[0])
        if numbers["landscape"] or numbers["probes"]:
            s = {**s, "answers": numbers["answers"], "comparison": numbers["comparison"]}
    return StudyResult(run_dir, s, {k: run_dir / v for k, v in (s.get("figures") or {}).items()},
                       list(s.get("answers") or []))


# -- checking the request ----------------------------------------------------------------------
def _names(models) -> list[str]:
    from cifarlab.models import available_models

    if isinstance(models, str):
        models = [m for m in models.replace(" ", ",").split(",") if m]
    models = [str(m).strip().lower() for m in models]
    if not models:
        raise ConfigError("the study needs at least one model")
    unknown = [m for m in models if m not in available_models()]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(available_models())}")
    if len(set(models)) != len(models):
        raise ConfigError(f"the models list names a model twice: {models}")
    return models


def _seeds(seeds) -> list[int]:
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds must be integers, got {seeds!r}") from None
    if not out:
        raise ConfigError("the study needs at least one seed")
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds lists a seed twice: {out}")
    return out


def _check(probe_count, probe_interval, overhead_interval, check_every, speedup_steps, smooth, schedule) -> None:
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(probe_count) or probe_count <= 0:
        raise ConfigError(f"probe_count must be a positive integer, got {probe_count!r}")
    if probe_interval is not None and (not integer(probe_interval) or probe_interval < 0):
        raise ConfigError(f"probe_interval must be a non-negative integer (0 = no probes), got {probe_interval!r}")
    if not integer(overhead_interval) or overhead_interval <= 0:
        raise ConfigError(f"overhead_interval must be a positive integer, got {overhead_interval!r}")
    if not integer(check_every) or check_every <= 0:
        raise ConfigError(f"check_every must be a positive integer, got {check_every!r}")
    if not integer(speedup_steps) or speedup_steps < 0:
        raise ConfigError(f"speedup_steps must be a non-negative integer, got {speedup_steps!r}")
    if smooth is not None and (not integer(smooth) or smooth <= 0):
        raise ConfigError(f"smooth must be a positive integer (1 = raw), got {smooth!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


# -- the run directory -------------------------------------------------------------------------
class _Log:
    """Print a line (or hand it to the caller's ``log``) and append it to log.txt."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None):
        self.path, self.echo = path, echo

    def __call__(self, msg: str) -> None:
        if self.echo is None:
            print(msg, flush=True)
        else:
            self.echo(msg)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def _prepare(run_dir: Path, resume: bool, settings: dict) -> None:
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            done = json.loads(summary.read_text()).get("finished")
        except ValueError:
            done = False
        if done:
            raise RunDirError(f"{run_dir} holds a finished study; choose another run directory or remove it "
                              f"(load_study reads it)")
    holds = any((run_dir / n).exists() for n in ("config.yaml", STUDY_FILE, "landscape_runs.csv", "probes",
                                                  "overhead"))
    if holds and not resume:
        raise RunDirError(f"{run_dir} already holds an unfinished study; pass --resume (resume=True) to "
                          f"continue it or choose another run directory")
    if resume and (run_dir / STUDY_FILE).is_file():
        saved = yaml.safe_load((run_dir / STUDY_FILE).read_text()) or {}
        for key in RESUME_KEYS:
            if key in saved and saved[key] != settings[key]:
                raise ConfigError(f"resume: {key} {settings[key]} differs from the study's {saved[key]} "
                                  f"in {run_dir / STUDY_FILE}")
    run_dir.mkdir(parents=True, exist_ok=True)


def _finished_run(path: Path) -> dict | None:
    f = path / "summary.json"
    if not f.is_file():
        return None
    try:
        s = json.loads(f.read_text())
    except ValueError:
        return None
    return s if s.get("finished") else None


def cli_command(settings: dict, extra: dict[str, Any], run_dir: Path, cfg=None) -> str:
    """The study as a ``python -m cifarlab bn`` command (what the report shows and reruns)."""
    import shlex

    from cifarlab.paths import project_root

    def num(v) -> str:
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, (list, tuple)) \
            else (f"{v:g}" if isinstance(v, float) else str(v))

    parts = ["python", "-m", "cifarlab", "bn", "--models", ",".join(settings["models"]),
             "--dataset", settings["dataset"], "--epochs", str(settings["epochs"]), "--seeds", num(settings["seeds"]),
             "--lrs", num(settings["lrs"]), "--batch-size", str(settings["batch_size"])]
    for key in ("train_subset", "test_subset"):
        if settings.get(key) is not None:
            parts += ["--" + key.replace("_", "-"), str(settings[key])]
    if settings["probe_lr"] != settings["lrs"][0]:
        parts += ["--probe-lr", num(settings["probe_lr"])]
    if settings["probe_interval"] is not None:
        parts += ["--probe-interval", str(settings["probe_interval"])]
    if settings["probe_count"] != DEFAULT_PROBE_COUNT:
        parts += ["--probe-count", str(settings["probe_count"])]
    if settings["etas"] != list(DEFAULT_ETAS):
        parts += ["--probe-steps", num(settings["etas"])]
    if settings["relative_etas"] != list(DEFAULT_REL_ETAS):
        parts += ["--probe-rel-steps", num(settings["relative_etas"])]
    for key, flag in (("landscape", "--no-landscape"), ("probes", "--no-probes")):
        if not settings[key]:
            parts.append(flag)
    if settings["overhead"]:
        parts.append("--overhead")
        if settings["overhead_interval"] != DEFAULT_PROBE_INTERVAL:
            parts += ["--overhead-interval", str(settings["overhead_interval"])]
    for key, default in (("schedule", "auto"), ("speedup_steps", 0), ("check_every", 50), ("smooth", None)):
        if settings[key] != default:
            parts += ["--" + key.replace("_", "-"), str(settings[key])]
    for key in ("device", "amp"):
        if cfg is not None and getattr(cfg, key) != "auto":
            parts += ["--" + key, getattr(cfg, key)]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            parts += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        elif value is not None:
            parts += [flag, num(value)]
    try:
        shown = os.path.relpath(run_dir.resolve(), project_root())
        shown = shown if not shown.startswith("..") else str(run_dir)
    except ValueError:
        shown = str(run_dir)
    parts += ["--run-dir", shown]
    return " ".join(shlex.quote(p) for p in parts)


# -- the stages ----------------------------------------------------------------------------------
class _Data:
    """The training loader of each seed, built once (the landscape and the probe sizing share it)."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def get(self, cfg):
        from cifarlab.data import build_loaders

        if cfg.seed not in self.cache:
            self.cache[cfg.seed] = build_loaders(cfg, self.device)
        return self.cache[cfg.seed]


def _landscape_unit(cfg, name: str, settings: dict, data: _Data, device, precision, log):
    import torch

    from cifarlab.batchnorm import landscape as L
    from cifarlab.models import build_model
    from cifarlab.train.losses import build_loss
    from cifarlab.train.precision import Precision, autocast

    concurrent = settings["schedule"] == "concurrent" or (settings["schedule"] == "auto" and device.type == "cuda")
    # vmap over a BatchNorm under CPU bf16 autocast fails in PyTorch (mixed-dtype batch_norm has no
    # batching rule there), so concurrent training on a CPU, and the speed-up timing, run in fp32
    fp32 = Precision("off", "vmap on a CPU: fp32")
    land_precision = fp32 if (concurrent and device.type == "cpu") else precision
    timing_precision = fp32 if device.type == "cpu" else precision
    bundle = data.get(cfg)
    info, loader = bundle.info, bundle.train

    # channels_last as the Trainer uses it (oneDNN's layout on CPU: vgg_a_light's sequential
    # landscape measured 1,050 -> 2,910 img/s on one core); not under vmap
    channels_last = cfg.channels_last in ("on", "auto") and not concurrent
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def batches(epoch):
        loader.set_epoch(epoch)
        return ((x.contiguous(memory_format=fmt), y) for x, y in loader)

    def build():
        return build_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                           **(cfg.model_kwargs or {})).to(memory_format=fmt)

    log(f"landscape {name} seed {cfg.seed}: {len(settings['lrs'])} rates {settings['lrs']}, "
        f"{'concurrent (vmap)' if concurrent else 'sequential'}, {cfg.epochs} epoch(s) of {loader.num_samples} "
        f"images, batch {cfg.batch_size}, device {device}, {'bf16' if land_precision.amp == 'bf16' else 'fp32'}")
    run = L.train_landscape(name, build, settings["lrs"], batches, cfg.epochs, loss_fn=build_loss(cfg), seed=cfg.seed,
                            concurrent=concurrent, device=device, betas=tuple(cfg.betas),
                            check_every=settings["check_every"], autocast=lambda: autocast(land_precision, device),
                            progress=log)
    div = [f"lr {lr:g} at step {s}" for lr, s in zip(run.lrs, run.diverged_step) if s is not None]
    log(f"landscape {name} seed {cfg.seed}: {len(run.epochs)} steps in {run.wall_time_s:.1f}s"
        + (f"; diverged: {', '.join(div)}" if div else "; no rate diverged"))
    speedup = None
    if settings["speedup_steps"]:
        loader.set_epoch(1)
        fixed = []
        for x, y in loader:
            fixed.append((x, y))
            if len(fixed) >= settings["speedup_steps"]:
                break
        speedup = L.measure_speedup(build, settings["lrs"], fixed, loss_fn=build_loss(cfg), seed=cfg.seed,
                                    device=device, autocast=lambda: autocast(timing_precision, device))
        speedup.update(model=name, precision="bf16" if timing_precision.amp == "bf16" else "fp32")
        log(f"speed-up {name}: {speedup['steps']} steps x {speedup['models']} rates: sequential "
            f"{speedup['sequential_s']:.2f}s, concurrent {speedup['concurrent_s']:.2f}s -> x{speedup['speedup']:.2f}")
    return run, concurrent, speedup


def _probe_interval(settings: dict, cfg, data: _Data) -> int:
    """The requested interval, or the largest one that still gives ``probe_count`` probed steps."""
    if settings["probe_interval"]:
        return settings["probe_interval"]
    steps = cfg.epochs * len(data.get(cfg).train)
    return max(1, steps // settings["probe_count"])


def _trainer_run(cfg, sub: Path, log, what: str) -> dict:
    from cifarlab.train import Trainer

    done = _finished_run(sub)
    if done is not None:
        log(f"{what}: finished earlier, kept ({sub})")
        return done
    from cifarlab.config import replace

    return Trainer(replace(cfg, run_dir=str(sub), resume=sub.is_dir())).fit()


def _epoch_times(path: Path) -> list[float]:
    import csv

    f = path / "metrics.csv"
    if not f.is_file():
        return []
    with open(f, newline="") as fh:
        return [float(r["epoch_time_s"]) for r in csv.DictReader(fh)]


def _same_weights(a: Path, b: Path) -> bool | None:
    import torch

    fa, fb = a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt"
    if not (fa.is_file() and fb.is_file()):
        return None
    sa = torch.load(fa, map_location="cpu", weights_only=True)["model"]
    sb = torch.load(fb, map_location="cpu", weights_only=True)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _overhead(cfg, name: str, settings: dict, run_dir: Path, log) -> dict:
    """A run with probes at the callback's default interval and the same run without them.

    The probed run goes first, so that any warm-up of the process (allocator, oneDNN kernel
    selection) counts against the probes; epoch 1 is left out of the comparison when there
    are more epochs (it carries the warm-up of each run)."""
    from cifarlab.config import replace

    base = replace(cfg, model=name, lr=settings["probe_lr"], experiment="bn")
    subs = {"probed": run_dir / "overhead" / name / "probed", "plain": run_dir / "overhead" / name / "plain"}
    summaries = {}
    for kind, interval in (("probed", settings["overhead_interval"]), ("plain", 0)):
        log(f"overhead {name}: {kind} run ({'probes every ' + str(interval) + ' steps' if interval else 'no probes'})"
            f" -> {subs[kind]}")
        summaries[kind] = _trainer_run(replace(base, probe_interval=interval, run_name=f"{name}-{kind}"),
                                       subs[kind], log, f"overhead {name} {kind}")
    tp, t0 = _epoch_times(subs["probed"]), _epoch_times(subs["plain"])
    skip = 1 if min(len(tp), len(t0)) > 1 else 0
    sp, s0 = sum(tp[skip:]), sum(t0[skip:])
    out = {"model": name, "interval": settings["overhead_interval"], "epochs": len(tp),
           "epochs_compared": f"{skip + 1}-{len(tp)}" if tp else None,
           "probed_s": sp, "plain_s": s0, "overhead_pct": 100.0 * (sp / s0 - 1) if s0 > 0 else None,
           "timer_pct": summaries["probed"].get("probe_overhead_pct"),
           "probes": summaries["probed"].get("probe_count"),
           "same_weights": _same_weights(subs["probed"], subs["plain"]),
           "images_per_s_plain": (summaries["plain"].get("train_images") or 0) * len(t0) / sum(t0)
           if sum(t0) > 0 else None}
    log(f"overhead {name}: {out['overhead_pct'] if out['overhead_pct'] is None else round(out['overhead_pct'], 2)}% "
        f"epoch time with probes every {out['interval']} steps (timer: {out['timer_pct']}), same weights: "
        f"{out['same_weights']}")
    return out


# -- the study -----------------------------------------------------------------------------------
def run_study(*, models: Iterable[str] | str = DEFAULT_MODELS, dataset: str | None = None,
              lrs: Iterable[float] = DEFAULT_LRS, epochs: int | None = None, seeds: Iterable[int] | None = None,
              run_dir: str | Path | None = None, probe_interval: int | None = None,
              probe_count: int = DEFAULT_PROBE_COUNT, etas: Iterable[float] = DEFAULT_ETAS,
              relative_etas: Iterable[float] = DEFAULT_REL_ETAS, probe_lr: float | None = None,
              batch_size: int | None = None, train_subset: int | None = None, test_subset: int | None = None,
              device: str | None = None, amp: str | None = None, schedule: str = "auto", speedup_steps: int = 0,
              check_every: int = 50, landscape: bool = True, probes: bool = True, overhead: bool = False,
              overhead_interval: int = DEFAULT_PROBE_INTERVAL, smooth: int | None = None, resume: bool = False,
              progress: str | None = None, config: dict[str, Any] | None = None,
              log: Callable[[str], None] | None = None) -> StudyResult:
    """Run the BatchNorm study (see the module docstring) and return its result.

    models: the networks (pairs are found by name: X and X_bn); dataset (default fashion),
    epochs (default 5), batch_size (default 128), seeds (default 0 and 1; with ``config={"seed":
    N}`` that one), lrs: the landscape's Adam rates; probe_lr: the probe runs' rate (default
    lrs[0]); probe_interval: probe every K steps (None: enough for ``probe_count`` probed steps
    per run; 0: no probes); etas / relative_etas: absolute step sizes and fractions of the
    gradient step; overhead: also measure the probe overhead at ``overhead_interval``;
    landscape / probes: run those stages; smooth: moving-average window of the per-step figures
    (None: about 1% of the steps); resume: continue the unfinished study in ``run_dir``;
    config: any other TrainConfig field (data_root, amp, val_fraction, ...); log: where progress
    lines go besides log.txt (default: printed).
    """
    from cifarlab.batchnorm import figures as F
    from cifarlab.batchnorm.landscape import check_lrs
    from cifarlab.batchnorm.probes import check_etas
    from cifarlab.config import TrainConfig, make_config, replace
    from cifarlab.paths import log_dir
    from cifarlab.utils import atomic_write_text

    t_start = time.time()
    models = _names(models)
    lrs = check_lrs(lrs)
    extra = dict(config.to_dict() if isinstance(config, TrainConfig) else (config or {}))
    for key in ("run_dir", "resume", "model", "probe_interval", "probe_steps", "probe_rel_steps", "experiment",
                "run_name"):
        extra.pop(key, None)
    if seeds is None:
        seeds = [extra["seed"]] if extra.get("seed") is not None else DEFAULT_SEEDS
    extra.pop("seed", None)
    seeds = _seeds(seeds)
    _check(probe_count, probe_interval, overhead_interval, check_every, speedup_steps, smooth, schedule)
    etas = check_etas(etas, allow_empty=True)
    rel = check_etas(relative_etas, allow_empty=True, what="relative probe step sizes")
    probes = bool(probes) and probe_interval != 0
    if (probes or overhead) and not (etas or rel):
        raise ConfigError("probe step sizes must not be empty (give etas or relative_etas)")
    if not (landscape or probes or overhead):
        raise ConfigError("landscape, probes and overhead all off leave nothing to do")
    explicit = {k: v for k, v in dict(dataset=dataset, epochs=epochs, batch_size=batch_size,
                                      train_subset=train_subset, test_subset=test_subset, device=device,
                                      amp=amp, progress=progress).items() if v is not None}
    run_dir = Path(run_dir) if run_dir is not None else log_dir() / "bn" / "-".join(models)
    # recipe bn (course: Adam 1e-3, no augmentation, no weight decay), no validation split (the
    # landscape is about training loss), the study's sizes, then the caller's fields
    base = {"recipe": "bn", "val_fraction": 0.0, "dataset": DEFAULT_DATASET, "epochs": DEFAULT_EPOCHS}
    base.update(extra)
    cfg = make_config(base, **explicit, model=models[0], seed=seeds[0], run_dir=str(run_dir), experiment="bn",
                      probe_interval=0, probe_steps=etas or [], probe_rel_steps=rel)
    probe_lr = float(probe_lr) if probe_lr is not None else lrs[0]
    if not (math.isfinite(probe_lr) and probe_lr > 0):
        raise ConfigError(f"probe_lr must be positive and finite, got {probe_lr}")
    settings = {"models": models, "lrs": lrs, "seeds": seeds, "dataset": cfg.dataset, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "train_subset": cfg.train_subset, "test_subset": cfg.test_subset,
                "probe_lr": probe_lr, "etas": etas, "relative_etas": rel, "probe_interval": probe_interval,
                "probe_count": probe_count, "landscape": bool(landscape), "probes": probes,
                "overhead": bool(overhead), "overhead_interval": overhead_interval, "schedule": schedule,
                "speedup_steps": speedup_steps, "check_every": check_every, "smooth": smooth}
    shown_extra = {k: v for k, v in extra.items() if k not in ("recipe",) and k not in settings
                   and v != getattr(TrainConfig(), k, object())}
    command = cli_command(settings, shown_extra, run_dir, cfg)

    from cifarlab.train.rundir import RunDirectory

    with RunDirectory(run_dir).lock():
        _prepare(run_dir, resume, settings)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write_text(run_dir / STUDY_FILE, yaml.safe_dump(settings, sort_keys=False))
        say = _Log(run_dir / "log.txt", log)
        return _run(cfg, settings, run_dir, say, command, t_start, replace, F)


def _run(cfg, settings, run_dir: Path, log, command: str, t_start: float, replace, F) -> StudyResult:
    from cifarlab.batchnorm import landscape as L
    from cifarlab.models import build_model
    from cifarlab.train.precision import resolve_amp
    from cifarlab.utils import atomic_write_text, count_params, resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_heap:
        from cifarlab.train.cpu_heap import keep_cpu_heap

        keep_cpu_heap()  # as the Trainer does: keep freed activations in glibc's heap
    precision = resolve_amp(cfg.amp, device)
    models, seeds = settings["models"], settings["seeds"]
    log(f"# bn study: models {models}, seeds {seeds}, lrs {settings['lrs']}, dataset {cfg.dataset}, "
        f"epochs {cfg.epochs}, train subset {cfg.train_subset}, batch {cfg.batch_size}; command: {command}")
    meta = json.loads((run_dir / META_FILE).read_text()) if (run_dir / META_FILE).is_file() else {}
    meta.setdefault("speedup", None)
    meta.setdefault("train_images", {})
    saved = {(r.name, r.seed): r for r in L.load_landscape_runs(run_dir)} if settings["landscape"] else {}
    data = _Data(device)
    probe_summaries: dict[str, dict] = {}
    intervals: dict[str, int] = {}
    for seed in seeds:
        cfg_s = replace(cfg, seed=seed)
        if settings["landscape"]:
            for name in models:
                if (name, seed) in saved:
                    log(f"landscape {name} seed {seed}: finished earlier, kept")
                    continue
                run, concurrent, speedup = _landscape_unit(cfg_s, name, settings, data, device, precision, log)
                saved[(name, seed)] = run
                meta["concurrent"] = concurrent
                meta["train_images"][str(seed)] = data.get(cfg_s).train.num_samples
                if speedup is not None and meta["speedup"] is None:
                    meta["speedup"] = speedup
                order = [saved[(m, s)] for s in seeds for m in models if (m, s) in saved]
                L.save_landscape(run_dir, order)  # after each landscape: a resumed study keeps it
                atomic_write_text(run_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
        if settings["probes"]:
            interval = _probe_interval(settings, cfg_s, data)
            for name in models:
                sub = run_dir / "probes" / name / f"seed{seed}"
                key = F.unit(name, seed)
                intervals[key] = interval
                log(f"probes {name} seed {seed}: lr {settings['probe_lr']:g}, every {interval} steps, "
                    f"eta {settings['etas']}, eta_rel {settings['relative_etas']} -> {sub}")
                pcfg = replace(cfg_s, model=name, lr=settings["probe_lr"], run_name=f"{name}-seed{seed}",
                               probe_interval=interval)
                s = _trainer_run(pcfg, sub, log, f"probes {name} seed {seed}")
                log(f"probes {name} seed {seed}: {s.get('probe_count')} probes, median beta "
                    f"{s.get('probe_beta_median')}, probe time {s.get('probe_overhead_pct')}% of training time")
                probe_summaries[key] = s
    overhead = None
    if settings["overhead"]:
        overhead = [_overhead(replace(cfg, seed=seeds[0]), name, settings, run_dir, log) for name in models]

    log("figures and numbers")
    figs = F.draw_study(run_dir, run_dir, models, seeds, smooth=settings["smooth"])
    numbers = F.study_numbers(run_dir, models, seeds)
    for line in numbers["comparison"]:
        log(line.replace("**", ""))
    import torch

    info = data.get(replace(cfg, seed=seeds[0])).info
    params = {}
    for name in models:
        with torch.device("meta"):  # shapes only
            params[name] = count_params(build_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                                                    **(cfg.model_kwargs or {})))
    land_wall = {F.unit(r.name, r.seed): r.wall_time_s for r in saved.values()}
    probe_wall = {k: s.get("wall_time_s") for k, s in probe_summaries.items()}
    over_wall = 0.0
    if overhead:
        for o in overhead:
            for kind in ("probed", "plain"):
                s = _finished_run(run_dir / "overhead" / o["model"] / kind) or {}
                over_wall += s.get("wall_time_s") or 0.0
    compute = sum(v for v in land_wall.values() if v) + sum(v for v in probe_wall.values() if v) + over_wall
    summary = {
        "study": "bn", "model": ",".join(models), "dataset": cfg.dataset,
        "params": next(iter(params.values()), None) if params else None, "params_by_model": params,
        "flops": None, "epochs": cfg.epochs, "epochs_completed": cfg.epochs, "best_epoch": None,
        "best_val_acc": None, "test_acc": None, "test_error": None,
        # the training time of every stage, summed over resumed sessions, and this session's
        "wall_time_s": compute, "session_wall_time_s": time.time() - t_start,
        # diverging rates are results of the study, not a failure of this run
        "diverged": False,
        "models": models, "seeds": seeds, "seed": seeds[0], "lrs": settings["lrs"], "probe_lr": settings["probe_lr"],
        "train_subset": cfg.train_subset, "train_images": meta["train_images"] or None,
        "batch_size": cfg.batch_size,
        "precision": {"training": "bf16 autocast" if precision.amp == "bf16" else "fp32",
                      "reason": precision.reason, "probes": "fp32 (autocast off inside the probe)"},
        "landscape": numbers["landscape"], "landscape_wall_time_s": land_wall,
        "speedup": meta.get("speedup"), "concurrent": meta.get("concurrent"),
        "probes": numbers["probes"],
        "probe_interval": next(iter(intervals.values()), None), "probe_intervals": intervals,
        "probe_etas": settings["etas"], "probe_rel_etas": settings["relative_etas"],
        "probe_overhead_pct": {k: s.get("probe_overhead_pct") for k, s in probe_summaries.items()},
        "probe_test_acc": {k: s.get("test_acc") for k, s in probe_summaries.items()},
        "probe_wall_time_s": probe_wall,
        "answers": numbers["answers"], "comparison": numbers["comparison"],
        "overhead": overhead,
        "command": command, "hardware": hardware_label(device), "smooth": settings["smooth"],
        "figures": {k: os.path.relpath(v, run_dir) for k, v in figs.items()},
        "finished": True,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"done: {run_dir} (stages {compute:.0f}s, this session {summary['session_wall_time_s']:.0f}s)")
    return StudyResult(run_dir, summary, figs, numbers["answers"])
