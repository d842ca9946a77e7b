"""Loss functions by name: cross-entropy, label-smoothed CE, MSE on one-hot, multi-class margin."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarlab.errors import ConfigError


def mse_onehot(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the logits and the one-hot target (the course's 'MSE loss')."""
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.mse_loss(logits, target)


def multi_margin(logits: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Crammer-Singer style hinge: mean over other classes of max(0, margin - (z_y - z_j))."""
    return F.multi_margin_loss(logits.float(), y, margin=margin)


def build_loss(cfg):
    if cfg.loss == "ce":
        return lambda logits, y: F.cross_entropy(logits, y)
    if cfg.loss == "label_smoothing":
        eps = cfg.label_smoothing
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=eps)
    if cfg.loss == "mse":
        return mse_onehot
    if cfg.loss == "margin":
        margin = cfg.margin
        return lambda logits, y: multi_margin(logits, y, margin)
    raise ConfigError(f"unknown loss {cfg.loss!r}")
