"""A user's own data: arrays registered from Python, ``npz:FILE`` array files, and the common
path of ``folder:PATH`` image trees (folder.py) and ``torchvision:NAME[:ARG]`` (torchvision_sets.py).

Every source ends as a ``CustomData``: uint8 N x C x H x W images and int64 labels per split
(train, test, and val when the source has its own), and a DatasetInfo whose mean and std were
measured on the training split unless given. ``build_loaders`` serves them with the same
device-resident loader, validation split, subsets and augmentation as the built-in datasets.

Conventions for arrays (numpy arrays or torch tensors):
- images: N x H x W (one channel) or N x H x W x C (numpy's and PIL's layout); a 4-d torch
  tensor whose second dimension is 1 or 3 and last is not is taken as N x C x H x W (torch's
  layout). uint8 0..255, any other integer type within 0..255, or float within [0, 1].
- labels: integers 0..K-1, K = len(classes) when classes are given, else max label + 1.

Loaded data is kept in a small in-process memo keyed by what identifies its content (a folder's
file list and sizes, an npz file's size and mtime), so a study that trains many runs on one
folder decodes or reads it once.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.data.registry import DatasetInfo, parse_custom
from cifarlab.errors import ConfigError, DatasetError

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CustomData:
    info: DatasetInfo
    train: Split
    test: Split
    val: Split | None = None  # the source's own validation split (a folder tree's val/)


# -- arrays -> uint8 N x C x H x W and int64 N ------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def as_images(x, what: str) -> torch.Tensor:
    """Images in any of the accepted layouts and dtypes (module doc) -> uint8 N x C x H x W."""
    is_torch = isinstance(x, torch.Tensor)
    if not is_torch:
        try:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{what}: not an array of images ({_first_line(exc)})") from None
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4:
        last, second = x.shape[-1] in (1, 3), x.shape[1] in (1, 3)
        # the layout the dimensions show; when they cannot tell, numpy's (NHWC) or torch's (NCHW)
        channels_last = last if last != second else not is_torch
        if channels_last:
            x = x.permute(0, 3, 1, 2)
    else:
        raise DatasetError(f"{what}: images must be N x H x W or N x H x W x C, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or min(x.shape[1:]) < 1:
        raise DatasetError(f"{what}: no images (shape {tuple(x.shape)})")
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.dtype == torch.bool or x.is_complex():
        raise DatasetError(f"{what}: images must be uint8 0..255 or float 0..1, got {x.dtype}")
    if x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise DatasetError(f"{what}: float images must lie in [0, 1], found {lo:g}..{hi:g} "
                               f"(divide by 255, or pass uint8)")
        return (x.double() * 255.0).round_().to(torch.uint8).contiguous()
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
        raise DatasetError(f"{what}: integer images must lie in 0..255, found {lo}..{hi}")
    return x.to(torch.uint8).contiguous()


def as_labels(y, what: str) -> torch.Tensor:
    """Integer class labels (N or N x 1) -> int64 N."""
    y = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(y)))
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise DatasetError(f"{what}: labels must be one integer per image, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if len(y) and not bool((y == y.round()).all()):
            raise DatasetError(f"{what}: labels must be integers (class indices), found fractional values")
    elif y.dtype == torch.bool or y.is_complex():
        raise DatasetError(f"{what}: labels must be integers (class indices), got {y.dtype}")
    return y.to(torch.int64).contiguous()


def pixel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of the pixels on the [0, 1] scale, summed in float64
    over chunks (a whole split in float32 at once would need 4x its memory). A constant channel
    gets std 1: it is then only shifted, not divided by zero."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64).div_(255.0)
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = images.numel() // c
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def fit_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x C x H x W -> N x C x size x size: the shorter side scaled to ``size`` (bilinear,
    antialiased), then the centre crop, which keeps the aspect ratio (as Flowers-102's
    Resize + CenterCrop)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def _tuple(v, channels: int, what: str) -> tuple[float, ...]:
    t = tuple(float(a) for a in (v if isinstance(v, (list, tuple, np.ndarray, torch.Tensor)) else [v]))
    if len(t) == 1:
        t = t * channels
    if len(t) != channels or not all(np.isfinite(t)):
        raise ConfigError(f"{what} must hold one finite number per channel ({channels}), got {v!r}")
    return t


def from_arrays(name: str, train, test, val=None, classes=None, mean=None, std=None, hflip: bool = True,
                image_size: int | None = None) -> CustomData:
    """Check and convert (x, y) pairs into CustomData; ``image_size`` resizes (fit_size); mean
    and std default to the training split's pixel statistics (after resizing)."""
    splits = {}
    for split, pair in (("train", train), ("test", test), ("val", val)):
        if pair is None:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DatasetError(f"dataset {name!r}: {split} must be a pair (images, labels)")
        x = as_images(pair[0], f"dataset {name!r} {split} images")
        y = as_labels(pair[1], f"dataset {name!r} {split} labels")
        if len(x) != len(y):
            raise DatasetError(f"dataset {name!r}: {split} has {len(x)} images but {len(y)} labels")
        if image_size is not None:
            x = fit_size(x, int(image_size))
        splits[split] = (x, y)
    shape = tuple(splits["train"][0].shape[1:])
    for split, (x, _) in splits.items():
        if tuple(x.shape[1:]) != shape:
            raise DatasetError(f"dataset {name!r}: {split} images are {'x'.join(map(str, x.shape[1:]))} but "
                               f"train images are {'x'.join(map(str, shape))} (C x H x W)")
    hi = max(int(y.max()) for _, y in splits.values())
    lo = min(int(y.min()) for _, y in splits.values())
    if classes is not None:
        classes = [str(c) for c in (classes.tolist() if hasattr(classes, "tolist") else classes)]
        k = len(classes)
    else:
        k = hi + 1
        classes = [str(i) for i in range(k)]
    if lo < 0 or hi >= k:
        raise DatasetError(f"dataset {name!r}: labels must lie in 0..{k - 1} ({k} classes), found {lo}..{hi}")
    if k < 2:
        raise DatasetError(f"dataset {name!r}: a classifier needs at least 2 classes, found {k}")
    c = shape[0]
    measured = pixel_stats(splits["train"][0]) if mean is None or std is None else None
    mean = _tuple(mean, c, "mean") if mean is not None else measured[0]
    std = _tuple(std, c, "std") if std is not None else measured[1]
    if min(std) <= 0:
        raise ConfigError(f"std must be positive, got {std}")
    info = DatasetInfo(name, k, c, (shape[1], shape[2]), mean, std, classes, True, bool(hflip))
    return CustomData(info, splits["train"], splits["test"], splits.get("val"))


