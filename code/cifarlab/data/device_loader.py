"""DeviceLoader: a whole split kept on the training device as uint8, batched augmentation and
normalisation on the fly, reproducible per epoch, sharded by rank for DDP.

Order and augmentation of epoch k come from one CPU generator seeded from (seed, k) via
``set_epoch(k)`` (the Trainer calls it before each epoch), so a resumed run replays epoch k
exactly without saving loader state. Without ``set_epoch`` every pass uses epoch 0.

Batches:
- training (shuffle=True): every batch has ``batch_size`` images except the last, which holds
  the rest; a last batch of a single image is dropped, since BatchNorm cannot normalise one
  sample in training mode.
- training with ``drop_last=True`` (what ``--compile`` uses): the ragged last batch is dropped
  (not padded: padding would add fake images to the loss and to BatchNorm's statistics), so
  every step has one shape and the compiled model (and its CUDA graphs) is built once. The
  dropped images differ each epoch (the order is reshuffled), so none is left out for good.
  A share smaller than one batch is kept whole (one batch, still one shape).
- evaluation (shuffle=False): the split in its stored order, every image once, the last batch
  partial.

Sharding (world_size > 1): every rank draws the same epoch permutation and takes positions
rank, rank + world_size, ...; training shares are trimmed to the same length (N // world_size,
so all ranks run the same number of steps and DDP's all-reduce never waits on a missing rank);
evaluation shares are not trimmed, so together they score every image exactly once (the Trainer
sums loss/correct/count across ranks). The per-rank batch size is the one given: build_loaders
passes cfg.batch_size // world_size for training, so the global batch stays cfg.batch_size.
"""
from __future__ import annotations

import hashlib

import torch

from cifarlab.data.augment import augment, draw_params, norm_constants, normalize


def epoch_seed(seed: int, epoch: int, stream: str = "loader") -> int:
    """A 63-bit seed from (seed, epoch, stream); nearby seeds/epochs give unrelated streams."""
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def ragged_trim(m: int, batch_size: int, shuffle: bool, drop_last: bool) -> int:
    """How many of m images an epoch uses (see the module docstring): training drops a last
    batch of one image (BatchNorm needs two), or with drop_last the whole ragged last batch."""
    if not shuffle:
        return m
    if drop_last and m >= batch_size:
        return m - m % batch_size
    return m - 1 if (m > 1 and m % batch_size == 1) else m


def shard_positions(n: int, rank: int, world_size: int, even: bool) -> torch.Tensor:
    """Positions rank, rank + world_size, ... of 0..n-1; trimmed to n // world_size if even."""
    pos = torch.arange(rank, n, world_size)
    return pos[: n // world_size] if even else pos


class DeviceLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std,
                 device="cpu", *, shuffle: bool = False, augment: bool = False, pad: int = 4,
                 flip: bool = True, cutout: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # the whole split, uint8, on the device
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.pad, self.flip, self.cutout = (pad, flip, cutout) if augment else (0, False, 0)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.mean, self.std = tuple(mean), tuple(std)
        self._scale, self._shift = norm_constants(mean, std, self.device)
        self.epoch = 0
        self._positions = shard_positions(len(images), rank, world_size, even=shuffle)
        m, bs = len(self._positions), self.batch_size
        self.num_samples = ragged_trim(m, bs, shuffle, drop_last)
        self._num_batches = -(-self.num_samples // bs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images on the device -> the float inputs the model sees."""
        return normalize(x, self._scale, self._shift)

    def epoch_plan(self):
        """(indices into the split, AugmentParams or None) for this rank in the current epoch,
        on the CPU: the permutation and the draws are made for the whole split, then sharded,
        so an image gets the same crop whatever the number of ranks."""
        n = len(self.images)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        pos = self._positions[: self.num_samples]
        params = None
        if self.augment and (self.pad > 0 or self.flip or self.cutout > 0):
            params = draw_params(n, g, self.image_size, self.pad, self.flip, self.cutout).slice(pos)
        return order[pos], params

    def __iter__(self):
        idx, params = self.epoch_plan()
        idx = idx.to(self.device, non_blocking=True)  # one small copy per epoch, none per step
        if params is not None:
            params = params.to(self.device)
        bs = self.batch_size
        for start in range(0, self.num_samples, bs):
            sl = slice(start, start + bs)
            b = idx[sl]
            x = self.images.index_select(0, b)  # ~50x faster than images[b] on CPU
            if params is not None:
                x = augment(x, params.slice(sl), self.pad, self.cutout)
            yield self.normalize(x), self.labels.index_select(0, b)
