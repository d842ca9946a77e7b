"""CIFAR networks built from ``conv_block`` with structural dropout (Cai et al. 2019).

    preresnet_drop  pre-activation bottleneck ResNet, depth 9n+2 (n blocks per stage),
                    widths 16/32/64 x arg1 (widen), expansion 4
    wrn_drop        wide ResNet, depth 6n+4, widths 16, 16k, 32k, 64k with k = arg1
    densenet_drop   DenseNet-BC, depth 6n+4 (n bottleneck layers per dense block),
                    growth rate arg1, compression 0.5
    resnext_drop    ResNeXt, depth 9n+2, cardinality arg1, base width ``base_width``,
                    stage outputs 64 x widen_factor x 1/2/4

Where each level acts (one dropout per block, in the block's 3x3 conv as the paper places it):
    neuron, channel  inside that conv_block, at the position ``block_type`` gives it;
    path             inside that conv_block: its conv's groups are the paths. In ResNeXt these
                     are the ``cardinality`` paths of the aggregated transform; in the
                     single-path blocks (pre-act ResNet, WRN, DenseNet) the 3x3 conv is the
                     one path, dropped whole for a sample while the block's 1x1 convs and
                     shortcut stay;
    layer            the whole residual function (ResNet, WRN, ResNeXt: ``x + F(x)`` becomes
                     ``x`` for a dropped sample) or a dense layer's new feature maps (DenseNet).
``drop_mode`` "row" (per sample, default) or "batch" (one draw per mini-batch, the original's)
applies to path and layer. Every net is: 3x3 stem conv, three stages, norm-ReLU, global
average pool, linear. Shortcut projections are 1x1 convs without norm, and modules are
registered in data-flow order (variance-shift tracking relies on it).

``model_from_config(cfg, num_classes, in_channels)`` is what the Trainer calls.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from cifarlab.dropout.conv_block import conv_block, make_norm, track_norms_after_dropout
from cifarlab.dropout.layers import DropLayer, check_mode, check_rate, parse_drop_type
from cifarlab.errors import ConfigError
from cifarlab.models.registry import build_model, register_model


class _Opts:
    """The drop/norm options every block of one network shares."""

    def __init__(self, block_type, drop_type, drop_rate, norm, drop_mode):
        self.block_type = block_type
        self.drop_type = parse_drop_type(drop_type)
        self.drop_rate = check_rate(drop_rate)
        self.norm = norm
        self.drop_mode = check_mode(drop_mode)

    def block(self, in_ch, out_ch, kernel=3, stride=1, groups=1, drop=False):
        """A conv_block; ``drop`` marks the one that carries the block's in-conv dropout."""
        kind = self.drop_type if drop and self.drop_type != "layer" else None
        return conv_block(in_ch, out_ch, kernel, stride, self.block_type, kind, self.drop_rate,
                          self.norm, groups=groups, drop_mode=self.drop_mode)

    def drop_layer(self):
        return DropLayer(self.drop_rate, self.drop_mode) if self.drop_type == "layer" else None


