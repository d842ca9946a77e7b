"""`python -m cifarlab bn`: the BatchNorm study (batchnorm/study.py, ``run_study``).

A thin adapter: flags -> ``run_study(...)`` keywords -> exit code. Every training flag of
``train`` is accepted (it goes to the study's TrainConfig, recipe ``bn``); the study's own flags
are below. Without flags: the light pair on all of Fashion-MNIST, 5 epochs, seeds 0 and 1.
"""
from __future__ import annotations

from cifarlab.cli import add_config_arguments
from cifarlab.errors import ConfigError

NAME = "bn"
HELP = ("BatchNorm study: loss-landscape band over learning rates, the course's gradient predictiveness and "
        "beta, and Santurkar probes, with/without BN")

# the TrainConfig flags that are run_study keywords (the rest pass through as config)
_KEYWORDS = ("dataset", "epochs", "batch_size", "train_subset", "test_subset", "device", "amp", "progress")


def add_arguments(parser) -> None:
    from cifarlab.batchnorm.probe_callback import DEFAULT_PROBE_INTERVAL
    from cifarlab.batchnorm.study import DEFAULT_LRS, DEFAULT_MODELS, DEFAULT_PROBE_COUNT

    add_config_arguments(parser)
    g = parser.add_argument_group("study")
    g.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated model names (default {','.join(DEFAULT_MODELS)})")
    g.add_argument("--lrs", default=",".join(f"{v:g}" for v in DEFAULT_LRS),
                   help="comma-separated learning rates of the landscape (default the course's 1e-3,2e-3,1e-4,5e-4)")
    g.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; --seed N: that one)")
    g.add_argument("--probe-lr", type=float, default=None,
                   help="learning rate of the probe runs (default: the first of --lrs)")
    g.add_argument("--probe-count", type=int, default=DEFAULT_PROBE_COUNT,
                   help="probed steps per probe run when --probe-interval is not given "
                        f"(default {DEFAULT_PROBE_COUNT}); --probe-interval 0 turns the probes off")
    g.add_argument("--schedule", choices=("auto", "concurrent", "sequential"), default="auto",
                   help="train the rates of a model concurrently (vmap) or one after another (same "
                        "losses); auto: concurrent on GPU, sequential on CPU, where the gain measured "
                        "x0.7 to x1.8 depending on model and batch (no consistent win)")
    g.add_argument("--speedup-steps", type=int, default=0,
                   help="time this many steps concurrent vs sequential and record the speed-up (0 = skip)")
    g.add_argument("--check-every", type=int, default=50,
                   help="read the landscape losses to the host every N steps to detect divergence")
    g.add_argument("--no-probes", action="store_true", help="skip the probe runs")
    g.add_argument("--no-landscape", action="store_true", help="skip the landscape")
    g.add_argument("--overhead", action="store_true",
                   help="also measure the probe overhead: per model a training run with probes every "
                        "--overhead-interval steps and the same run without them")
    g.add_argument("--overhead-interval", type=int, default=DEFAULT_PROBE_INTERVAL,
                   help=f"probe interval of the overhead runs (default {DEFAULT_PROBE_INTERVAL}, the callback's)")
    g.add_argument("--smooth", type=int, default=None,
                   help="moving-average window of the per-step figures (default about 1%% of the steps; 1 = raw)")


def _split(text: str | None, what: str, kind):
    if text is None:
        return None
    items = [t for t in str(text).replace(" ", ",").split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} must name at least one value")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated {'numbers' if kind is float else 'integers'}, "
                          f"got {text!r}") from None


def study_kwargs(args) -> dict:
    """The run_study keywords of parsed flags (the notebook calls run_study with the same)."""
    import dataclasses

    from cifarlab.config import TrainConfig, load_yaml

    if args.model is not None:
        raise ConfigError("use --models (a list) for the bn study, not --model")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = load_yaml(args.config) if getattr(args, "config", None) else {}
    config.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    kw = {k: config.pop(k) for k in _KEYWORDS if k in config}
    for key, name in (("probe_steps", "etas"), ("probe_rel_steps", "relative_etas")):
        if key in config:
            kw[name] = config.pop(key)
    if "probe_interval" in config:
        kw["probe_interval"] = config.pop("probe_interval")
    kw["resume"] = bool(config.pop("resume", False))
    if "run_dir" in config:
        kw["run_dir"] = config.pop("run_dir")
    seeds = _split(args.seeds, "seeds", int)
    if seeds is not None:
        kw["seeds"] = seeds
    kw.update(models=args.models, lrs=_split(args.lrs, "lrs", float), probe_lr=args.probe_lr,
              probe_count=args.probe_count, schedule=args.schedule, speedup_steps=args.speedup_steps,
              check_every=args.check_every, landscape=not args.no_landscape, probes=not args.no_probes,
              overhead=args.overhead, overhead_interval=args.overhead_interval, smooth=args.smooth,
              config=config)
    return kw


def run(args) -> int:
    from cifarlab.batchnorm.study import run_study

    result = run_study(**study_kwargs(args))
    return 0 if result.finished else 1
