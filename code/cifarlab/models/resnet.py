"""ResNet-18/34/50/101/152 for small images (pytorch-cifar style).

He et al. 2016 with the ImageNet stem replaced for 32x32 inputs: a 3x3 stride-1 conv and no
max-pool, so layer1..layer4 see 32, 16, 8 and 4 pixels (28x28 inputs: 28, 14, 7, 4). These
are also the "ResNets adapted to 32x32" of the EDropout paper. Shortcuts are identity, or a
1x1 conv + BN where the shape changes. The head is an adaptive 1x1 average pool (identical to
pytorch-cifar's fixed 4x4 pool on 32x32 inputs, and valid for any size).
Apart from conv1 and the classifier, parameters have exactly torchvision's shapes.
"""
from __future__ import annotations

import torch.nn as nn

from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = make_activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # stride on the 3x3 conv, as in torchvision ("ResNet v1.5")
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act = make_activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, in_channels=3, activation="relu"):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(activation)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1, activation)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2, activation)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2, activation)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, n, stride, activation):
        layers = []
        for s in [stride] + [1] * (n - 1):  # only the first block of a stage downsamples
            layers.append(block(self.in_planes, planes, s, activation))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


@register_model()
def resnet18(num_classes=10, in_channels=3, activation="relu"):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, activation)


@register_model()
def resnet34(num_classes=10, in_channels=3, activation="relu"):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, activation)


@register_model()
def resnet50(num_classes=10, in_channels=3, activation="relu"):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, activation)


@register_model()
def resnet101(num_classes=10, in_channels=3, activation="relu"):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, in_channels, activation)


@register_model()
def resnet152(num_classes=10, in_channels=3, activation="relu"):
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, in_channels, activation)
