"""The customizable conv block of Cai et al. and variance-shift tracking.

``conv_block`` orders norm, ReLU, dropout and conv in one of four ways (``block_type``):

    0  norm - relu - drop - conv     (recommended by the paper)
    1  norm - relu - conv - drop
    2  drop - conv - norm - relu     (recommended by the paper)
    3  conv - drop - norm - relu

Types 0/1 normalise the block's input (pre-activation), types 2/3 its output. The block holds
drop-neuron, drop-channel or drop-path (the paths are the conv's groups); drop-layer acts on a
whole residual function, so the network places it, not the block.

Variance shift: dropout changes the variance of what the next norm layer sees between
training (with dropout) and evaluation (without), so BatchNorm's running statistics do not
match eval-time inputs. ``TrackedNorm`` wraps a norm layer and accumulates its input's
per-channel mean and variance separately in train and eval mode (buffers only; the output
is the wrapped norm's). ``track_norms_after_dropout`` wraps the first norm layer that follows
each dropout layer.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from cifarlab.dropout.layers import DropBase, DropChannel, DropNeuron, DropPath, parse_drop_type
from cifarlab.errors import ConfigError

BLOCK_TYPES = (0, 1, 2, 3)
NORMS = ("bn", "gn")
GN_GROUPS = 8


def make_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with 8 groups (fewer when the channels do not split into 8)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)
    raise ConfigError(f"norm must be 'bn' or 'gn', got {norm!r}")


def make_drop(drop_type, p: float, groups: int = 1, mode: str = "row") -> nn.Module | None:
    """The dropout module a conv block holds for ``drop_type`` (None when it holds none)."""
    kind = parse_drop_type(drop_type)
    if kind is None:
        return None
    if kind == "neuron":
        return DropNeuron(p)
    if kind == "channel":
        return DropChannel(p)
    if kind == "path":
        return DropPath(p, mode=mode, groups=groups)
    raise ConfigError("drop-layer drops a whole residual function: the network adds it, not conv_block")


def conv_block(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, block_type: int = 0,
               drop_type=None, drop_rate: float = 0.0, norm: str = "bn", groups: int = 1,
               drop_mode: str = "row") -> nn.Sequential:
    """One conv with its norm, ReLU and (optional) dropout in the order ``block_type``."""
    if block_type not in BLOCK_TYPES:
        raise ConfigError(f"block_type must be 0, 1, 2 or 3, got {block_type!r}")
    if in_ch % groups or out_ch % groups:
        raise ConfigError(f"conv groups ({groups}) must divide both channel counts ({in_ch} -> {out_ch})")
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    drop = make_drop(drop_type, drop_rate, groups=groups, mode=drop_mode)
    if block_type in (0, 1):  # pre-activation: normalise the input
        order = [("norm", make_norm(norm, in_ch)), ("relu", nn.ReLU(inplace=True))]
        order += [("drop", drop), ("conv", conv)] if block_type == 0 else [("conv", conv), ("drop", drop)]
    else:
        order = [("drop", drop), ("conv", conv)] if block_type == 2 else [("conv", conv), ("drop", drop)]
        order += [("norm", make_norm(norm, out_ch)), ("relu", nn.ReLU(inplace=True))]
    return nn.Sequential(OrderedDict((name, m) for name, m in order if m is not None))


class TrackedNorm(nn.Module):
    """A norm layer that also records its input statistics, split by train/eval mode.

    Per channel it accumulates the batch mean and (biased) batch variance over N, H, W,
    weighted by the batch size, in ``sums[mode, 0|1]`` with ``counts[mode]`` samples
    (mode 0 = train, 1 = eval). ``reset()`` starts a new window (the callback does it each
    epoch). The buffers are not saved in checkpoints: they are a measurement, not the model.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        channels = norm.num_features if isinstance(norm, nn.BatchNorm2d) else norm.num_channels
        self.register_buffer("sums", torch.zeros(2, 2, channels), persistent=False)
        self.register_buffer("counts", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
            mode = 0 if self.training else 1
            n = x.shape[0]
            self.sums[mode, 0].add_(mean, alpha=n)
            self.sums[mode, 1].add_(var, alpha=n)
            self.counts[mode] += n
        return self.norm(x)

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def input_stats(self) -> torch.Tensor:
        """(2 modes, 2 stats, C): mean and variance per channel in train and eval mode (nan if unseen)."""
        return self.sums / self.counts.view(2, 1, 1)

    def ratios(self) -> tuple[float, float]:
        """(mean ratio, variance ratio), eval over train.

        Mean ratio: average |channel mean| in eval over the same in train (absolute values,
        so channels of opposite sign do not cancel). Variance ratio: average channel variance
        in eval over the same in train. Both are exactly 1 when eval sees what train saw.
        """
        stats = self.input_stats()
        mean_ratio = stats[1, 0].abs().mean() / stats[0, 0].abs().mean()
        var_ratio = stats[1, 1].mean() / stats[0, 1].mean()
        return float(mean_ratio), float(var_ratio)


def track_norms_after_dropout(model: nn.Module) -> int:
    """Wrap in TrackedNorm the first norm layer after each dropout layer; return how many.

    "After" is registration order, which the dropout networks keep equal to data-flow order
    (shortcut convs have no norm, so they never sit between a dropout and its norm).
    """
    targets, pending = [], False
    for name, m in model.named_modules():
        if isinstance(m, TrackedNorm):
            raise ConfigError("this model's norm layers are already tracked")
        if isinstance(m, DropBase):
            pending = True
        elif pending and isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            targets.append(name)
            pending = False
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TrackedNorm(getattr(parent, child)))
    return len(targets)


def tracked_norms(model: nn.Module) -> list[TrackedNorm]:
    """The TrackedNorm layers of a model in forward order."""
    return [m for m in model.modules() if isinstance(m, TrackedNorm)]
