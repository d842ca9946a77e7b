"""The four structural levels of dropout (Cai et al. 2019), as plain modules.

Level      what one Bernoulli draw removes                 mask shape (x: N x C x H x W)
neuron     one element (nn.Dropout)                         N x C x H x W
channel    one channel of one sample (nn.Dropout2d)         N x C x 1 x 1
path       one conv path (a group of channels) of a block   N x G x 1 x 1 ("row") or 1 x G ("batch")
layer      the whole residual function of a block           N x 1 x 1 x 1 ("row") or 1 x 1 ("batch")

Every level scales what it keeps by 1/(1-p) in training (so the expectation is unchanged) and
is the identity in eval mode. ``mode="row"`` draws per sample (timm DropPath, torchvision
StochasticDepth "row"); ``mode="batch"`` draws once per mini-batch, as the original code did.

``drop_type`` names: none | neuron | channel | path | layer. The original's integer codes
are accepted too: 0 neuron, 1 channel, 2 path, 3 layer (its README runs ``--drop_type=1`` as
"dropChannel"); "no dropout" there was a rate of 0, here it is also ``none``.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth

from cifarlab.errors import ConfigError

DROP_TYPES = ("neuron", "channel", "path", "layer")
_ORIGINAL_CODES = {"0": "neuron", "1": "channel", "2": "path", "3": "layer"}
MODES = ("row", "batch")


def parse_drop_type(value) -> str | None:
    """Canonical drop-type name (or None for no dropout) from a name or the original's code."""
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int: reject before the int branch
        raise ConfigError(f"drop_type must be one of none, {', '.join(DROP_TYPES)} (or 0-3), got {value!r}")
    text = str(value).strip().lower()
    if text in ("none", ""):
        return None
    if text in _ORIGINAL_CODES:
        return _ORIGINAL_CODES[text]
    if text in DROP_TYPES:
        return text
    raise ConfigError(f"drop_type must be one of none, {', '.join(DROP_TYPES)} "
                      f"(or the original's codes 0-3), got {value!r}")


def check_rate(p) -> float:
    """A drop probability in [0, 1); 1 would zero everything and make the 1/(1-p) scale infinite."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ConfigError(f"drop rate must be a number in [0, 1), got {p!r}")
    return float(p)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ConfigError(f"drop mode must be 'row' (per sample) or 'batch' (per mini-batch), got {mode!r}")
    return mode


class DropBase(nn.Module):
    """Common state of the four levels: the rate, and nothing else to learn."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = check_rate(p)

    def active(self) -> bool:
        return self.training and self.p > 0.0

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropNeuron(DropBase):
    """Element-wise dropout: each activation is zeroed independently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)


class DropChannel(DropBase):
    """Whole feature maps of one sample are zeroed together (mask N x C x 1 x 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep)


class DropPath(DropBase):
    """Drop whole conv paths of a multi-path block.

    The channels are split into ``groups`` consecutive paths (the groups of a grouped conv,
    i.e. the cardinality paths of a ResNeXt block); each path is kept or zeroed as a unit,
    per sample (``mode="row"``) or for the whole mini-batch (``mode="batch"``). With
    ``groups=1`` the conv is one path and this is torchvision's stochastic depth.
    """

    def __init__(self, p: float = 0.5, mode: str = "row", groups: int = 1):
        super().__init__(p)
        self.mode = check_mode(mode)
        if not isinstance(groups, int) or groups < 1:
            raise ConfigError(f"drop-path groups must be a positive integer, got {groups!r}")
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return x
        if self.groups == 1:
            return stochastic_depth(x, self.p, self.mode, True)
        n, c = x.shape[0], x.shape[1]
        if c % self.groups:
            raise ConfigError(f"drop-path: {c} channels cannot be split into {self.groups} paths")
        keep = 1.0 - self.p
        rows = n if self.mode == "row" else 1
        mask = torch.empty((rows, self.groups), dtype=x.dtype, device=x.device).bernoulli_(keep)
        # one draw per (sample, path), repeated over the path's channels
        mask = mask.repeat_interleave(c // self.groups, dim=1).div_(keep)
        return x * mask.view(rows, c, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}, groups={self.groups}"


class DropLayer(DropBase):
    """Drop the whole residual function of a block; the caller adds the shortcut afterwards.

    ``out = shortcut(x) + DropLayer(F(x))``: a dropped sample passes through the identity.
    """

    def __init__(self, p: float = 0.5, mode: str = "row"):
        super().__init__(p)
        self.mode = check_mode(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return x
        return stochastic_depth(x, self.p, self.mode, True)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"
