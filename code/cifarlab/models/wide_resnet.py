"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016), in the bias-carrying style of the
widely used wide-resnet.pytorch code that the seed's WRN-28-10 (36,489,290 params) counts.

Depth d = 6n + 4: a 3x3 stem to 16 channels, three stages of n pre-activation blocks with
16k, 32k, 64k channels (stride 1, 2, 2), then BN-act, a global average pool and a linear
layer. Every conv carries a bias (``bias=False`` gives the 36,479,194 of the bias-free
variant). A block is BN-act-conv3x3 -> dropout -> BN-act-conv3x3 (stride on the second conv,
as in that code), plus an identity or 1x1-conv shortcut from the raw block input.

Two documented departures from that code: BatchNorm keeps PyTorch's default momentum (the
original passes momentum=0.9 to its final BN, a TF-convention slip that makes running
statistics follow the last batch), and the pool is adaptive (its fixed 8x8 pool equals a
global pool on 32x32 inputs only). Init as there: Xavier-uniform (gain sqrt 2) convs with
zero bias; BN weight 1, bias 0.
"""
from __future__ import annotations

import math

import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import check_positive, make_activation
from cifarlab.models.registry import register_model


class WideBasic(nn.Module):
    def __init__(self, in_planes, planes, stride=1, dropout=0.0, activation="relu", bias=True):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.act = make_activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias))

    def forward(self, x):
        out = self.dropout(self.conv1(self.act(self.bn1(x))))
        out = self.conv2(self.act(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self, depth=28, widen=10, num_classes=10, in_channels=3, dropout=0.0,
                 activation="relu", bias=True):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=bias)
        self.layer1 = self._make_layer(widths[1], n, 1, dropout, activation, bias)
        self.layer2 = self._make_layer(widths[2], n, 2, dropout, activation, bias)
        self.layer3 = self._make_layer(widths[3], n, 2, dropout, activation, bias)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, n, stride, dropout, activation, bias):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(WideBasic(self.in_planes, planes, s, dropout, activation, bias))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.act(self.bn1(out))
        return self.linear(self.pool(out).flatten(1))


@register_model()
def wide_resnet(depth=28, widen=10, num_classes=10, in_channels=3, dropout=0.0,
                activation="relu", bias=True):
    """Generic WRN-depth-widen; depth must be 6n + 4 (10, 16, 22, 28, 40, ...)."""
    check_positive("wide_resnet", depth=depth, widen=widen)
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"model 'wide_resnet': depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model 'wide_resnet': dropout must be in [0, 1), got {dropout}")
    return WideResNet(depth, widen, num_classes, in_channels, dropout, activation, bias)


@register_model()
def wrn28_10(num_classes=10, in_channels=3, dropout=0.0, activation="relu", bias=True):
    return wide_resnet(28, 10, num_classes, in_channels, dropout, activation, bias)


@register_model()
def wrn16_4(num_classes=10, in_channels=3, dropout=0.0, activation="relu", bias=True):
    return wide_resnet(16, 4, num_classes, in_channels, dropout, activation, bias)


@register_model()
def wrn16_2(num_classes=10, in_channels=3, dropout=0.0, activation="relu", bias=True):
    """WRN-16-2 (0.69M parameters on CIFAR): the wide family small enough for a CPU course table."""
    return wide_resnet(16, 2, num_classes, in_channels, dropout, activation, bias)


@register_model()
def wrn40_2(num_classes=10, in_channels=3, dropout=0.0, activation="relu", bias=True):
    return wide_resnet(40, 2, num_classes, in_channels, dropout, activation, bias)
