"""``torchvision:NAME[:ARG]``: torchvision's image-classification datasets, read from (or
downloaded into) the data root exactly where torchvision puts them, then served like any other
array dataset (seeded validation split, subsets, normalisation measured on the train split).

NAME is case-insensitive (STL10, EMNIST, QMNIST, USPS, GTSRB, DTD, ...; ``TORCHVISION_SETS``);
ARG is the one extra choice a dataset needs: EMNIST's split (``torchvision:EMNIST:letters``), or
an optional one (Imagenette's size). The train and test splits are the dataset's own ("trainval"
and "test" where those are its names; Imagenette has no test labels, so its "val" is the test).

Datasets that keep their images as one array (MNIST family, USPS, CIFAR, SVHN, STL10) are
converted in one step; the others are read image by image (PIL), resized with ``image_size``
when their images differ in size, and the result is cached in the data root's cache folder.
EMNIST's files store each image transposed; it is turned upright here.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarlab.data.custom import CustomData, as_images, fit_size, from_arrays
from cifarlab.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class TVSet:
    split_param: str  # "train" (a bool) or "split" (a string)
    train: object  # the value for the training split
    test: object
    arg: str | None = None  # the parameter that ':ARG' sets
    arg_required: bool = False
    hflip: bool = True  # False: digits, characters, signs, text


_T = TVSet("train", True, False)
_T_DIGITS = TVSet("train", True, False, hflip=False)
_S = TVSet("split", "train", "test")
TORCHVISION_SETS: dict[str, TVSet] = {
    "MNIST": _T_DIGITS, "FashionMNIST": _T, "KMNIST": _T_DIGITS, "QMNIST": _T_DIGITS, "USPS": _T_DIGITS,
    "EMNIST": TVSet("train", True, False, arg="split", arg_required=True, hflip=False),
    "CIFAR10": _T, "CIFAR100": _T,
    "SVHN": TVSet("split", "train", "test", hflip=False), "STL10": _S,
    "GTSRB": TVSet("split", "train", "test", hflip=False), "Flowers102": _S, "DTD": _S, "Food101": _S,
    "FGVCAircraft": TVSet("split", "trainval", "test"), "OxfordIIITPet": TVSet("split", "trainval", "test"),
    "StanfordCars": _S, "Country211": _S, "PCAM": _S, "FER2013": _S,
    "RenderedSST2": TVSet("split", "train", "test", hflip=False),
    "Imagenette": TVSet("split", "train", "val", arg="size"),
}
CACHE_VERSION = 1


def parse_torchvision(spec: str) -> tuple[str, str | None]:
    """'emnist:letters' -> ('EMNIST', 'letters'); ConfigError for unknown names or a missing or
    unexpected ARG."""
    name, _, arg = spec.partition(":")
    by_lower = {k.lower(): k for k in TORCHVISION_SETS}
    key = by_lower.get(name.strip().lower())
    if key is None:
        raise ConfigError(f"unknown torchvision dataset {name!r}; choose one of: {', '.join(TORCHVISION_SETS)}")
    tv = TORCHVISION_SETS[key]
    arg = arg or None
    if tv.arg is None and arg is not None:
        raise ConfigError(f"torchvision:{key} takes no ':{arg}'")
    if tv.arg_required and arg is None:
        choices = _arg_choices(key)
        raise ConfigError(f"torchvision:{key} needs its {tv.arg}: torchvision:{key}:{tv.arg.upper()}"
                          + (f" ({', '.join(choices)})" if choices else ""))
    choices = _arg_choices(key)
    if arg is not None and choices and arg not in choices:
        raise ConfigError(f"torchvision:{key}: {tv.arg} must be one of {', '.join(choices)}, got {arg!r}")
    return key, arg


def _arg_choices(key: str) -> list[str]:
    if key == "EMNIST":
        from torchvision.datasets import EMNIST

        return list(EMNIST.splits)
    if key == "Imagenette":
        return ["full", "320px", "160px"]
    return []


def _open(key: str, arg: str | None, root: Path, train: bool, download: bool):
    import torchvision.datasets as tvd

    tv = TORCHVISION_SETS[key]
    cls = getattr(tvd, key)
    kw = {tv.split_param: tv.train if train else tv.test}
    if tv.arg is not None and arg is not None:
        kw[tv.arg] = arg
    if "download" in inspect.signature(cls.__init__).parameters:
        kw["download"] = download
    return cls(str(root), **kw)


def _fast_arrays(key: str, ds) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) straight from the arrays a dataset keeps, or None when it keeps files."""
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = getattr(ds, "labels", None)
    if not isinstance(data, (np.ndarray, torch.Tensor)) or data.ndim not in (3, 4) or labels is None:
        return None
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if labels.dim() == 2:  # QMNIST keeps 8 columns of metadata; the class is the first
        labels = labels[:, 0]
    images = as_images(data, f"torchvision:{key} images")
    if key == "EMNIST":
        images = images.transpose(2, 3).contiguous()
    return images, labels.to(torch.int64)


