"""The CIFAR ResNets of He et al. 2016 (section 4.2): ResNet-20/32/44/56/110.

Depth 6n + 2: a 3x3 conv to 16 channels, three stages of n basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 strides by 2), global average pool, linear.

Shortcut choice: option B (a 1x1 conv + BN projection where the shape changes, identity
elsewhere) rather than the paper's parameter-free option A (zero-padded strided identity).
Option B is an ordinary module that Torch-Pruning's dependency graph and Grad-CAM handle
without special cases; it costs 2,752 extra parameters at the two downsampling points
(ResNet-20: 272,474 vs option A's 269,722). Init: Kaiming-normal conv/linear weights.
"""
from __future__ import annotations

import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import make_activation
from cifarlab.models.resnet import BasicBlock
from cifarlab.models.registry import register_model


class CifarResNet(nn.Module):
    def __init__(self, depth=20, num_classes=10, in_channels=3, activation="relu"):
        super().__init__()
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = make_activation(activation)
        self.layer1 = self._make_layer(16, n, 1, activation)
        self.layer2 = self._make_layer(32, n, 2, activation)
        self.layer3 = self._make_layer(64, n, 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes, n, stride, activation):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, activation))  # option-B shortcut
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.pool(out).flatten(1))


@register_model()
def cifar_resnet(num_classes=10, in_channels=3, depth=20, activation="relu"):
    """Any depth 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"model 'cifar_resnet': depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
    return CifarResNet(depth, num_classes, in_channels, activation)


@register_model()
def resnet20(num_classes=10, in_channels=3, activation="relu"):
    return cifar_resnet(num_classes, in_channels, 20, activation)


@register_model()
def resnet32(num_classes=10, in_channels=3, activation="relu"):
    return cifar_resnet(num_classes, in_channels, 32, activation)


@register_model()
def resnet44(num_classes=10, in_channels=3, activation="relu"):
    return cifar_resnet(num_classes, in_channels, 44, activation)


@register_model()
def resnet56(num_classes=10, in_channels=3, activation="relu"):
    return cifar_resnet(num_classes, in_channels, 56, activation)


@register_model()
def resnet110(num_classes=10, in_channels=3, activation="relu"):
    return cifar_resnet(num_classes, in_channels, 110, activation)
