"""TrainConfig: every knob of a training run, YAML round-trip, flag overrides, validation.

A run directory's ``config.yaml`` is ``asdict(TrainConfig)``; ``--config file.yaml`` loads one
and command-line flags override it. Technique options (SLBI, structural dropout, EDropout,
BatchNorm probes) live here too so that a run directory fully describes its run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cifarlab.errors import ConfigError

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "adadelta", "rmsprop", "slbi", "slbi_adam")
SCHEDULERS = ("plateau", "cosine", "multistep", "step", "none")
LOSSES = ("ce", "label_smoothing", "mse", "margin")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu")


@dataclass
class TrainConfig:
    # what to train on what
    model: str = "resnet18"
    dataset: str = "cifar10"
    model_kwargs: dict = field(default_factory=dict)
    activation: str | None = None  # passed to models that take it
    # the seed recipe (seed 004): SGD 0.1, momentum 0.9, wd 5e-4, batch 128, plateau x0.5, 200 ep
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple = (0.9, 0.999)
    rho: float = 0.9  # adadelta
    eps: float | None = None  # optimizer epsilon (None: the optimizer's default)
    scheduler: str = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    milestones: list = field(default_factory=list)  # multistep; empty = 50% and 75% of epochs
    step_size: int = 50  # step scheduler: every step_size epochs
    gamma: float = 0.1  # multistep / step factor
    loss: str = "ce"
    label_smoothing: float = 0.1
    margin: float = 1.0  # margin loss
    seed: int = 0
    # data
    data_root: str = "data"
    train_subset: int | None = None
    test_subset: int | None = None
    val_fraction: float = 0.1
    augment: bool = True
    cutout: int = 0
    download: bool = True
    image_size: int | None = None  # N x N: resizes folder:/npz:/torchvision:/registered data; Flowers-102 (default 32)
    hflip: bool = True  # random horizontal flips when augmenting; --no-hflip for digits, text (mnist never flips)
    # normalisation per channel on [0, 1]; None: the dataset's (for a user's own data measured on its
    # training split and recorded here in the run's config.yaml)
    norm_mean: list | None = None
    norm_std: list | None = None
    # where results go
    experiment: str = "default"
    run_name: str | None = None  # default: the model name
    run_dir: str | None = None  # default: log/<experiment>/<run_name>
    resume: bool = False
    # speed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast where the hardware computes bf16 natively (GPUs with bf16 tensor cores, CPUs
    # with AVX512-BF16 or AMX), fp32 elsewhere (train/precision.py) | bf16: always | off: fp32
    amp: str = "auto"
    channels_last: str = "auto"  # auto = on (faster on GPU and with oneDNN on CPU) | on | off
    compile: bool = False
    compile_mode: str = "auto"  # auto: reduce-overhead (CUDA graphs) on GPU, default on CPU
    eval_batch_size: int | None = None  # None: 1024 on GPU, 256 on CPU (the faster there)
    cpu_heap: bool = True  # CPU: keep freed memory for reuse (glibc mallopt, train/cpu_heap.py); ~20% faster steps
    num_workers: int = 4  # only for DataLoader-path datasets (Flowers-102)
    sync_bn: bool = False  # DDP on GPUs: SyncBatchNorm, BN statistics over the global batch (train/distributed.py)
    # logging
    tensorboard: bool = False
    progress: str = "auto"  # auto (tqdm in a terminal or a notebook) | on | off
    live_plot: bool = False  # redraw the loss/accuracy curves in the notebook cell every epoch
    # DessiLBI (issue 6)
    slbi_kappa: float = 1.0
    slbi_mu: float = 100.0
    slbi_lambda: float = 1.0
    slbi_fc_lambda: float | None = None
    slbi_fused: str = "auto"  # auto | on | off: SLBI's update as one torch.compile'd pass (auto: where a compiler is)
    # structural dropout networks (issue 7), mirroring the original's flags
    net_type: str | None = None
    depth: int | None = None
    arg1: float | None = None
    block_type: int = 0
    drop_type: str | None = None
    drop_rate: float = 0.0
    report_ratio: bool = False
    norm: str = "bn"
    # EDropout (issue 8)
    edropout: bool = False
    edropout_states: int = 8
    edropout_freeze_epoch: int = 100
    edropout_p0: float = 0.5
    edropout_mutation: str = "original"
    edropout_random_keep: float | None = None  # random-mask baseline: fixed random state keeping this fraction
    # BatchNorm probes (issue 5); 0 = off
    probe_interval: int = 0
    probe_steps: list = field(default_factory=lambda: [0.2, 0.1, 0.05, 0.02, 0.01])
    # step sizes relative to the gradient step lr * sqrt(#params) (batchnorm/probes.py); [] = none
    probe_rel_steps: list = field(default_factory=lambda: [0.4, 0.2, 0.1, 0.05])
    # a named preset applied before flags (``--recipe edropout``)
    recipe: str | None = None

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        from cifarlab.paths import log_dir  # default under the project root, wherever the kernel runs

        return log_dir() / self.experiment / (self.run_name or self.model)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# Named presets: a recipe sets these fields, then explicit flags override them.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {},
    # Salehinejad & Valaee: Adadelta lr 1, rho 0.9, eps 1e-6, wd 1e-5, StepLR 50 x0.1, 200 ep
    "edropout": dict(optimizer="adadelta", lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5,
                     scheduler="step", step_size=50, gamma=0.1, epochs=200, batch_size=128,
                     edropout=True, edropout_states=8, edropout_freeze_epoch=100, edropout_p0=0.5),
    # Cai et al.: SGD 0.1 momentum 0.9 wd 1e-4, x0.1 at 50% and 75%, 164 epochs
    "dropout": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                    scheduler="multistep", milestones=[], gamma=0.1, epochs=164),
    # course starter for the BatchNorm part: Adam, 20 epochs, no augmentation
    "bn": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, scheduler="none", epochs=20,
               augment=False, seed=2020),
    # DessiLBI LeNet-5 example: lr 0.1, kappa 1, mu 20, x0.1 every 20 epochs, 60 epochs
    "slbi_lenet": dict(model="lenet5", optimizer="slbi", lr=0.1, slbi_kappa=1.0, slbi_mu=20.0,
                       scheduler="step", step_size=20, gamma=0.1, epochs=60, weight_decay=0.0),
}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def field_names() -> list[str]:
    return list(_FIELDS)


def make_config(base: dict[str, Any] | None = None, **overrides) -> TrainConfig:
    """Build a validated config: recipe preset, then ``base`` (YAML), then ``overrides``."""
    values: dict[str, Any] = {}
    merged = dict(base or {})
    merged.update({k: v for k, v in overrides.items()})
    recipe = merged.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        values.update(RECIPES[recipe])
    unknown = sorted(set(merged) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    values.update(merged)
    if "betas" in values and values["betas"] is not None:
        values["betas"] = tuple(values["betas"])
    if values.get("net_type") and "model" not in merged:
        # --net-type alone names the network (the summary and run name then say which)
        from cifarlab.dropout.networks import NET_TYPES

        values["model"] = NET_TYPES.get(str(values["net_type"]).lower(), values.get("model", "resnet18"))
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value")
    return data


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    from cifarlab.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _positive(name: str, value, allow_zero: bool = False) -> None:
    bad = value is None or (isinstance(value, float) and not math.isfinite(value))
    if bad or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def validate(cfg: TrainConfig) -> None:
    """Check every value a user can get wrong; raise ConfigError with one readable line."""
    for name in ("epochs", "batch_size", "eval_batch_size"):
        v = getattr(cfg, name)
        if name == "eval_batch_size" and v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    _positive("lr", cfg.lr)
    _positive("weight_decay", cfg.weight_decay, allow_zero=True)
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {cfg.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.loss!r}; choose one of: {', '.join(LOSSES)}")
    if cfg.activation is not None and cfg.activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {cfg.activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0.0 < cfg.plateau_factor < 1.0:
        raise ConfigError(f"plateau_factor must be in (0, 1), got {cfg.plateau_factor}")
    if not 0.0 < cfg.gamma <= 1.0:
        raise ConfigError(f"gamma must be in (0, 1], got {cfg.gamma}")
    if cfg.step_size <= 0:
        raise ConfigError(f"step_size must be positive, got {cfg.step_size}")
    for name in ("train_subset", "test_subset"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if cfg.cutout < 0:
        raise ConfigError(f"cutout must be non-negative, got {cfg.cutout}")
    from cifarlab.data.registry import check_dataset_name  # names only: no file is read here

    check_dataset_name(cfg.dataset)
    if cfg.image_size is not None and (not isinstance(cfg.image_size, int) or isinstance(cfg.image_size, bool)
                                       or cfg.image_size < 1):
        raise ConfigError(f"image_size must be a positive integer, got {cfg.image_size!r}")
    if cfg.norm_std is not None and not all(isinstance(v, (int, float)) and v > 0 for v in cfg.norm_std):
        raise ConfigError(f"norm_std must hold positive numbers, got {cfg.norm_std!r}")
    if not 0.0 <= cfg.drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1), got {cfg.drop_rate}")
    if cfg.block_type not in (0, 1, 2, 3):
        raise ConfigError(f"block_type must be 0, 1, 2 or 3, got {cfg.block_type}")
    drop_kind = None
    if cfg.drop_type is not None:  # structural dropout (issue 7): names or the original's codes 0-3
        from cifarlab.dropout.layers import parse_drop_type

        drop_kind = parse_drop_type(cfg.drop_type)
    if cfg.drop_rate > 0 and drop_kind is None:
        raise ConfigError("drop_rate needs a drop_type (neuron, channel, path or layer)")
    if cfg.report_ratio and drop_kind is None:
        raise ConfigError("report_ratio tracks the norm layers after dropout: it needs a drop_type")
    if cfg.norm not in ("bn", "gn"):
        raise ConfigError(f"norm must be 'bn' or 'gn', got {cfg.norm!r}")
    if cfg.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"amp must be auto, bf16 or off, got {cfg.amp!r}")
    if cfg.slbi_fused not in ("auto", "on", "off"):
        raise ConfigError(f"slbi_fused must be auto, on or off, got {cfg.slbi_fused!r}")
    if cfg.channels_last not in ("auto", "on", "off"):
        raise ConfigError(f"channels_last must be auto, on or off, got {cfg.channels_last!r}")
    if cfg.progress not in ("auto", "on", "off"):
        raise ConfigError(f"progress must be auto, on or off, got {cfg.progress!r}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.edropout_states < 4:
        raise ConfigError(f"edropout_states must be at least 4 (DE/rand/1 needs 3 others), got {cfg.edropout_states}")
    if not 0.0 < cfg.edropout_p0 <= 1.0:
        raise ConfigError(f"edropout_p0 must be in (0, 1], got {cfg.edropout_p0}")
    if cfg.edropout_mutation not in ("original", "textbook"):
        raise ConfigError(f"edropout_mutation must be 'original' or 'textbook', got {cfg.edropout_mutation!r}")
    if cfg.edropout_random_keep is not None:
        if not 0.0 < cfg.edropout_random_keep <= 1.0:
            raise ConfigError(f"edropout_random_keep must be in (0, 1], got {cfg.edropout_random_keep}")
        if not cfg.edropout:
            raise ConfigError("edropout_random_keep is a mode of EDropout: it needs --edropout (or --recipe edropout)")
    if cfg.probe_interval < 0:
        raise ConfigError(f"probe_interval must be non-negative, got {cfg.probe_interval}")
    for name in ("slbi_kappa", "slbi_mu"):
        _positive(name, getattr(cfg, name))
    _positive("slbi_lambda", cfg.slbi_lambda, allow_zero=True)


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    new = dataclasses.replace(cfg, **changes)
    validate(new)
    return new
