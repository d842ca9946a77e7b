"""Optimizers and learning-rate schedules from a TrainConfig."""
from __future__ import annotations

import torch

from cifarlab.errors import ConfigError
from cifarlab.optim.registry import _OPTIMIZERS


def _fast_kwargs(model: torch.nn.Module) -> dict:
    """foreach on CPU, fused on CUDA: one multi-tensor kernel instead of one per parameter."""
    on_cuda = next(model.parameters()).is_cuda
    return {"fused": True} if on_cuda else {"foreach": True}


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name = cfg.optimizer
    if name in _OPTIMIZERS:  # techniques that bring their own optimizer (SLBI)
        return _OPTIMIZERS[name](model, cfg)
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=(name == "nesterov"), **_fast_kwargs(model))
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                **eps, **_fast_kwargs(model))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 **eps, **_fast_kwargs(model))
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.lr, rho=cfg.rho, weight_decay=cfg.weight_decay,
                                    foreach=True, **eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   foreach=True, **eps)
    raise ConfigError(f"optimizer {name!r} is not available (its module did not register it)")


def default_milestones(cfg) -> list[int]:
    # at least epoch 1, so a 1-epoch run trains at the initial rate
    return list(cfg.milestones) or [max(1, int(cfg.epochs * 0.5)), max(1, int(cfg.epochs * 0.75))]


def build_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Epoch-level schedulers. 'plateau' is stepped with the validation error, the rest with nothing."""
    name = cfg.scheduler
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=default_milestones(cfg), gamma=cfg.gamma)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if name == "none":
        return None
    raise ConfigError(f"unknown scheduler {name!r}")
