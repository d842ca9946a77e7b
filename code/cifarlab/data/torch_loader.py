"""The DataLoader path for variable-size datasets (Flowers-102): torchvision dataset, PIL
transforms in worker processes, batches moved to the device. Same interface as DeviceLoader:
(x float32 normalised, y int64) on the device, set_epoch, len, num_samples, sharding.

Reproducibility: the sampler hands each worker (index, seed) pairs drawn from the epoch's
generator, and each image is transformed under its own seed (torch.random.fork_rng), so epoch k
is the same whatever the number of workers, and the trainer's global RNG is left untouched.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from cifarlab.data.device_loader import epoch_seed, ragged_trim, shard_positions


class Cutout:
    """Zero a size x size square inside a C x H x W tensor image (same rule as the device
    loader: the square lies inside the image), drawing from torch's global RNG."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y0 = int(torch.randint(0, max(h - self.size, 0) + 1, ()))
        x0 = int(torch.randint(0, max(w - self.size, 0) + 1, ()))
        x = x.clone()
        x[..., y0:y0 + self.size, x0:x0 + self.size] = 0
        return x


def flowers_transforms(size: int, mean, std, train: bool, augment: bool, cutout: int = 0, flip: bool = True):
    """PIL -> normalised tensor. Training with augmentation: RandomResizedCrop + flip (unless
    ``flip`` is False) (+ cutout); otherwise Resize(shorter side) + CenterCrop, which keeps the
    aspect ratio."""
    from torchvision import transforms as T

    if train and augment:
        steps = [T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if flip else []) + [T.ToTensor()]
        if cutout > 0:
            steps.append(Cutout(cutout))
    else:
        steps = [T.Resize(size), T.CenterCrop(size), T.ToTensor()]
    return T.Compose(steps + [T.Normalize(mean, std)])


class _SeededTransform(Dataset):
    """base[i] (PIL, label) -> (transform(PIL) under seed, label); keys are (i, seed)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        i, seed = key
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed (unforked) GPU generators
            torch.default_generator.manual_seed(seed)
            x = self.transform(img)
        return x, label


class TorchLoader:
    def __init__(self, dataset, indices, transform, batch_size: int, device="cpu", *, shuffle: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, drop_last: bool = False):
        self.dataset = _SeededTransform(dataset, transform)
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shuffle, self.seed = shuffle, seed
        self.num_workers = num_workers
        self.epoch = 0
        self._positions = shard_positions(len(self.indices), rank, world_size, even=shuffle)
        m, bs = len(self._positions), self.batch_size
        self.num_samples = ragged_trim(m, bs, shuffle, drop_last)  # as DeviceLoader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def epoch_keys(self) -> list[tuple[int, int]]:
        n = len(self.indices)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        pos = self._positions[: self.num_samples]
        return list(zip(self.indices[order[pos]].tolist(), seeds[pos].tolist()))

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.epoch_keys(),
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