def fingerprint(data: CustomData) -> str:
    """A digest of everything a CustomData holds: equal digests, equal data."""
    h = hashlib.sha256()
    i = data.info
    h.update(repr((i.num_classes, i.in_channels, i.image_size, i.mean, i.std, i.classes, i.hflip)).encode())
    for pair in (data.train, data.test, data.val):
        for t in pair or ():
            h.update(repr((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# -- register_dataset: tensors or arrays from Python -----------------------------------------------
@dataclass(frozen=True)
class _Registered:
    data: CustomData
    digest: str
    mean: object  # as given (None: measured), so a resized copy re-measures only what was measured
    std: object


_REGISTERED: dict[str, _Registered] = {}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def register_dataset(name: str, train, test, classes=None, mean=None, std=None, hflip: bool = True) -> DatasetInfo:
    """Make arrays a dataset like the built-in ones: afterwards ``make_config(dataset=name)``,
    the Trainer, the studies and the notebooks use it in this process.

    ``train`` and ``test`` are (images, labels) pairs of numpy arrays or torch tensors (layouts
    and dtypes: the module doc); ``classes`` names the classes (default '0', '1', ...); mean and
    std (per channel, on the [0, 1] scale) default to the training images' statistics; ``hflip``
    False for data that mirroring changes (digits, text). Registering a name again with the same
    data is a no-op; with different data it is an error. Returns the dataset's facts.
    """
    from cifarlab.data.registry import _INFOS, CUSTOM_KINDS, parse_synthetic

    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _INFOS or parse_synthetic(name):
        taken = " (a built-in dataset)" if name in _INFOS else ""
        raise ConfigError(f"cannot register a dataset named {name!r}{taken}: use letters, digits, '_', '.' or '-', "
                          f"and not a built-in name ({', '.join(sorted(_INFOS))}) nor {', '.join(CUSTOM_KINDS)}:")
    data = from_arrays(name, train, test, classes=classes, mean=mean, std=std, hflip=hflip)
    digest = fingerprint(data)
    old = _REGISTERED.get(name)
    if old is not None:
        if old.digest != digest:
            raise DatasetError(f"dataset {name!r} is already registered with different data; "
                               f"choose another name or call unregister_dataset({name!r}) first")
        return old.data.info
    _REGISTERED[name] = _Registered(data, digest, mean, std)
    return data.info


def unregister_dataset(name: str) -> None:
    """Forget a registered dataset (no error when it is not registered)."""
    _REGISTERED.pop(name, None)
    for key in [k for k in _MEMO if k[0] == "registered" and k[1] == name]:
        del _MEMO[key]


def registered_datasets() -> list[str]:
    return sorted(_REGISTERED)


# -- npz:FILE ----------------------------------------------------------------------------------------
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: Path, name: str, image_size: int | None) -> CustomData:
    """x_train, y_train, x_test, y_test (and optionally x_val, y_val, classes) from an .npz."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"dataset {name!r}: cannot read {path} as an .npz of arrays ({_first_line(exc)}); "
                           f"save it with numpy.savez(file, x_train=..., y_train=..., x_test=..., y_test=...)"
                           ) from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"dataset {name!r}: {path} lacks {', '.join(missing)} (it holds: "
                           f"{', '.join(sorted(arrays)) or 'nothing'}); expected {', '.join(NPZ_KEYS)} [, classes]")
    val = (arrays["x_val"], arrays["y_val"]) if "x_val" in arrays and "y_val" in arrays else None
    classes = arrays.get("classes")
    if classes is not None and classes.dtype.kind not in "UO":
        raise DatasetError(f"dataset {name!r}: 'classes' in {path} must be an array of strings, got {classes.dtype}")
    return from_arrays(name, (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]), val,
                       classes=None if classes is None else list(classes), image_size=image_size)


# -- one entry point ---------------------------------------------------------------------------------
_MEMO: OrderedDict[tuple, CustomData] = OrderedDict()
MEMO_SIZE = 4


def _memo(key: tuple, make) -> CustomData:
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    data = make()
    _MEMO[key] = data
    while len(_MEMO) > MEMO_SIZE:
        _MEMO.popitem(last=False)
    return data


def is_custom(name) -> bool:
    from cifarlab.data.registry import _INFOS

    return isinstance(name, str) and name not in _INFOS and parse_custom(name) is not None


def load_custom(name: str, root=None, image_size: int | None = None, download: bool = False) -> CustomData:
    """The arrays and facts of a user's own dataset (see the module doc); every problem with the
    data is one DatasetError line naming it."""
    from cifarlab.data.sources import resolve_data_root

    parsed = parse_custom(name)
    if parsed is None:
        raise ConfigError(f"{name!r} is not a folder:, npz:, torchvision: or registered dataset")
    kind, arg = parsed
    image_size = int(image_size) if image_size else None
    root = resolve_data_root(root)
    if kind == "registered":
        reg = _REGISTERED[arg]
        if image_size is None or reg.data.info.image_size == (image_size, image_size):
            return reg.data
        d = reg.data
        return _memo(("registered", arg, reg.digest, image_size), lambda: from_arrays(
            name, d.train, d.test, d.val, d.info.classes, reg.mean, reg.std, d.info.hflip, image_size))
    if kind == "npz":
        path = Path(arg).expanduser()
        if not path.is_file():
            raise DatasetError(f"dataset {name!r}: no such file {path}")
        st = path.stat()
        key = ("npz", name, str(path.resolve()), st.st_size, st.st_mtime_ns, image_size)
        return _memo(key, lambda: load_npz(path, name, image_size))
    if kind == "folder":
        from cifarlab.data.folder import load_folder, scan_tree, tree_key

        path = Path(arg).expanduser()
        tree = scan_tree(path, name)
        key = tree_key(tree, image_size)
        return _memo(("folder", name, key), lambda: load_folder(tree, name, root, image_size, key))
    from cifarlab.data.torchvision_sets import load_torchvision

    return _memo(("torchvision", arg, str(root.resolve()), image_size),
                 lambda: load_torchvision(arg, name, root, image_size, download))
