"""Build the model a TrainConfig describes (registry name, or a structural-dropout network)."""
from __future__ import annotations

import inspect

import torch.nn as nn

from cifarlab.models import build_model
from cifarlab.models.registry import _MODELS


def model_from_config(cfg, num_classes: int, in_channels: int) -> nn.Module:
    # the structural-dropout networks of Cai et al. (--net-type or --model <net>_drop)
    from cifarlab.dropout.networks import model_from_config as dropout_model

    net = dropout_model(cfg, num_classes, in_channels)
    if net is not None:
        return net
    kwargs = dict(cfg.model_kwargs or {})
    if cfg.activation is not None:
        builder = _MODELS.get(cfg.model.lower())
        if builder is not None and "activation" not in inspect.signature(builder).parameters \
                and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()):
            from cifarlab.errors import ConfigError

            raise ConfigError(f"model {cfg.model!r} has no activation choice")
        kwargs["activation"] = cfg.activation
    return build_model(cfg.model, num_classes=num_classes, in_channels=in_channels, **kwargs)
