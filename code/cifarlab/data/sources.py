"""Finding, downloading and parsing dataset files: local data root, system locations, download.

Parsing is torchvision's (CIFAR pickles, idx, SVHN .mat, Flowers-102); this module only decides
where the files are and turns every failure into one DatasetError line naming the dataset, the
places searched and how to provide the files.

Integrity checks. torchvision verifies the md5 of every CIFAR batch file, of SVHN's .mat and of
Flowers' .mat files each time it opens them, which rejects any file but the published one. The
subclasses below (``_LocalCIFAR10`` ...) check only that the files are present: tiny test
fixtures and re-packed copies then go through the real parsers, and opening a 180 MB SVHN file
does not hash it every run. Downloads stay verified: torchvision checks the md5 of the archive
it fetches before extracting it. A damaged local file fails while parsing and is reported as a
DatasetError ("cannot read ...").

Fashion-MNIST from Debian (``apt-get install dataset-fashion-mnist``) is four idx .gz files in
/usr/share/datasets/fashion-mnist. torchvision's FashionMNIST reads uncompressed files from
``<root>/FashionMNIST/raw`` (as its own download leaves them), so the files are decompressed once
into that folder under the data root (or under ~/.cache/cifarlab when the data root is read-only)
and parsed from there by torchvision itself.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
import torchvision.datasets as tvd

from cifarlab.data.registry import base_name, dataset_info, parse_synthetic
from cifarlab.errors import DatasetError

DEFAULT_ROOT = "data"
ENV_ROOT = "CIFARLAB_DATA"
DOWNLOAD_TIMEOUT_S = 60

# Known system-wide copies, searched after the data root (tests may monkeypatch this).
SYSTEM_LOCATIONS: dict[str, list[Path]] = {
    "fashion": [Path("/usr/share/datasets/fashion-mnist")],
}

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# -- torchvision classes that trust local files (see the module docstring) ---------------------
class _LocalCIFAR10(tvd.CIFAR10):
    train_list = [[name, None] for name, _ in tvd.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in tvd.CIFAR10.test_list]
    meta = {**tvd.CIFAR10.meta, "md5": None}


class _LocalCIFAR100(tvd.CIFAR100):
    train_list = [[name, None] for name, _ in tvd.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in tvd.CIFAR100.test_list]
    meta = {**tvd.CIFAR100.meta, "md5": None}


class _LocalSVHN(tvd.SVHN):
    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


class _LocalFlowers102(tvd.Flowers102):
    def _check_integrity(self) -> bool:
        return self._images_folder.is_dir() and all(
            (self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid"))


_IDX_CLASSES = {"mnist": tvd.MNIST, "fashion": tvd.FashionMNIST, "kmnist": tvd.KMNIST}

_HOW_TO = {
    "cifar10": "extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
               "{root}/cifar-10-batches-py/data_batch_1 exists",
    "cifar100": "extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
                "{root}/cifar-100-python/train exists",
    "mnist": "put the four idx files (train-images-idx3-ubyte[.gz], ...) in {root}/MNIST/raw",
    "fashion": "run 'apt-get install dataset-fashion-mnist', or put the four idx files "
               "(train-images-idx3-ubyte[.gz], ...) in {root}/FashionMNIST/raw",
    "kmnist": "put the four idx files (train-images-idx3-ubyte[.gz], ...) in {root}/KMNIST/raw",
    "svhn": "put train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/) in {root}/svhn",
    "flowers102": "extract 102flowers.tgz and put imagelabels.mat and setid.mat beside it in "
                  "{root}/flowers-102 (jpg/, imagelabels.mat, setid.mat)",
}


def resolve_data_root(root: str | Path | None = None) -> Path:
    """The data root: ``root`` as given, except that the default ('data' or None) yields to
    the environment variable CIFARLAB_DATA when it is set, else is <project root>/data."""
    if root is None or str(root) == DEFAULT_ROOT:
        env = os.environ.get(ENV_ROOT)
        if env:
            return Path(env).expanduser()
        from cifarlab.paths import data_dir

        return data_dir()  # <project root>/data, wherever the kernel or shell runs
    return Path(root).expanduser()


def _first_line(exc: BaseException) -> str:
    """One line for an exception: its first line, and its last one when the cause is there
    (torchvision's download errors put the network error on the last line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarlab"


# -- where each dataset's files may be ---------------------------------------------------------
def _idx_file(folder: Path, stem: str) -> Path | None:
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _idx_complete(folder: Path) -> bool:
    return all(_idx_file(folder, s) is not None for s in IDX_FILES)


def _stage_idx(source: Path, raw: Path) -> None:
    """Make ``raw`` hold the four idx files uncompressed (torchvision reads only those).
    Each file is written to a temp name and renamed, so an interrupted copy leaves no half file."""
    raw.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES:
        target = raw / stem
        if target.is_file():
            continue
        src = _idx_file(source, stem)
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared data root must stay readable
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _places(name: str, root: Path) -> list[Path]:
    """Folders searched for ``name``, in order (for the error message and the search)."""
    if name in _IDX_CLASSES:
        local = [root / _IDX_CLASSES[name].__name__ / "raw"]
    elif name == "cifar10":
        local = [root / "cifar-10-batches-py"]
    elif name == "cifar100":
        local = [root / "cifar-100-python"]
    elif name == "svhn":
        local = [root / "svhn", root]
    elif name == "flowers102":
        local = [root / "flowers-102"]
    else:
        local = []
    return local + list(SYSTEM_LOCATIONS.get(name, []))


def dataset_location(name: str, root: str | Path | None = None) -> Path | None:
    """The first searched folder that holds ``name``'s files (data root, then system
    locations), without copying anything; None when absent (and for synthetic data). For
    folder:PATH and npz:FILE the path itself when it exists; None for other custom data."""
    from cifarlab.data.custom import is_custom
    from cifarlab.data.registry import parse_custom

    if is_custom(name):
        kind, arg = parse_custom(name)
        path = Path(arg).expanduser()
        return path if kind in ("folder", "npz") and path.exists() else None
    dataset_info(name)
    if parse_synthetic(name) is not None:
        return None
    root = resolve_data_root(root)
    for folder in _places(name, root):
        if name in _IDX_CLASSES:
            found = _idx_complete(folder)
        elif name == "svhn":
            found = (folder / "train_32x32.mat").is_file() or (folder / "test_32x32.mat").is_file()
        elif name == "flowers102":
            found = (folder / "jpg").is_dir() and (folder / "setid.mat").is_file()
        else:
            found = folder.is_dir() and any(folder.iterdir())
        if found:
            return folder
    return None


def _find(name: str, root: Path, train: bool) -> Path | None:
    """The root to hand the torchvision class, or None when no local copy exists."""
    split = "train" if train else "test"
    if name in _IDX_CLASSES:
        raw = root / _IDX_CLASSES[name].__name__ / "raw"
        for folder in _places(name, root):
            if not _idx_complete(folder):
                continue
            if folder == raw and all((raw / s).is_file() for s in IDX_FILES):
                return root
            for cache_root in (root, _cache_dir() / name):
                target = cache_root / _IDX_CLASSES[name].__name__ / "raw"
                try:
                    _stage_idx(folder, target)
                    return cache_root
                except OSError:
                    continue  # read-only data root: try the user cache
            raise DatasetError(f"dataset {name!r}: found idx files in {folder} but could not decompress them "
                               f"into {raw} or {_cache_dir()} (not writable)")
        return None
    if name == "cifar10":
        ok = all((root / "cifar-10-batches-py" / f).is_file() for f, _ in tvd.CIFAR10.train_list +
                 tvd.CIFAR10.test_list + [[tvd.CIFAR10.meta["filename"], None]])
        return root if ok else None
    if name == "cifar100":
        ok = all((root / "cifar-100-python" / f).is_file() for f in ("train", "test", "meta"))
        return root if ok else None
    if name == "svhn":
        for folder in _places(name, root):
            if (folder / f"{split}_32x32.mat").is_file():
                return folder
        return None
    if name == "flowers102":
        base = root / "flowers-102"
        ok = (base / "jpg").is_dir() and (base / "imagelabels.mat").is_file() and (base / "setid.mat").is_file()
        return root if ok else None
    raise DatasetError(f"dataset {name!r} has no files to find")


def _construct(name: str, tv_root: Path, split: str, transform, download: bool):
    """The torchvision dataset object for one split ('train', 'val' or 'test')."""
    train = split == "train"
    if name == "cifar10":
        return _LocalCIFAR10(tv_root, train=train, transform=transform, download=download)
    if name == "cifar100":
        return _LocalCIFAR100(tv_root, train=train, transform=transform, download=download)
    if name in _IDX_CLASSES:
        return _IDX_CLASSES[name](tv_root, train=train, transform=transform, download=download)
    if name == "svhn":
        return _LocalSVHN(tv_root, split=split, transform=transform, download=download)
    if name == "flowers102":
        return _LocalFlowers102(tv_root, split=split, transform=transform, download=download)
    raise DatasetError(f"dataset {name!r} has no torchvision class")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # torchvision's urllib calls have no timeout; a dead network must fail, not hang
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def open_torchvision(name: str, root: str | Path | None, split: str, transform=None, download: bool = False):
    """Search the data root and system locations, download when allowed, and open the split
    with torchvision. Every failure is one DatasetError line."""
    dataset_info(name)  # unknown names -> ConfigError listing the valid ones
    root = resolve_data_root(root)
    tv_root = _find(name, root, train=split == "train")
    searched = ", ".join(str(p) for p in _places(name, root))
    how = _HOW_TO[name].format(root=root)
    if tv_root is None:
        if not download:
            raise DatasetError(f"dataset {name!r} not found (searched {searched}; download disabled): {how}")
        dl_root = root / "svhn" if name == "svhn" else root
        try:
            dl_root.mkdir(parents=True, exist_ok=True)
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                return _construct(name, dl_root, split, transform, download=True)
        except Exception as exc:  # network, disk, checksum: all become one line
            raise DatasetError(f"dataset {name!r} not found (searched {searched}) and download failed "
                               f"({_first_line(exc)}): {how}") from None
    try:
        return _construct(name, tv_root, split, transform, download=False)
    except Exception as exc:
        raise DatasetError(f"cannot read dataset {name!r} from {tv_root} ({_first_line(exc)}): {how}") from None


def _to_arrays(name: str, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's in-memory arrays -> (uint8 N x C x H x W, int64 N)."""
    if name in ("cifar10", "cifar100"):  # data: N x H x W x C numpy
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    elif name in _IDX_CLASSES:  # data: N x H x W uint8 tensor
        images = ds.data.unsqueeze(1).contiguous()
        labels = ds.targets.to(torch.int64)
    elif name == "svhn":  # data: N x C x H x W numpy (a transposed view)
        images = torch.from_numpy(ds.data.copy()).contiguous()
        labels = torch.from_numpy(ds.labels.astype("int64"))
    else:
        raise DatasetError(f"dataset {name!r} has variable-size images: use the DataLoader path")
    return images, labels.reshape(-1)


# -- decoded-array cache -------------------------------------------------------------------------
# Unpickling CIFAR's five batches takes ~3 s on a 2-core CPU, a .pt of the decoded arrays ~0.4 s.
# The idx and .mat datasets decode about as fast as the .pt loads, so only CIFAR is cached. The
# cache is keyed by the source files' names, sizes and mtimes: replaced files invalidate it.
CACHED = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CACHE_DIR = ".cifarlab_cache"


def _source_key(name: str, root: Path) -> list | None:
    folder = root / CACHED[name]
    if not folder.is_dir():
        return None
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


def _cache_path(name: str, root: Path, split: str) -> Path:
    return root / CACHE_DIR / f"{name}-{split}.pt"


def _read_cache(name: str, root: Path, split: str):
    if name not in CACHED:
        return None
    path = _cache_path(name, root, split)
    key = _source_key(name, root)
    if key is None or not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if blob["key"] != [list(k) for k in key]:
            return None
        return blob["images"], blob["labels"]
    except Exception:  # a damaged or foreign cache is ignored, then rewritten
        return None


def _write_cache(name: str, root: Path, split: str, images, labels) -> None:
    if name not in CACHED:
        return
    from cifarlab.utils import atomic_torch_save

    key = _source_key(name, root)
    if key is None:
        return
    try:
        atomic_torch_save({"key": [list(k) for k in key], "images": images, "labels": labels},
                          _cache_path(name, root, split))
    except OSError:
        pass  # read-only data root: just no cache


def load_arrays(name: str, root: str | Path | None = None, train: bool = True, download: bool = True,
                **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split of a fixed-size dataset: (uint8 N x C x H x W, int64 N) on the CPU.

    ``synthetic[:CxHxW][:classes]`` reads no files; kwargs: size (default 5000 train / 1000
    test), shape, num_classes, seed (train uses seed, test seed + 1; the class patterns are shared).
    """
    from cifarlab.data.custom import is_custom, load_custom

    if is_custom(name):  # folder:, npz:, torchvision:, registered (kwargs: image_size)
        data = load_custom(name, root, kw.get("image_size"), download)
        return data.train if train else data.test
    synth = parse_synthetic(name) if isinstance(name, str) else None
    if synth is not None:
        from cifarlab.data.synthetic import make_synthetic

        shape, k = synth
        shape = tuple(kw.get("shape", shape))
        k = kw.get("num_classes", k)
        n = kw.get("size", 5000 if train else 1000)
        seed = kw.get("seed", 0) + (0 if train else 1)
        return make_synthetic(n, num_classes=k, shape=shape, seed=seed)
    info = dataset_info(name)
    if not info.fixed_size:
        raise DatasetError(f"dataset {name!r} has variable-size images; load_arrays serves fixed-size "
                           f"datasets only (build_loaders uses a DataLoader for it)")
    split = "train" if train else "test"
    cached = _read_cache(name, resolve_data_root(root), split)
    if cached is not None:
        images, labels = cached
    else:
        ds = open_torchvision(name, root, split, download=download)
        images, labels = _to_arrays(name, ds)
        _write_cache(name, resolve_data_root(root), split, images, labels)
    c, (h, w) = info.in_channels, info.image_size
    if tuple(images.shape[1:]) != (c, h, w) or len(labels) != len(images):
        raise DatasetError(f"dataset {name!r}: expected images of shape {c}x{h}x{w} with one label each, "
                           f"got {tuple(images.shape)} and {len(labels)} labels")
    return images, labels


def torchvision_dataset(name: str, root: str | Path | None = None, train: bool = True, transform=None,
                        download: bool = False, **kw):
    """The plain torchvision dataset (PIL images, int labels) for the classic DataLoader loop,
    found the same way as load_arrays (Debian's Fashion-MNIST included). Synthetic data comes
    as a small Dataset of PIL images, and so does a user's own data."""
    from cifarlab.data.custom import is_custom, load_custom

    if is_custom(name):
        from cifarlab.data.synthetic import SyntheticVisionDataset

        data = load_custom(name, root, kw.get("image_size"), download)
        images, labels = data.train if train else data.test
        return SyntheticVisionDataset(images, labels, transform, data.info.classes)
    if isinstance(name, str) and parse_synthetic(name) is not None:
        from cifarlab.data.synthetic import SyntheticVisionDataset

        images, labels = load_arrays(name, root, train, **kw)
        return SyntheticVisionDataset(images, labels, transform, dataset_info(name).classes)
    return open_torchvision(base_name(name), root, "train" if train else "test", transform, download)