def _item_arrays(key: str, ds, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image by image (PIL) -> uint8 N x C x H x W, with the folder rule for channels and sizes."""
    from cifarlab.data.folder import GREY_MODES

    pics, labels = [], []
    for i in range(len(ds)):
        img, target = ds[i]
        grey = getattr(img, "mode", "RGB") in GREY_MODES
        pics.append(np.array(img.convert("L" if grey else "RGB")))
        labels.append(int(target))
    colour = any(a.ndim == 3 for a in pics)
    images = []
    for a in pics:
        if colour and a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        x = torch.from_numpy(np.ascontiguousarray(a if a.ndim == 3 else a[:, :, None])).permute(2, 0, 1)
        images.append(fit_size(x[None], image_size)[0] if image_size else x)
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise DatasetError(f"torchvision:{key}: images differ in size ({a[2]}x{a[1]}, {b[2]}x{b[1]}, ...); "
                           f"pass --image-size N (image_size=N) to resize them to N x N")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _cache_path(root: Path, spec: str, image_size, n_train: int, n_test: int) -> list[Path]:
    from cifarlab.data.folder import cache_dirs

    tag = spec.replace(":", "-")
    return [d / f"torchvision-{tag}-{image_size or 'native'}-{n_train}-{n_test}.pt" for d in cache_dirs(root)]


def load_torchvision(spec: str, name: str, root: Path, image_size: int | None, download: bool) -> CustomData:
    """Open both splits under ``root`` (downloading when allowed) and convert them."""
    from cifarlab.data.sources import DOWNLOAD_TIMEOUT_S, _first_line, _socket_timeout

    key, arg = parse_torchvision(spec)
    tv = TORCHVISION_SETS[key]
    splits = {}
    for split in ("train", "test"):
        try:
            if download:
                root.mkdir(parents=True, exist_ok=True)
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                splits[split] = _open(key, arg, root, split == "train", download)
        except Exception as exc:  # missing files, no network, bad checksum: one line
            how = "and download failed" if download else "(download disabled)"
            raise DatasetError(f"dataset {name!r}: torchvision's {key} {split} split not found in {root} {how} "
                               f"({_first_line(exc)}); put its files where torchvision keeps them under {root}, "
                               f"or allow the download") from None
    fast = {s: _fast_arrays(key, ds) for s, ds in splits.items()}
    classes = list(getattr(splits["train"], "classes", None) or []) or None
    if all(v is not None for v in fast.values()):
        return from_arrays(name, fast["train"], fast["test"], classes=classes, hflip=tv.hflip, image_size=image_size)
    # image by image: slow for big sets, so the arrays are cached (the sets are published, fixed
    # files: their name, arguments and split lengths identify them)
    tag = key if arg is None else f"{key}:{arg}"
    paths = _cache_path(root, tag, image_size, len(splits["train"]), len(splits["test"]))
    for p in paths:
        if p.is_file():
            try:
                blob = torch.load(p, weights_only=True)
                if blob.get("version") == CACHE_VERSION:
                    return from_arrays(name, tuple(blob["train"]), tuple(blob["test"]), classes=blob["classes"],
                                       hflip=tv.hflip)
            except Exception:
                pass  # damaged: decode again
    try:
        arrays = {s: _item_arrays(key, ds, image_size) for s, ds in splits.items()}
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"dataset {name!r}: cannot read torchvision's {key} from {root} "
                           f"({_first_line(exc)})") from None
    data = from_arrays(name, arrays["train"], arrays["test"], classes=classes, hflip=tv.hflip)
    from cifarlab.utils import atomic_torch_save

    blob = {"version": CACHE_VERSION, "classes": list(data.info.classes), "train": list(data.train),
            "test": list(data.test)}
    for p in paths:
        try:
            atomic_torch_save(blob, p)
            break
        except OSError:
            continue
    return data
