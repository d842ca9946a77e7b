"""AlexNet (torchvision's single-tower layout) adapted to 32x32 and 28x28 inputs.

torchvision's layer structure and indices are kept: features = 5 convs (64, 192, 384, 256,
256 channels) with 3 overlapping 3x3/stride-2 max-pools after conv 1, 2 and 5; avgpool; a
classifier Dropout-Linear(4096)-act-Dropout-Linear(4096)-act-Linear(classes).
Adaptation to small inputs (documented departures):
  - conv1 is 3x3 stride 1 padding 1 instead of 11x11 stride 4, which would leave a 32x32
    image 7x7 before the first pool;
  - the max-pools get padding 1, so each exactly halves (rounding up): 32-16-8-4 and
    28-14-7-4 instead of torchvision's 32-15-7-3;
  - the adaptive avgpool outputs 2x2 (not 6x6, which would only upsample a 4x4 map), so
    fc1 is Linear(256*2*2, 4096).
All other parameters have torchvision's shapes. 23,468,874 parameters for CIFAR-10.
"""
from __future__ import annotations

import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model


class AlexNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, dropout=0.5, activation="relu"):
        super().__init__()
        act = lambda: make_activation(activation)  # noqa: E731 - one fresh module per slot
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1), act(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(64, 192, 5, padding=2), act(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(192, 384, 3, padding=1), act(),
            nn.Conv2d(384, 256, 3, padding=1), act(),
            nn.Conv2d(256, 256, 3, padding=1), act(),
            nn.MaxPool2d(3, 2, padding=1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 2 * 2, 4096), act(),
            nn.Dropout(dropout), nn.Linear(4096, 4096), act(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model()
def alexnet(num_classes=10, in_channels=3, dropout=0.5, activation="relu"):
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model 'alexnet': dropout must be in [0, 1), got {dropout}")
    return AlexNet(num_classes, in_channels, dropout, activation)
