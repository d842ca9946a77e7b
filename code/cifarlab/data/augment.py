"""Batched augmentation as a few tensor ops on the device (airbench style), and normalisation.

Random numbers are drawn up front for a whole epoch (``draw_params``) from one seeded CPU
generator, so the augmentation of epoch k depends only on (seed, k): identical on CPU and GPU,
independent of the batch size and of the number of ranks. The per-batch functions are pure.

Semantics, per image:
- crop: zero-pad by ``pad`` on every side, take the H x W window whose top-left corner is
  (dy, dx), dy, dx uniform in [0, 2 * pad] — torchvision's RandomCrop(size, padding=pad);
- flip: mirror left-right with probability 1/2 (after the crop);
- cutout: zero a size x size square whose top-left corner is uniform over the positions that
  keep it inside the image (airbench keeps it inside; DeVries & Taylor's original centres it
  anywhere and clips it at the border, so their squares are sometimes smaller);
- then normalise: (x / 255 - mean) / std per channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentParams:
    """Per-image random draws for one epoch (index = position in the epoch's order)."""
    offsets: torch.Tensor | None  # (N, 2) int64 (dy, dx) in [0, 2 * pad]; None: no crop
    flip: torch.Tensor | None  # (N,) bool; None: no flip
    cutout: torch.Tensor | None  # (N, 2) int64 top-left corner of the square; None: no cutout

    def to(self, device) -> "AugmentParams":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return AugmentParams(move(self.offsets), move(self.flip), move(self.cutout))

    def slice(self, sl) -> "AugmentParams":
        take = lambda t: None if t is None else t[sl]  # noqa: E731
        return AugmentParams(take(self.offsets), take(self.flip), take(self.cutout))


def draw_params(n: int, generator: torch.Generator, image_size: tuple[int, int], pad: int = 4,
                flip: bool = True, cutout: int = 0) -> AugmentParams:
    """Draw crops, flips and cutout corners for n images, always in this order."""
    h, w = image_size
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator) if pad > 0 else None
    flips = torch.rand(n, generator=generator) < 0.5 if flip else None
    corners = None
    if cutout > 0:
        corners = torch.stack([torch.randint(0, max(h - cutout, 0) + 1, (n,), generator=generator),
                               torch.randint(0, max(w - cutout, 0) + 1, (n,), generator=generator)], 1)
    return AugmentParams(offsets, flips, corners)


def crop_flip(x: torch.Tensor, offsets: torch.Tensor | None, flip: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Random crop of the zero-padded batch and horizontal flip, as one gather.

    out[b, c, i, j] = padded[b, c, dy_b + i, dx_b + (W - 1 - j if flip_b else j)]
    (padded = x with ``pad`` zero rows/columns on each side).

    The (row, column) pairs become linear indices into each padded H' x W' plane, shared by the
    channels, and one ``gather`` reads them: on a 2-core CPU ~1.6x faster than the same crop by
    advanced indexing, and on the GPU a single kernel.
    """
    b, c, h, w = x.shape
    if offsets is None:  # flip only
        return x if flip is None else torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    hp, wp = padded.shape[2:]
    dev = x.device
    rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # (B, H)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip is not None:
        cols = torch.where(flip[:, None], (w - 1) - cols, cols)
    cols = offsets[:, 1, None] + cols  # (B, W)
    lin = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, lin).view(b, c, h, w)


def apply_cutout(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Zero the size x size square at each image's top-left ``corners`` (clipped to the image)."""
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_y = (ys >= corners[:, 0, None]) & (ys < corners[:, 0, None] + size)  # (B, H)
    in_x = (xs >= corners[:, 1, None]) & (xs < corners[:, 1, None] + size)  # (B, W)
    keep = ~(in_y[:, None, :, None] & in_x[:, None, None, :])  # (B, 1, H, W)
    return x * keep  # a multiply beats masked_fill ~2x on CPU here


def augment(x: torch.Tensor, params: AugmentParams, pad: int, cutout: int) -> torch.Tensor:
    """Crop, flip and cutout one batch (uint8 in, uint8 out, before normalisation)."""
    x = crop_flip(x, params.offsets, params.flip, pad)
    if params.cutout is not None and cutout > 0:
        x = apply_cutout(x, params.cutout, cutout)
    return x


def norm_constants(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape 1 x C x 1 x 1 with x_norm = x_uint8 * scale + shift."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def normalize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> float32 (x / 255 - mean) / std (in place on the fresh float copy)."""
    return x.float().mul_(scale).add_(shift)
