"""build_loaders: one config -> train/val/test loaders on the device, plus the dataset's facts.

Splits:
- validation: round(N * cfg.val_fraction) training images (at least one when the fraction is
  positive), the first ones of a permutation of the training set seeded by cfg.seed;
  val_fraction 0 -> no validation loader (None).
- cfg.train_subset N: the first N of the remaining (still permuted) images — the course's
  partial dataset. The validation set is held out of the full training set, before the subset.
- cfg.test_subset N: the first N of a permutation of the test set seeded by a constant
  (TEST_SUBSET_SEED), so runs with different seeds are scored on the same test images.
A subset larger than its split keeps the whole split (with a warning).
- A user's own data (custom.py: folder:PATH, npz:FILE, torchvision:NAME, registered arrays)
  follows the same rules; a source with its own validation split (a folder tree's val/) uses it
  instead of holding images out (none when val_fraction is 0), and train_subset then takes the
  first N of a permutation of the training set seeded by cfg.seed.

Normalisation: the dataset's constants, or cfg.norm_mean / cfg.norm_std when given. For a
user's own data the constants are measured on its training split, and ``recorded_config`` writes
them into the config the run directory keeps, so the run states (and resumes with) the values
it used. Horizontal flips: only when cfg.hflip and the dataset allows them (not digits or text).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from cifarlab.data.device_loader import DeviceLoader
from cifarlab.data.registry import DatasetInfo, dataset_info
from cifarlab.data.sources import load_arrays, open_torchvision, resolve_data_root
from cifarlab.errors import ConfigError, DatasetError

TEST_SUBSET_SEED = 0
CROP_PAD = 4  # zero padding of the random crop, for 32x32 and 28x28 images alike


@dataclass
class DataBundle:
    train: Any  # DeviceLoader or TorchLoader
    val: Any | None
    test: Any
    info: DatasetInfo
    sizes: dict[str, int] = field(default_factory=dict)  # images per split, all ranks together
    custom: bool = False  # a user's own data, whose normalisation was measured here

    def recorded_config(self, cfg):
        """``cfg`` as the run directory's config.yaml keeps it: for a user's own data with the
        normalisation constants used (the caller's config object is left unchanged)."""
        if not self.custom or (cfg.norm_mean is not None and cfg.norm_std is not None):
            return cfg
        return dataclasses.replace(cfg, norm_mean=list(self.info.mean), norm_std=list(self.info.std))


def split_train_val(n: int, val_fraction: float, seed: int,
                    train_subset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) into a training set of n images; see the module doc."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= n:
        raise DatasetError(f"val_fraction {val_fraction} leaves no training images out of {n}")
    val, rest = perm[:n_val], perm[n_val:]
    return rest[:_clamped(train_subset, len(rest), "train_subset")], val


def subset_indices(n: int, subset: int | None, seed: int = TEST_SUBSET_SEED) -> torch.Tensor:
    """The first ``subset`` of a seeded permutation of range(n) (all of them if subset is None)."""
    if subset is None:
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:_clamped(subset, n, "test_subset")]


def _clamped(k: int | None, n: int, what: str) -> int:
    if k is None:
        return n
    if k > n:
        warnings.warn(f"{what}={k} exceeds the {n} images available; using all {n}", stacklevel=3)
    return min(k, n)


def _check_labels(name: str, labels: torch.Tensor, num_classes: int) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DatasetError(f"dataset {name!r}: labels must lie in [0, {num_classes}), "
                           f"found {int(labels.min())}..{int(labels.max())}")


def _normalisation(cfg, info: DatasetInfo) -> DatasetInfo:
    """info with cfg.norm_mean / cfg.norm_std in place of its constants where they are given."""
    from cifarlab.data.custom import _tuple

    mean, std = getattr(cfg, "norm_mean", None), getattr(cfg, "norm_std", None)
    if mean is None and std is None:
        return info
    c = info.in_channels
    mean = info.mean if mean is None else _tuple(mean, c, "norm_mean")
    std = info.std if std is None else _tuple(std, c, "norm_std")
    if min(std) <= 0:
        raise ConfigError(f"norm_std must be positive, got {list(std)}")
    return dataclasses.replace(info, mean=tuple(mean), std=tuple(std))


def config_info(cfg) -> DatasetInfo:
    """The facts of the data a config trains on, as build_loaders sees them: cfg.dataset with
    cfg.image_size and cfg.data_root (for a user's own data) and cfg.norm_mean / cfg.norm_std."""
    image_size = getattr(cfg, "image_size", None)
    return _normalisation(cfg, dataset_info(cfg.dataset, image_size=image_size, data_root=cfg.data_root))


def eval_batch_size(cfg, device) -> int:
    """Evaluation batch: large on a GPU; on a CPU 256 keeps activations in cache (2.5x faster
    than 1024 for resnet20 on 2 cores, bench measurement)."""
    if cfg.eval_batch_size is not None:
        return cfg.eval_batch_size
    return 1024 if torch.device(device).type == "cuda" else 256


