"""Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings"; pytorch-cifar style).

Each block computes BN-act-conv twice and adds the shortcut without a final activation. A
projection shortcut (1x1 conv, no BN) is taken from the pre-activated input. As in
pytorch-cifar there is no final BN-act before the pool, which gives 11,171,146 parameters
for CIFAR-10.
"""
from __future__ import annotations

import torch.nn as nn

from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.act = make_activation(activation)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10, in_channels=3, activation="relu"):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1, activation)
        self.layer2 = self._make_layer(128, num_blocks[1], 2, activation)
        self.layer3 = self._make_layer(256, num_blocks[2], 2, activation)
        self.layer4 = self._make_layer(512, num_blocks[3], 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)  # = pytorch-cifar's 4x4 pool on 32x32 inputs
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, n, stride, activation):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s, activation))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


@register_model()
def preact_resnet18(num_classes=10, in_channels=3, activation="relu"):
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels, activation)
