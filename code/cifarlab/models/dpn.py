"""Dual Path Networks (Chen et al. 2017) for small images, pytorch-cifar style.

A block is 1x1 -> grouped 3x3 (32 groups) -> 1x1 producing out_planes + dense_depth channels.
Its first out_planes channels are added to the shortcut's (the residual path); the remaining
channels are concatenated to the shortcut's extra channels (the densely connected path), so a
stage's width grows by dense_depth per block. Stem: 3x3 conv to 64, no pool; head: adaptive
1x1 average pool (pytorch-cifar's fixed 4x4 pool on 32x32 inputs) and a linear layer.
DPN-26: in (96,192,384,768), out (256,512,1024,2048), blocks (2,2,2,2), dense (16,32,24,128).
DPN-92: same widths, blocks (3,4,20,3).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model


class DualPathBlock(nn.Module):
    def __init__(self, last_planes, in_planes, out_planes, dense_depth, stride, first_layer,
                 activation="relu"):
        super().__init__()
        self.out_planes = out_planes
        self.conv1 = nn.Conv2d(last_planes, in_planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, in_planes, 3, stride=stride, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(in_planes)
        self.conv3 = nn.Conv2d(in_planes, out_planes + dense_depth, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes + dense_depth)
        self.act = make_activation(activation)
        self.shortcut = nn.Sequential()
        if first_layer:  # the stage's first block projects (and possibly downsamples)
            self.shortcut = nn.Sequential(
                nn.Conv2d(last_planes, out_planes + dense_depth, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes + dense_depth),
            )

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        x = self.shortcut(x)
        d = self.out_planes
        out = torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1)
        return self.act(out)


class DPN(nn.Module):
    def __init__(self, in_planes, out_planes, num_blocks, dense_depth, num_classes=10,
                 in_channels=3, activation="relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(activation)
        self.last_planes = 64
        for i in range(4):
            setattr(self, f"layer{i + 1}", self._make_layer(
                in_planes[i], out_planes[i], num_blocks[i], dense_depth[i], 1 if i == 0 else 2, activation))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[3] + (num_blocks[3] + 1) * dense_depth[3], num_classes)

    def _make_layer(self, in_planes, out_planes, n, dense_depth, stride, activation):
        layers = []
        for i, s in enumerate([stride] + [1] * (n - 1)):
            layers.append(DualPathBlock(self.last_planes, in_planes, out_planes, dense_depth, s,
                                        i == 0, activation))
            self.last_planes = out_planes + (i + 2) * dense_depth
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


_WIDTHS = dict(in_planes=(96, 192, 384, 768), out_planes=(256, 512, 1024, 2048),
               dense_depth=(16, 32, 24, 128))


@register_model()
def dpn26(num_classes=10, in_channels=3, activation="relu"):
    return DPN(num_blocks=(2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels,
               activation=activation, **_WIDTHS)


@register_model()
def dpn92(num_classes=10, in_channels=3, activation="relu"):
    return DPN(num_blocks=(3, 4, 20, 3), num_classes=num_classes, in_channels=in_channels,
               activation=activation, **_WIDTHS)
