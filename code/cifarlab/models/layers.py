"""Small pieces shared by the model families (no models are registered here)."""
from __future__ import annotations

import torch.nn as nn

from cifarlab.errors import ConfigError

# Names match cifarlab.config.ACTIVATIONS (a test keeps the two in step).
# Modules are built out-of-place: Grad-CAM keeps a reference to hooked activations, which an
# in-place ReLU placed after the hooked layer would silently overwrite.
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01 (PyTorch default)
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def activation_names() -> list[str]:
    return list(_ACTIVATIONS)


def make_activation(name: str | None = "relu") -> nn.Module:
    """A fresh activation module by name; None means ReLU (the families' default)."""
    key = "relu" if name is None else str(name).lower()
    if key not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[key]()


def check_positive(model: str, **values) -> None:
    """Reject non-positive structural options (widths, counts) with one clear line."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model {model!r}: {key} must be a positive integer, got {value!r}")
