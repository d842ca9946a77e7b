"""cifarlab: CIFAR training, BatchNorm study, DessiLBI, structural dropout, EDropout, Grad-CAM."""

__version__ = "0.1.0"
