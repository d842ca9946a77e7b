"""LeNet-5 as in the DessiLBI MNIST example (the network its pruning demo prunes).

conv1 in->6 5x5 pad 2 -> act -> 2x2 max-pool -> conv2 6->16 5x5 -> act -> 2x2 max-pool ->
conv3 16->120 5x5 -> act -> fc1 120->84 -> act -> fc2 84->classes. The attribute names
conv1, conv2, conv3, fc1, fc2 are relied on by the pruning code (it prunes conv3 and fc1).

On 28x28 inputs conv3's output is 1x1 as in the original; on 32x32 it is 2x2, so an adaptive
1x1 average pool sits before fc1 (a no-op on 28x28): any input of at least 28x28 works.
Parameters: 61,706 with 1 input channel, 62,006 with 3 (10 classes).
"""
from __future__ import annotations

import torch.nn as nn

from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model


class LeNet5(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, activation="relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)
        self.act = make_activation(activation)
        self.max_pool = nn.MaxPool2d(2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.max_pool(self.act(self.conv1(x)))
        x = self.max_pool(self.act(self.conv2(x)))
        x = self.pool(self.act(self.conv3(x))).flatten(1)
        return self.fc2(self.act(self.fc1(x)))


@register_model()
def lenet5(num_classes=10, in_channels=3, activation="relu"):
    return LeNet5(num_classes, in_channels, activation)