def build_loaders(cfg, device, rank: int = 0, world_size: int = 1, **kw) -> DataBundle:
    """Loaders for cfg.dataset on ``device``; this rank's share when world_size > 1.

    Training batches per rank hold cfg.batch_size // world_size images (global batch =
    cfg.batch_size); evaluation batches hold cfg.eval_batch_size. kwargs go to load_arrays for
    synthetic data (size, shape, num_classes, seed); ``image_size`` (or cfg.image_size) sets the
    output size of Flowers-102 (default 32) and resizes a user's own data.
    """
    from cifarlab.data.custom import is_custom, load_custom

    image_size = kw.pop("image_size", None) or getattr(cfg, "image_size", None)
    train_bs = cfg.batch_size // world_size
    if train_bs < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is smaller than the world size {world_size}")
    root = resolve_data_root(cfg.data_root)
    custom = is_custom(cfg.dataset)
    own_val = None
    if custom:
        data = load_custom(cfg.dataset, root, image_size, cfg.download)
        info = data.info
        (train_x, train_y), (test_x, test_y), own_val = data.train, data.test, data.val
    else:
        info = dataset_info(cfg.dataset, image_size=image_size)
        if image_size and info.fixed_size and info.image_size != (image_size, image_size):
            raise ConfigError(f"image_size resizes folder:, npz:, torchvision: and registered data and flowers102; "
                              f"{cfg.dataset} images are {info.image_size[0]}x{info.image_size[1]}")
    info = _normalisation(cfg, info)
    if not info.fixed_size:
        return _build_torch_loaders(cfg, info, root, device, rank, world_size, train_bs)
    if not custom:
        train_x, train_y = load_arrays(cfg.dataset, root, True, cfg.download, **kw)
        test_x, test_y = load_arrays(cfg.dataset, root, False, cfg.download, **kw)
    for labels in (train_y, test_y):
        _check_labels(cfg.dataset, labels, info.num_classes)
    if own_val is not None:  # the source's own validation split (a folder tree's val/)
        tr = subset_indices(len(train_x), cfg.train_subset, cfg.seed)
        val_x, val_y = own_val if cfg.val_fraction > 0 else (train_x[:0], train_y[:0])
        va = torch.arange(len(val_x))
    else:
        tr, va = split_train_val(len(train_x), cfg.val_fraction, cfg.seed, cfg.train_subset)
        val_x, val_y = train_x, train_y
    te = subset_indices(len(test_x), cfg.test_subset)

    common = dict(mean=info.mean, std=info.std, device=device, rank=rank, world_size=world_size)
    # --compile: drop the ragged last batch, so the compiled model sees one batch shape (device_loader.py)
    train = DeviceLoader(train_x[tr], train_y[tr], train_bs, shuffle=True, augment=cfg.augment, pad=CROP_PAD,
                         flip=info.hflip and getattr(cfg, "hflip", True), cutout=cfg.cutout, seed=cfg.seed,
                         drop_last=bool(cfg.compile), **common)
    val = DeviceLoader(val_x[va], val_y[va], eval_batch_size(cfg, device), **common) if len(va) else None
    test = DeviceLoader(test_x[te], test_y[te], eval_batch_size(cfg, device), **common)
    return DataBundle(train, val, test, info, {"train": len(tr), "val": len(va), "test": len(te)}, custom)


def _build_torch_loaders(cfg, info, root, device, rank, world_size, train_bs) -> DataBundle:
    """Flowers-102: its official train / val / test splits (val only when val_fraction > 0);
    train_subset and test_subset pick seeded subsets as for the other datasets."""
    from cifarlab.data.torch_loader import TorchLoader, flowers_transforms

    size = info.image_size[0]
    name = cfg.dataset
    open_split = lambda split: open_torchvision(name, root, split, None, cfg.download)  # noqa: E731
    train_ds, test_ds = open_split("train"), open_split("test")
    tr = subset_indices(len(train_ds), cfg.train_subset, cfg.seed)
    te = subset_indices(len(test_ds), cfg.test_subset)
    common = dict(device=device, rank=rank, world_size=world_size, num_workers=cfg.num_workers)
    eval_tf = flowers_transforms(size, info.mean, info.std, train=False, augment=False)
    flip = info.hflip and getattr(cfg, "hflip", True)
    train_tf = flowers_transforms(size, info.mean, info.std, True, cfg.augment, cfg.cutout, flip)
    train = TorchLoader(train_ds, tr, train_tf,
                        train_bs, shuffle=True, seed=cfg.seed, drop_last=bool(cfg.compile), **common)
    val, n_val = None, 0
    if cfg.val_fraction > 0:
        val_ds = open_split("val")
        n_val = len(val_ds)
        val = TorchLoader(val_ds, torch.arange(n_val), eval_tf, eval_batch_size(cfg, device), **common)
    test = TorchLoader(test_ds, te, eval_tf, eval_batch_size(cfg, device), **common)
    return DataBundle(train, val, test, info, {"train": len(tr), "val": n_val, "test": len(te)})
