"""ResNeXt (Xie et al. 2017) for small images, pytorch-cifar style.

A 1x1 stem conv to 64 channels (no downsampling), then stages of bottleneck blocks
1x1 -> grouped 3x3 (``cardinality`` groups) -> 1x1 with expansion 2. The group width
cardinality x bottleneck_width doubles after every stage; the first block of stages 2+
downsamples by stride 2 on the grouped conv. ResNeXt-29 has 3 stages of [3, 3, 3] blocks
(classifier input cardinality x width x 8), ResNeXt-50 4 stages of [3, 4, 6, 3]
(classifier input cardinality x width x 16). Adaptive average pool head (equals
pytorch-cifar's fixed 8x8 / 4x4 pool on 32x32 inputs).
"""
from __future__ import annotations

import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import check_positive, make_activation
from cifarlab.models.registry import register_model


class Block(nn.Module):
    expansion = 2

    def __init__(self, in_planes, cardinality=32, bottleneck_width=4, stride=1, activation="relu"):
        super().__init__()
        group_width = cardinality * bottleneck_width
        out_planes = self.expansion * group_width
        self.conv1 = nn.Conv2d(in_planes, group_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1,
                               groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.conv3 = nn.Conv2d(group_width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.act = make_activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


class ResNeXt(nn.Module):
    def __init__(self, num_blocks, cardinality, bottleneck_width, num_classes=10, in_channels=3,
                 activation="relu"):
        super().__init__()
        self.cardinality = cardinality
        self.bottleneck_width = bottleneck_width  # grows x2 per stage in _make_layer
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(activation)
        for i, n in enumerate(num_blocks):  # layer1 .. layer3 (or layer4)
            setattr(self, f"layer{i + 1}", self._make_layer(n, 1 if i == 0 else 2, activation))
        self.num_stages = len(num_blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)  # = cardinality*width*2^(stages+1)

    def _make_layer(self, n, stride, activation):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(Block(self.in_planes, self.cardinality, self.bottleneck_width, s, activation))
            self.in_planes = Block.expansion * self.cardinality * self.bottleneck_width
        self.bottleneck_width *= 2
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(self.pool(out).flatten(1))


def _resnext(name, num_blocks, cardinality, width, num_classes, in_channels, activation):
    check_positive(name, cardinality=cardinality, bottleneck_width=width)
    return ResNeXt(num_blocks, cardinality, width, num_classes, in_channels, activation)


@register_model()
def resnext29_2x32d(num_classes=10, in_channels=3, activation="relu"):
    return _resnext("resnext29_2x32d", [3, 3, 3], 2, 32, num_classes, in_channels, activation)


@register_model()
def resnext29_2x64d(num_classes=10, in_channels=3, activation="relu"):
    return _resnext("resnext29_2x64d", [3, 3, 3], 2, 64, num_classes, in_channels, activation)


@register_model()
def resnext29_32x4d(num_classes=10, in_channels=3, activation="relu"):
    return _resnext("resnext29_32x4d", [3, 3, 3], 32, 4, num_classes, in_channels, activation)


@register_model()
def resnext29_8x64d(num_classes=10, in_channels=3, activation="relu"):
    return _resnext("resnext29_8x64d", [3, 3, 3], 8, 64, num_classes, in_channels, activation)


@register_model()
def resnext50_2x40d(num_classes=10, in_channels=3, activation="relu"):
    return _resnext("resnext50_2x40d", [3, 4, 6, 3], 2, 40, num_classes, in_channels, activation)


@register_model()
def resnext50_8x14d(num_classes=10, in_channels=3, activation="relu"):
    return _resnext("resnext50_8x14d", [3, 4, 6, 3], 8, 14, num_classes, in_channels, activation)


@register_model()
def resnext50_32x4d(num_classes=10, in_channels=3, activation="relu"):
    return _resnext("resnext50_32x4d", [3, 4, 6, 3], 32, 4, num_classes, in_channels, activation)


@register_model()
def resnext(num_classes=10, in_channels=3, depth=29, cardinality=32, bottleneck_width=4,
            activation="relu"):
    """Generic ResNeXt-29 ([3,3,3]) or ResNeXt-50 ([3,4,6,3]) of any cardinality x width."""
    stages = {29: [3, 3, 3], 50: [3, 4, 6, 3]}
    if depth not in stages:
        raise ConfigError(f"model 'resnext': depth must be 29 or 50, got {depth!r}")
    return _resnext("resnext", stages[depth], cardinality, bottleneck_width, num_classes,
                    in_channels, activation)
