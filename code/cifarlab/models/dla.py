"""Deep Layer Aggregation (Yu et al. 2018) for small images, pytorch-cifar's ``DLA``.

Base: three 3x3 conv-BN-act layers 16 -> 16 -> 32 at full resolution. Then hierarchical
aggregation trees of residual basic blocks, 64-128-256-512 channels with levels 1-2-2-1 and
stride 1-2-2-2. A level-1 tree runs two blocks and merges both outputs with a root
(1x1 conv-BN-act over their concatenation). A level-L tree also keeps a strided block of its
input ("prev_root") and the outputs of its subtrees level_{L-1} .. level_1, and its root merges
all L + 2 maps. Head: adaptive 1x1 average pool (pytorch-cifar's 4x4 on 32x32) and linear.
16,291,386 parameters for CIFAR-10.

Note on the original: it builds every subtree from the tree's input width, which only works
for levels <= 2 (the ones used); here a deeper subtree chain takes the previous subtree's
output width, which is the same network for levels <= 2 and valid beyond.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, activation="relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = make_activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Root(nn.Module):
    def __init__(self, in_channels, out_channels, activation="relu"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = make_activation(activation)

    def forward(self, xs):
        return self.act(self.bn(self.conv(torch.cat(xs, 1))))


class Tree(nn.Module):
    def __init__(self, in_channels, out_channels, level=1, stride=1, activation="relu"):
        super().__init__()
        self.level = level
        self.root = Root((level + 2) * out_channels if level > 1 else 2 * out_channels,
                         out_channels, activation)
        if level > 1:
            self.prev_root = BasicBlock(in_channels, out_channels, stride, activation)
            c, s = in_channels, stride
            for i in reversed(range(1, level)):
                setattr(self, f"level_{i}", Tree(c, out_channels, i, s, activation))
                c, s = out_channels, 1
            in_channels, stride = out_channels, 1
        self.left_node = BasicBlock(in_channels, out_channels, stride, activation)
        self.right_node = BasicBlock(out_channels, out_channels, 1, activation)

    def forward(self, x):
        xs = [self.prev_root(x)] if self.level > 1 else []
        for i in reversed(range(1, self.level)):
            x = getattr(self, f"level_{i}")(x)
            xs.append(x)
        x = self.left_node(x)
        xs.append(x)
        x = self.right_node(x)
        xs.append(x)
        return self.root(xs)


def _conv_bn_act(cin, cout, activation):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         make_activation(activation))


class DLA(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, activation="relu"):
        super().__init__()
        self.base = _conv_bn_act(in_channels, 16, activation)
        self.layer1 = _conv_bn_act(16, 16, activation)
        self.layer2 = _conv_bn_act(16, 32, activation)
        self.layer3 = Tree(32, 64, level=1, stride=1, activation=activation)
        self.layer4 = Tree(64, 128, level=2, stride=2, activation=activation)
        self.layer5 = Tree(128, 256, level=2, stride=2, activation=activation)
        self.layer6 = Tree(256, 512, level=1, stride=2, activation=activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.base(x)))
        out = self.layer6(self.layer5(self.layer4(self.layer3(out))))
        return self.linear(self.pool(out).flatten(1))


@register_model()
def dla(num_classes=10, in_channels=3, activation="relu"):
    return DLA(num_classes, in_channels, activation)
