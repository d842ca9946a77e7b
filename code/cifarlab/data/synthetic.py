"""Seeded synthetic images: learnable (a class-dependent smooth pattern plus noise), any shape.

Train and test sets drawn with different ``seed`` share the class patterns (``pattern_seed``),
so a model that learns on one generalises to the other: tiny training tests can show learning
without any files.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Pixel statistics of make_synthetic's output on [0, 1] (measured over 20k 3x32x32 images; the
# same within 0.01 for other shapes): used to normalise like any real dataset.
SYNTH_MEAN = 0.5
SYNTH_STD = 0.19


def class_patterns(num_classes: int, shape: tuple[int, int, int], pattern_seed: int = 1234) -> torch.Tensor:
    """(K, C, H, W) float patterns in [0, 1]: random 4x4 grids upsampled, so they are smooth
    (learnable by small convnets with pooling, and still visible after a random crop)."""
    c, h, w = shape
    g = torch.Generator().manual_seed(pattern_seed)
    coarse = torch.rand(num_classes, c, min(4, h), min(4, w), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def make_synthetic(n: int, num_classes: int = 10, shape: tuple[int, int, int] = (3, 32, 32), seed: int = 0,
                   pattern_seed: int = 1234, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (uint8 N x C x H x W) and labels (int64 N), balanced over the classes.

    pixel = clamp(0.2 + 0.6 * pattern[label] + noise * N(0, 1), 0, 1), stored as uint8.
    """
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    patterns = class_patterns(num_classes, shape, pattern_seed)
    x = 0.2 + 0.6 * patterns[labels] + noise * torch.randn(n, *shape, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.long()


class SyntheticVisionDataset(torch.utils.data.Dataset):
    """The synthetic arrays as a torchvision-style dataset of (PIL image, int label), so the
    benchmark's classic PIL-transform loop can run without real files."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, classes=None):
        if images.shape[1] not in (1, 3):
            from cifarlab.errors import DatasetError

            raise DatasetError(f"synthetic PIL images need 1 or 3 channels, got {images.shape[1]}")
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x C like CIFAR10.data
        self.targets = labels.tolist()
        self.transform = transform
        self.classes = classes or [f"class {i}" for i in range(int(labels.max()) + 1 if len(labels) else 0)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        arr = self.data[i]
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]
