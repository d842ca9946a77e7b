"""VGG-A for 32x32 inputs, as in the course starter code of the BatchNorm study.

features: conv64 -> pool -> conv128 -> pool -> conv256 x2 -> pool -> conv512 x2 -> pool ->
conv512 x2 -> pool (3x3 convs with bias, padding 1); classifier: Linear(512,512)-act-
Linear(512,512)-act-Linear(512,classes). Variants:
  vgg_a          9,750,922 params (CIFAR-10)
  vgg_a_bn       BatchNorm2d after every conv (before the activation)   9,756,426
  vgg_a_bn_full  also BatchNorm1d after the two hidden linear layers     9,758,474
  vgg_a_light    conv16 -> pool -> conv32 -> pool, classifier
                 Linear(32*8*8,128)-act-Linear(128,128)-act-Linear(128,classes)  285,162
  vgg_a_light_bn the light widths with BatchNorm2d after every conv           285,258
                 (the light pair trains to convergence on a CPU: issue 13)
Init (course starter): Xavier-normal conv/linear weights, zero biases, BN weight 1, bias 0.

Small inputs: the max-pools use ceil_mode=True, so 28x28 inputs go 28-14-7-4-2-1 instead of
collapsing to 0 at the fifth pool (on 32x32, sizes are even and nothing changes). VGG-A adds
an adaptive 1x1 average pool before the classifier (identity on the 1x1 maps of 32x32 and
28x28 inputs; lets larger images through). vgg_a_light adapts its 7x7 maps of a 28x28 input
to the classifier's 8x8 with an adaptive average pool (identity on 32x32 inputs). Neither
pool has parameters, so the counts above are unchanged.
"""
from __future__ import annotations

import torch.nn as nn

from cifarlab.models.layers import make_activation
from cifarlab.models.registry import register_model

# "M" = 2x2 max-pool; numbers = 3x3 conv output channels
_CFG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
_CFG_LIGHT = [16, "M", 32, "M"]


def _features(cfg, in_channels, batch_norm, activation):
    layers, c = [], in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(make_activation(activation))
            c = v
    return nn.Sequential(*layers)


def _classifier(dims, num_classes, batch_norm, activation):
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(a, b))
        if batch_norm:
            layers.append(nn.BatchNorm1d(b))
        layers.append(make_activation(activation))
    layers.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*layers)


def init_course_starter(model: nn.Module) -> nn.Module:
    """Xavier-normal weights and zero biases for conv/linear; BN weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class VGG(nn.Module):
    def __init__(self, cfg, hidden, pool_size, num_classes=10, in_channels=3, batch_norm=False,
                 batch_norm_fc=False, activation="relu"):
        super().__init__()
        self.features = _features(cfg, in_channels, batch_norm, activation)
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        last = [v for v in cfg if v != "M"][-1]
        dims = [last * pool_size * pool_size] + list(hidden)
        self.classifier = _classifier(dims, num_classes, batch_norm_fc, activation)
        init_course_starter(self)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model()
def vgg_a(num_classes=10, in_channels=3, activation="relu"):
    return VGG(_CFG_A, [512, 512], 1, num_classes, in_channels, activation=activation)


@register_model()
def vgg_a_bn(num_classes=10, in_channels=3, activation="relu"):
    return VGG(_CFG_A, [512, 512], 1, num_classes, in_channels, batch_norm=True, activation=activation)


@register_model()
def vgg_a_bn_full(num_classes=10, in_channels=3, activation="relu"):
    return VGG(_CFG_A, [512, 512], 1, num_classes, in_channels, batch_norm=True,
               batch_norm_fc=True, activation=activation)


@register_model()
def vgg_a_light(num_classes=10, in_channels=3, activation="relu"):
    return VGG(_CFG_LIGHT, [128, 128], 8, num_classes, in_channels, activation=activation)


@register_model()
def vgg_a_light_bn(num_classes=10, in_channels=3, activation="relu"):
    return VGG(_CFG_LIGHT, [128, 128], 8, num_classes, in_channels, batch_norm=True, activation=activation)
