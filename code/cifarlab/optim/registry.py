"""Optimizer registry: name -> factory(model, cfg) -> torch.optim.Optimizer."""
from __future__ import annotations

from typing import Callable

_OPTIMIZERS: dict[str, Callable] = {}


def register_optimizer(name: str):
    def deco(fn):
        _OPTIMIZERS[name] = fn
        return fn

    return deco


def optimizer_factory(name: str) -> Callable:
    return _OPTIMIZERS[name]
