"""`python -m cifarlab bn`: the BatchNorm study (course project part 2, Santurkar et al. 2018).

Three stages into one run directory (default log/bn/<models joined by '-'>):

1. Loss landscape (analysis/landscape.py): for every model in --models, one model per rate in
   --lrs (Adam, the course recipe ``bn``: no augmentation, no weight decay, seed 2020), the
   training loss of every step; the rates of a model train concurrently (vmap over stacked
   parameters) on GPU and one after another on CPU (--schedule; the results are the same).
   Files: landscape_losses.csv, landscape_runs.csv, landscape_band.csv, landscape.png.
   --speedup-steps N also times N steps of all rates one after another against N concurrent
   steps and records the ratio (summary "speedup").
2. Probes (analysis/bn_probe_callback.py): for every model one ordinary Trainer run at
   --probe-lr with probes every --probe-interval steps, into probes/<model>/ (a full run
   directory with probes.csv). Figures: probe_loss.png, probe_grad_diff.png, probe_beta.png.
3. summary.json ("finished": true) with the band widths, the betas, the divergences and a
   plain statement of whether BN's band is narrower and its beta smaller.

Divergence is part of the science: a rate whose loss turns non-finite is recorded as diverged
from that step and leaves the band; the study itself still finishes ("diverged": false).

--resume (what train.sh passes when the folder holds config.yaml): a finished landscape
(landscape_runs.csv written) is kept; an unfinished one restarts from scratch (it is not
checkpointed: it is minutes, not hours); each probe run resumes from its own checkpoint
through the Trainer, or is skipped when finished.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from cifarlab.cli import add_config_arguments, config_from_args
from cifarlab.errors import ConfigError, RunDirError

NAME = "bn"
HELP = "BatchNorm study: loss-landscape band over learning rates and Santurkar probes, with/without BN"

DEFAULT_LRS = "1e-3,2e-3,1e-4,5e-4"
DEFAULT_MODELS = "vgg_a,vgg_a_bn"
# A probe costs one forward+backward per step size (five by default), so the overhead is about
# 5/K of the training time. Measured at K = 50 (grid/bn.txt probe-overhead-k50, vgg_a_light on
# Fashion-MNIST, batch 64, 2-core CPU): 7.3% by the callback's timer, +3.3% epoch time against
# the same run without probes; under the 15% limit with room for noise. (The short CPU study in
# grid/bn.txt asks for K = 4 explicitly, to get enough probes from 32 steps.)
DEFAULT_PROBE_INTERVAL = 50
STUDY_FILE = "study.yaml"


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    g = parser.add_argument_group("study")
    g.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model names (default {DEFAULT_MODELS})")
    g.add_argument("--lrs", default=DEFAULT_LRS, help=f"comma-separated learning rates (default {DEFAULT_LRS})")
    g.add_argument("--probe-lr", type=float, default=None,
                   help="learning rate of the probe runs (default: the first of --lrs)")
    g.add_argument("--schedule", choices=("auto", "concurrent", "sequential"), default="auto",
                   help="train the rates of a model concurrently (vmap) or one after another (same "
                        "losses); auto: concurrent on GPU, sequential on CPU, where the gain measured "
                        "x0.7 to x1.8 depending on model and batch (no consistent win)")
    g.add_argument("--speedup-steps", type=int, default=0,
                   help="time this many steps concurrent vs sequential and record the speed-up (0 = skip)")
    g.add_argument("--check-every", type=int, default=50,
                   help="read the landscape losses to the host every N steps to detect divergence")
    g.add_argument("--no-probes", action="store_true", help="skip the probe runs (landscape only)")
    g.add_argument("--no-landscape", action="store_true", help="skip the landscape (probes only)")
    g.add_argument("--smooth", type=int, default=1, help="moving-average window of the landscape figure")


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).replace(" ", ",").split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} must name at least one value")
    return items


def parse_study(args) -> dict:
    from cifarlab.batchnorm.landscape import check_lrs
    from cifarlab.models import available_models

    models = _split(args.models, "models")
    unknown = [m for m in models if m.lower() not in available_models()]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(available_models())}")
    if len(set(models)) != len(models):
        raise ConfigError(f"--models lists a model twice: {args.models}")
    try:
        lrs = check_lrs([float(v) for v in _split(args.lrs, "lrs")])
    except ValueError:
        raise ConfigError(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
    for name in ("speedup_steps", "smooth"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be non-negative")
    if args.check_every <= 0:
        raise ConfigError("--check-every must be positive")
    if args.no_probes and args.no_landscape:
        raise ConfigError("--no-probes and --no-landscape together leave nothing to do")
    probe_lr = args.probe_lr if args.probe_lr is not None else lrs[0]
    if not probe_lr > 0:
        raise ConfigError(f"--probe-lr must be positive, got {probe_lr}")
    return {"models": models, "lrs": lrs, "probe_lr": probe_lr, "schedule": args.schedule,
            "speedup_steps": args.speedup_steps, "check_every": args.check_every,
            "probes": not args.no_probes, "landscape": not args.no_landscape, "smooth": args.smooth}


def study_config(args):
    """The base TrainConfig: recipe ``bn`` (course: Adam, no augmentation, no weight decay, seed 2020),
    no validation split unless asked (the landscape is about training loss), given flags on top."""
    if args.recipe is None:
        args.recipe = "bn"
    if args.val_fraction is None:
        args.val_fraction = 0.0
    if args.probe_interval is None:
        args.probe_interval = DEFAULT_PROBE_INTERVAL
    models = _split(args.models, "models")
    if args.model is not None and args.model not in models:
        raise ConfigError("use --models (a list) for the bn study, not --model")
    args.run_dir = args.run_dir or str(Path("log") / "bn" / "-".join(models))
    args.model = models[0]  # config.yaml names the first model; each stage sets its own
    return config_from_args(args)


class _Log:
    """Print a line and append it to log.txt (the run's readable record)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def _prepare(run_dir: Path, resume: bool, study: dict) -> None:
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            done = json.loads(summary.read_text()).get("finished")
        except ValueError:
            done = False
        if done:
            raise RunDirError(f"{run_dir} holds a finished study; choose another --run-dir or remove it")
    holds = any((run_dir / n).exists() for n in ("config.yaml", STUDY_FILE, "landscape_runs.csv", "probes"))
    if holds and not resume:
        raise RunDirError(f"{run_dir} already holds an unfinished study; pass --resume to continue it "
                          f"or choose another --run-dir")
    if resume and (run_dir / STUDY_FILE).is_file():
        saved = yaml.safe_load((run_dir / STUDY_FILE).read_text()) or {}
        for key in ("models", "lrs"):
            if saved.get(key) != study[key]:
                raise ConfigError(f"--resume: --{key} {study[key]} differs from the study's {saved.get(key)} "
                                  f"in {run_dir / STUDY_FILE}")
    run_dir.mkdir(parents=True, exist_ok=True)


def _landscape(cfg, study: dict, run_dir: Path, log) -> dict:
    """Stage 1: every model's rates, concurrently; CSVs, the figure and the speed-up."""
    import torch

    from cifarlab.batchnorm import landscape as L
    from cifarlab.data import build_loaders
    from cifarlab.models import build_model
    from cifarlab.train.losses import build_loss
    from cifarlab.utils import resolve_device

    device = resolve_device(cfg.device)
    concurrent = study["schedule"] == "concurrent" or (study["schedule"] == "auto" and device.type == "cuda")
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")

    def autocast():
        import contextlib

        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    data = build_loaders(cfg, device)
    info, loader = data.info, data.train

    def batches(epoch):
        loader.set_epoch(epoch)
        return loader

    loss_fn = build_loss(cfg)
    runs, out = [], {"speedup": None}
    for name in study["models"]:
        def build(name=name):
            return build_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                               **(cfg.model_kwargs or {}))

        log(f"landscape {name}: {len(study['lrs'])} rates {study['lrs']}, "
            f"{'concurrent (vmap)' if concurrent else 'sequential'}, {cfg.epochs} epochs of "
            f"{loader.num_samples} images, batch {cfg.batch_size}, device {device}")
        run = L.train_landscape(name, build, study["lrs"], batches, cfg.epochs, loss_fn=loss_fn, seed=cfg.seed,
                                concurrent=concurrent, device=device, betas=tuple(cfg.betas),
                                check_every=study["check_every"], autocast=autocast, progress=log)
        div = [f"lr {lr:g} at step {s}" for lr, s in zip(run.lrs, run.diverged_step) if s is not None]
        log(f"landscape {name}: {len(run.epochs)} steps in {run.wall_time_s:.1f}s"
            + (f"; diverged: {', '.join(div)}" if div else "; no rate diverged"))
        runs.append(run)
        if study["speedup_steps"] and out["speedup"] is None:
            loader.set_epoch(1)
            fixed = []
            for x, y in loader:
                fixed.append((x, y))
                if len(fixed) >= study["speedup_steps"]:
                    break
            sp = L.measure_speedup(build, study["lrs"], fixed, loss_fn=loss_fn, seed=cfg.seed, device=device,
                                   autocast=autocast)
            sp["model"] = name
            out["speedup"] = sp
            log(f"speed-up {name}: {sp['steps']} steps x {sp['models']} rates: sequential "
                f"{sp['sequential_s']:.2f}s, concurrent {sp['concurrent_s']:.2f}s -> x{sp['speedup']:.2f}")
    L.save_landscape(run_dir, runs)
    out["wall_time_s"] = {r.name: r.wall_time_s for r in runs}
    out["concurrent"] = concurrent
    out["train_images"] = loader.num_samples
    out["params"] = {r.name: sum(p.numel() for p in build_model(
        r.name, num_classes=info.num_classes, in_channels=info.in_channels).parameters()) for r in runs}
    return out