class _Residual(nn.Module):
    """``shortcut(x) + DropLayer(body(x))``; the shortcut is identity or a 1x1 conv."""

    def __init__(self, body: nn.Sequential, opts: _Opts, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.body = body
        self.drop_layer = opts.drop_layer()
        self.shortcut = (nn.Identity() if in_ch == out_ch and stride == 1
                         else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.body(x)
        if self.drop_layer is not None:
            out = self.drop_layer(out)
        return self.shortcut(x) + out


class _DenseLayer(nn.Module):
    """DenseNet-BC bottleneck layer: concatenate the input with k new maps (maybe dropped)."""

    def __init__(self, opts: _Opts, in_ch: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(opts.block(in_ch, 4 * growth, kernel=1),
                                  opts.block(4 * growth, growth, drop=True))
        self.drop_layer = opts.drop_layer()

    def forward(self, x):
        new = self.body(x)
        if self.drop_layer is not None:
            new = self.drop_layer(new)
        return torch.cat([x, new], 1)


class DropoutNet(nn.Module):
    """Stem conv, stages, norm-ReLU head, pool, linear; optional variance-shift tracking."""

    def __init__(self, stem_ch: int, stages: nn.Sequential, out_ch: int, opts: _Opts,
                 num_classes: int, in_channels: int, report_ratio: bool):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem_ch, 3, padding=1, bias=False)
        self.stages = stages
        self.head_norm = make_norm(opts.norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)
        if report_ratio:
            if opts.drop_type is None:
                raise ConfigError("report_ratio tracks the norm layers after dropout: set a drop_type "
                                  "(a drop_rate of 0 gives the no-dropout baseline)")
            track_norms_after_dropout(self)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = self.pool(self.relu(self.head_norm(x)))
        return self.fc(torch.flatten(x, 1))


def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _blocks_per_stage(net: str, depth, per_block: int, extra: int, examples: str) -> int:
    depth = _int(f"{net} depth", depth)
    if depth < per_block + extra or (depth - extra) % per_block:
        raise ConfigError(f"{net} depth must be {per_block}n+{extra} ({examples}), got {depth}")
    return (depth - extra) // per_block


def _width(name: str, base: int, factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or factor <= 0:
        raise ConfigError(f"{name} must be a positive number, got {factor!r}")
    width = int(round(base * factor))
    if width < 1:
        raise ConfigError(f"{name} {factor} gives a width below 1 channel")
    return width


@register_model("preresnet_drop")
def preresnet_drop(num_classes=10, in_channels=3, depth=110, arg1=1.0, block_type=0, drop_type=None,
                   drop_rate=0.0, norm="bn", report_ratio=False, drop_mode="row", base_width=16):
    """Pre-activation bottleneck ResNet (depth 9n+2; 110 -> 12 blocks per stage), widen = arg1."""
    n = _blocks_per_stage("preresnet", depth, 9, 2, "11, 20, 29, ..., 110, 164")
    opts = _Opts(block_type, drop_type, drop_rate, norm, drop_mode)
    stem = _width("preresnet base_width", base_width, 1)
    blocks, in_ch = [], stem
    for stage in range(3):
        planes = _width("preresnet widen (arg1)", base_width * 2 ** stage, arg1)
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            body = nn.Sequential(opts.block(in_ch, planes, kernel=1),
                                 opts.block(planes, planes, stride=stride, drop=True),
                                 opts.block(planes, 4 * planes, kernel=1))
            blocks.append(_Residual(body, opts, in_ch, 4 * planes, stride))
            in_ch = 4 * planes
    return DropoutNet(stem, nn.Sequential(*blocks), in_ch, opts, num_classes, in_channels, report_ratio)


@register_model("wrn_drop")
def wrn_drop(num_classes=10, in_channels=3, depth=28, arg1=10, block_type=0, drop_type=None,
             drop_rate=0.0, norm="bn", report_ratio=False, drop_mode="row", base_width=16):
    """Wide ResNet (depth 6n+4, widen k = arg1); dropout between the two 3x3 convs as in WRN."""
    n = _blocks_per_stage("wrn", depth, 6, 4, "10, 16, 22, 28, 40")
    opts = _Opts(block_type, drop_type, drop_rate, norm, drop_mode)
    stem = _width("wrn base_width", base_width, 1)
    blocks, in_ch = [], stem
    for stage in range(3):
        width = _width("wrn widen (arg1)", base_width * 2 ** stage, arg1)
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            body = nn.Sequential(opts.block(in_ch, width, stride=stride),
                                 opts.block(width, width, drop=True))
            blocks.append(_Residual(body, opts, in_ch, width, stride))
            in_ch = width
    return DropoutNet(stem, nn.Sequential(*blocks), in_ch, opts, num_classes, in_channels, report_ratio)


@register_model("densenet_drop")
def densenet_drop(num_classes=10, in_channels=3, depth=100, arg1=12, block_type=0, drop_type=None,
                  drop_rate=0.0, norm="bn", report_ratio=False, drop_mode="row", reduction=0.5):
    """DenseNet-BC (depth 6n+4; 100 -> 16 layers per dense block), growth rate arg1."""
    n = _blocks_per_stage("densenet", depth, 6, 4, "10, 40, 100, 190")
    growth = _int("densenet growth rate (arg1)", arg1)
    if not 0.0 < reduction <= 1.0:
        raise ConfigError(f"densenet reduction must be in (0, 1], got {reduction}")
    opts = _Opts(block_type, drop_type, drop_rate, norm, drop_mode)
    stem = 2 * growth
    layers, ch = [], stem
    for stage in range(3):
        for _ in range(n):
            layers.append(_DenseLayer(opts, ch, growth))
            ch += growth
        if stage < 2:  # transition: 1x1 conv compresses the channels, then halve the resolution
            out = max(1, int(ch * reduction))
            layers.append(nn.Sequential(opts.block(ch, out, kernel=1), nn.AvgPool2d(2)))
            ch = out
    return DropoutNet(stem, nn.Sequential(*layers), ch, opts, num_classes, in_channels, report_ratio)


@register_model("resnext_drop")
def resnext_drop(num_classes=10, in_channels=3, depth=29, arg1=8, block_type=0, drop_type=None,
                 drop_rate=0.0, norm="bn", report_ratio=False, drop_mode="row", base_width=64,
                 widen_factor=4):
    """ResNeXt (depth 9n+2; 29 -> 3 blocks per stage), cardinality arg1, e.g. 29 8x64d.

    The aggregated transform of a stage-s block is 1x1 -> grouped 3x3 (cardinality groups of
    base_width x 2^s channels) -> 1x1 to 64 x widen_factor x 2^s channels.
    """
    n = _blocks_per_stage("resnext", depth, 9, 2, "11, 20, 29, ...")
    cardinality = _int("resnext cardinality (arg1)", arg1)
    base_width = _int("resnext base_width", base_width)
    widen_factor = _int("resnext widen_factor", widen_factor)
    opts = _Opts(block_type, drop_type, drop_rate, norm, drop_mode)
    stem = 64
    blocks, in_ch = [], stem
    for stage in range(3):
        inner = cardinality * base_width * 2 ** stage
        out = 64 * widen_factor * 2 ** stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            body = nn.Sequential(opts.block(in_ch, inner, kernel=1),
                                 opts.block(inner, inner, stride=stride, groups=cardinality, drop=True),
                                 opts.block(inner, out, kernel=1))
            blocks.append(_Residual(body, opts, in_ch, out, stride))
            in_ch = out
    return DropoutNet(stem, nn.Sequential(*blocks), in_ch, opts, num_classes, in_channels, report_ratio)


# --net-type values (the original's names) -> registered model names
NET_TYPES = {"preresnet": "preresnet_drop", "resnet": "preresnet_drop", "wrn": "wrn_drop",
             "densenet": "densenet_drop", "resnext": "resnext_drop"}


def model_from_config(cfg, num_classes: int, in_channels: int) -> nn.Module | None:
    """The dropout network a TrainConfig asks for, or None when it asks for none.

    ``--net-type preresnet|resnet|wrn|densenet|resnext`` (or ``--model <net>_drop``) selects
    the network; depth, arg1, block_type, drop_type, drop_rate, norm and report_ratio come
    from their own fields, anything else (base_width, drop_mode, ...) from ``model_kwargs``.
    """
    drop_models = set(NET_TYPES.values())
    if cfg.net_type is None:
        if cfg.model not in drop_models:
            return None
        name = cfg.model
    else:
        name = NET_TYPES.get(str(cfg.net_type).lower())
        if name is None:
            raise ConfigError(f"unknown net_type {cfg.net_type!r}; choose one of: {', '.join(NET_TYPES)}")
        if cfg.model in drop_models and cfg.model != name:
            raise ConfigError(f"--model {cfg.model} contradicts --net-type {cfg.net_type}")
    kwargs = dict(block_type=cfg.block_type, drop_type=cfg.drop_type, drop_rate=cfg.drop_rate,
                  norm=cfg.norm, report_ratio=cfg.report_ratio)
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    if cfg.arg1 is not None:
        kwargs["arg1"] = cfg.arg1
    kwargs.update(cfg.model_kwargs or {})
    return build_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
