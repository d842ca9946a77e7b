"""Datasets and loaders: registry of dataset facts, file search and parsing (torchvision),
a user's own data (folder:PATH, npz:FILE, torchvision:NAME, register_dataset), device-resident
loader with batched augmentation, the Flowers-102 DataLoader path, synthetic data and
real-format fixtures for tests.

The names below are the contract other modules rely on (DESIGN.md, "Data").
"""
from cifarlab.data.augment import apply_cutout, crop_flip, draw_params, normalize
from cifarlab.data.bundle import DataBundle, build_loaders, config_info, split_train_val, subset_indices
from cifarlab.data.custom import (CustomData, is_custom, load_custom, register_dataset, registered_datasets,
                                  unregister_dataset)
from cifarlab.data.device_loader import DeviceLoader, epoch_seed, shard_positions
from cifarlab.data.registry import DatasetInfo, available_datasets, dataset_info
from cifarlab.data.sources import dataset_location, load_arrays, resolve_data_root, torchvision_dataset
from cifarlab.data.synthetic import make_synthetic
from cifarlab.data.torch_loader import TorchLoader

__all__ = [
    "CustomData", "DataBundle", "DatasetInfo", "DeviceLoader", "TorchLoader", "apply_cutout", "available_datasets",
    "build_loaders", "config_info", "crop_flip", "dataset_info", "dataset_location", "draw_params", "epoch_seed",
    "is_custom", "load_arrays", "load_custom", "make_synthetic", "normalize", "register_dataset",
    "registered_datasets", "resolve_data_root", "shard_positions", "split_train_val", "subset_indices",
    "torchvision_dataset", "unregister_dataset",
]