def _probe_runs(cfg, study: dict, run_dir: Path, log) -> dict:
    """Stage 2: one Trainer run per model with the probe callback (from cfg.probe_interval)."""
    from cifarlab.config import replace
    from cifarlab.train import Trainer

    out = {}
    for name in study["models"]:
        sub = run_dir / "probes" / name
        summary_file = sub / "summary.json"
        if summary_file.is_file() and json.loads(summary_file.read_text()).get("finished"):
            log(f"probes {name}: finished earlier, kept ({sub})")
            out[name] = json.loads(summary_file.read_text())
            continue
        pcfg = replace(cfg, model=name, lr=study["probe_lr"], run_dir=str(sub), resume=sub.is_dir(),
                       experiment="bn", run_name=name)
        log(f"probes {name}: lr {study['probe_lr']:g}, every {pcfg.probe_interval} steps, "
            f"eta {list(pcfg.probe_steps)} -> {sub}")
        s = Trainer(pcfg).fit()
        log(f"probes {name}: {s.get('probe_count')} probes, median beta {s.get('probe_beta_median')}, "
            f"probe overhead {s.get('probe_overhead_pct')}% of training time")
        out[name] = s
    return out


def _figures(run_dir: Path, study: dict, log) -> dict:
    from cifarlab.batchnorm import figures as F

    stats = {"landscape": {}, "probes": {}}
    loaded = F.load_landscape(run_dir)
    if loaded is not None:
        band, runs = loaded
        F.plot_landscape(band, runs, run_dir / "landscape.png", smooth=study["smooth"])
        stats["landscape"] = F.landscape_stats(band, runs, F.load_losses(run_dir))
    probes = F.load_probes({m: run_dir / "probes" / m for m in study["models"]})
    if len(probes):
        for q in ("loss", "grad_diff", "beta"):
            F.plot_probe(probes, q, run_dir / f"probe_{q}.png")
        stats["probes"] = F.probe_stats(probes)
    stats["comparison"] = F.comparison_lines(stats["landscape"], stats["probes"])
    for line in stats["comparison"]:
        log(line.replace("**", ""))
    return stats


