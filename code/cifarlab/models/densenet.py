"""DenseNet-BC (Huang et al. 2017) for small images, pytorch-cifar style.

Stem: one 3x3 conv to 2 x growth channels (no stride, no pool). Dense blocks of bottleneck
layers BN-act-conv1x1(4 x growth)-BN-act-conv3x3(growth) whose output is concatenated to the
input; between blocks a transition BN-act-conv1x1 (channels x reduction, floored) and a 2x2
average pool. Head: BN-act, global average pool, linear. The pool is adaptive: pytorch-cifar's
fixed 4x4 pool is the same on 32x32 inputs (4x4 maps), and 28x28 inputs end at 3x3 maps.
DenseNet-121 = growth 32, blocks 6-12-24-16: 6,956,298 parameters for CIFAR-10.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import check_positive, make_activation
from cifarlab.models.registry import register_model


class DenseLayer(nn.Module):
    def __init__(self, in_planes, growth_rate, activation="relu"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.act = make_activation(activation)

    def forward(self, x):
        out = self.conv1(self.act(self.bn1(x)))
        out = self.conv2(self.act(self.bn2(out)))
        return torch.cat([out, x], 1)  # new features first, as in pytorch-cifar


class Transition(nn.Module):
    def __init__(self, in_planes, out_planes, activation="relu"):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.act = make_activation(activation)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(self.act(self.bn(x))))


class DenseNet(nn.Module):
    def __init__(self, nblocks, growth_rate=12, reduction=0.5, num_classes=10, in_channels=3,
                 activation="relu"):
        super().__init__()
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        for i, n in enumerate(nblocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth_rate, activation))
                planes += growth_rate
            setattr(self, f"dense{i + 1}", nn.Sequential(*layers))
            if i < len(nblocks) - 1:  # trans1 .. trans3: compress and halve the resolution
                out_planes = int(math.floor(planes * reduction))
                setattr(self, f"trans{i + 1}", Transition(planes, out_planes, activation))
                planes = out_planes
        self.num_blocks = len(nblocks)
        self.bn = nn.BatchNorm2d(planes)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        for i in range(1, self.num_blocks):
            out = getattr(self, f"trans{i}")(getattr(self, f"dense{i}")(out))
        out = getattr(self, f"dense{self.num_blocks}")(out)
        out = self.act(self.bn(out))
        return self.linear(self.pool(out).flatten(1))


@register_model()
def densenet121(num_classes=10, in_channels=3, growth_rate=32, reduction=0.5, activation="relu"):
    check_positive("densenet121", growth_rate=growth_rate)
    if not 0.0 < reduction <= 1.0:
        raise ConfigError(f"model 'densenet121': reduction must be in (0, 1], got {reduction}")
    return DenseNet([6, 12, 24, 16], growth_rate, reduction, num_classes, in_channels, activation)
