"""Model registry (timm style): families register builders by lower-case name."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from cifarlab.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None):
    """Decorator: ``@register_model()`` registers under the function name."""

    def deco(fn):
        key = (name or fn.__name__).lower()
        if key in _MODELS:
            raise RuntimeError(f"model {key!r} registered twice")
        _MODELS[key] = fn
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    key = name.lower()
    if key not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}")
    try:
        return _MODELS[key](num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:  # an option this family does not take
        raise ConfigError(f"model {name!r}: {exc}") from None