def command_line(args) -> str:
    """The flags given, as a command that reproduces the study (before any defaults are filled in)."""
    import shlex

    parts = ["python", "-m", "cifarlab", NAME]
    for key, value in vars(args).items():
        if key.startswith("_") or key == "command" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        default = _DEFAULTS.get(key, None) if key not in ("models", "lrs") else object()  # always shown
        if isinstance(value, bool):
            if key in _DEFAULTS:  # store_true study flags
                if value:
                    parts.append(flag)
            else:
                parts.append(flag if value else "--no-" + flag[2:])
        elif value != default:
            text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, (list, tuple)) else str(value)
            parts += [flag, text]
    return " ".join(shlex.quote(p) for p in parts)


_DEFAULTS = {"models": DEFAULT_MODELS, "lrs": DEFAULT_LRS, "probe_lr": None, "schedule": "auto",
             "speedup_steps": 0, "check_every": 50, "no_probes": False, "no_landscape": False, "smooth": 1}


def hardware(device) -> str:
    import os

    import torch

    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"{os.cpu_count()}-core CPU, no GPU"


def run(args) -> int:
    from cifarlab.utils import atomic_write_text, resolve_device

    command = command_line(args)
    study = parse_study(args)
    cfg = study_config(args)
    run_dir = cfg.resolved_run_dir()
    if cfg.probe_interval == 0:  # --probe-interval 0 turns the probes off, as in `train`
        study["probes"] = False
    _prepare(run_dir, cfg.resume, study)
    t0 = time.time()
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(run_dir / STUDY_FILE, yaml.safe_dump(study, sort_keys=False))
    log = _Log(run_dir / "log.txt")
    log(f"# bn study: models {study['models']}, lrs {study['lrs']}, dataset {cfg.dataset}, epochs {cfg.epochs}, "
        f"train subset {cfg.train_subset}, batch {cfg.batch_size}, seed {cfg.seed}")
    from cifarlab.batchnorm.landscape import RUNS_CSV

    land = {}
    if study["landscape"]:
        if cfg.resume and (run_dir / RUNS_CSV).is_file():
            log("landscape: finished earlier, kept")
            prev = run_dir / "landscape_meta.json"
            land = json.loads(prev.read_text()) if prev.is_file() else {}
        else:
            land = _landscape(cfg, study, run_dir, log)
            atomic_write_text(run_dir / "landscape_meta.json", json.dumps(land, indent=2) + "\n")
    probe_summaries = _probe_runs(cfg, study, run_dir, log) if study["probes"] else {}
    stats = _figures(run_dir, study, log)
    params = land.get("params") or {m: s.get("params") for m, s in probe_summaries.items()}
    summary = {
        "study": "bn", "model": ",".join(study["models"]), "dataset": cfg.dataset,
        "params": next(iter(params.values()), None) if params else None, "params_by_model": params,
        "flops": None, "epochs": cfg.epochs, "epochs_completed": cfg.epochs, "best_epoch": None,
        "best_val_acc": None, "test_acc": None, "test_error": None,
        "wall_time_s": time.time() - t0,
        # diverging rates are results of the study, not a failure of this run
        "diverged": False,
        "lrs": study["lrs"], "models": study["models"], "probe_lr": study["probe_lr"],
        "train_subset": cfg.train_subset, "train_images": land.get("train_images"),
        "batch_size": cfg.batch_size, "seed": cfg.seed,
        "landscape": stats["landscape"], "landscape_wall_time_s": land.get("wall_time_s"),
        "speedup": land.get("speedup"), "concurrent": land.get("concurrent"),
        "probes": stats["probes"],
        "probe_interval": cfg.probe_interval, "probe_etas": list(cfg.probe_steps),
        "probe_overhead_pct": {m: s.get("probe_overhead_pct") for m, s in probe_summaries.items()},
        "probe_test_acc": {m: s.get("test_acc") for m, s in probe_summaries.items()},
        "comparison": stats["comparison"],
        "command": command, "hardware": hardware(resolve_device(cfg.device)), "smooth": study["smooth"],
        "finished": True,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"done in {summary['wall_time_s']:.0f}s: {run_dir}")
    return 0
