"""SqueezeNet 1.1 (torchvision's layout) adapted to 32x32 and 28x28 inputs.

Fire module: 1x1 squeeze conv -> act, then 1x1 and 3x3 expand convs (each -> act)
concatenated. features = conv1, act, pool, Fire x2, pool, Fire x2, pool, Fire x4 with
torchvision's widths; classifier = Dropout, 1x1 conv to classes, act, global average pool.
Adaptation to small inputs (documented departures; indices of ``features`` are kept):
  - conv1 is 3x3 with stride 1 and padding 1 (torchvision: stride 2, no padding);
  - the first max-pool is dropped (an ``nn.Identity`` holds its index), so the fires see
    32 -> 16 -> 8 pixels (28 -> 14 -> 7) instead of a 32x32 image shrinking to 1x1.
Kernel shapes are unchanged, so the parameter count equals torchvision's squeezenet1_1 with
the same number of classes: 727,626 for CIFAR-10. Init as torchvision: Kaiming-uniform
convs, the final conv N(0, 0.01), zero biases.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model


class Fire(nn.Module):
    def __init__(self, inplanes, squeeze_planes, expand1x1_planes, expand3x3_planes, activation="relu"):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, 1)
        self.squeeze_activation = make_activation(activation)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, 1)
        self.expand1x1_activation = make_activation(activation)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, 3, padding=1)
        self.expand3x3_activation = make_activation(activation)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, dropout=0.5, activation="relu"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1),
            make_activation(activation),
            nn.Identity(),  # torchvision's first max-pool, dropped for small inputs
            Fire(64, 16, 64, 64, activation),
            Fire(128, 16, 64, 64, activation),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128, activation),
            Fire(256, 32, 128, 128, activation),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192, activation),
            Fire(384, 48, 192, 192, activation),
            Fire(384, 64, 256, 256, activation),
            Fire(512, 64, 256, 256, activation),
        )
        final_conv = nn.Conv2d(512, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), final_conv, make_activation(activation),
                                        nn.AdaptiveAvgPool2d(1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


@register_model()
def squeezenet1_1(num_classes=10, in_channels=3, dropout=0.5, activation="relu"):
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model 'squeezenet1_1': dropout must be in [0, 1), got {dropout}")
    return SqueezeNet(num_classes, in_channels, dropout, activation)
