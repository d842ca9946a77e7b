"""Writers of tiny datasets in the real on-disk formats, so tests read them through the real
(torchvision) parsers without any download.

Each writer fills a folder laid out as the data root expects and returns the arrays it wrote,
in cifarlab's convention (uint8 N x C x H x W images, int64 N labels), for round-trip checks.
Pixel values are random; labels cycle through the classes so every class appears.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

Arrays = tuple[torch.Tensor, torch.Tensor]


def _random_split(n: int, shape: tuple[int, ...], num_classes: int, rng: np.random.Generator):
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = (np.arange(n) + rng.integers(0, num_classes)) % num_classes
    rng.shuffle(labels)
    return images, labels.astype(np.int64)


def _as_torch(images: np.ndarray, labels: np.ndarray) -> Arrays:
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are Python 2 pickles


def write_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> tuple[Arrays, Arrays]:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}: dicts with 'data'
    (N x 3072 uint8 rows, R plane then G then B, each row-major) and 'labels' (list of int)."""
    from cifarlab.data.registry import dataset_info

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = _random_split(n_train, (3, 32, 32), 10, rng)
    test = _random_split(n_test, (3, 32, 32), 10, rng)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump({"batch_label": f"training batch {i} of 5", "labels": train[1][part].tolist(),
               "data": train[0][part].reshape(len(part), -1),
               "filenames": [f"img_{j}.png" for j in part]}, folder / f"data_batch_{i}")
    _dump({"batch_label": "testing batch 1 of 1", "labels": test[1].tolist(),
           "data": test[0].reshape(n_test, -1), "filenames": [f"t_{j}.png" for j in range(n_test)]},
          folder / "test_batch")
    _dump({"label_names": dataset_info("cifar10").classes, "num_cases_per_batch": 10000, "num_vis": 3072},
          folder / "batches.meta")
    return _as_torch(*train), _as_torch(*test)


def write_cifar100(root: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> tuple[Arrays, Arrays]:
    """root/cifar-100-python/{train, test, meta}: 'data' rows as CIFAR-10, 'fine_labels' and
    'coarse_labels'; meta holds 'fine_label_names' and 'coarse_label_names'."""
    from cifarlab.data.registry import dataset_info

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = _random_split(n, (3, 32, 32), 100, rng)
        _dump({"batch_label": f"{split}ing batch 1 of 1", "fine_labels": labels.tolist(),
               "coarse_labels": (labels // 5).tolist(), "data": images.reshape(n, -1),
               "filenames": [f"{split}_{j}.png" for j in range(n)]}, folder / split)
        out.append(_as_torch(images, labels))
    _dump({"fine_label_names": dataset_info("cifar100").classes,
           "coarse_label_names": [f"superclass_{i}" for i in range(20)]}, folder / "meta")
    return out[0], out[1]


IDX_FOLDERS = {"mnist": "MNIST", "fashion": "FashionMNIST", "kmnist": "KMNIST"}


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx (SN3 "Pascal Vincent") encoding of a uint8 array: magic 0x0000 08 <ndim>, then
    each dimension as a big-endian int32, then the raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(folder: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0, compressed: bool = True,
              size: int = 28) -> tuple[Arrays, Arrays]:
    """The four idx files (train-images-idx3-ubyte[.gz], ...) directly in ``folder`` — Debian's
    layout, and torchvision's ``<root>/<Class>/raw`` when given that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = _random_split(n, (size, size), 10, rng)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels.astype(np.uint8))):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if compressed:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / name).write_bytes(data)
        out.append(_as_torch(images[:, None], labels))
    return out[0], out[1]


def write_mnist_like(root: str | Path, name: str = "mnist", **kw) -> tuple[Arrays, Arrays]:
    """torchvision's raw layout: root/<MNIST|FashionMNIST|KMNIST>/raw/*-ubyte.gz (as downloaded,
    before extraction)."""
    return write_idx(Path(root) / IDX_FOLDERS[name] / "raw", **kw)


def write_svhn(root: str | Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> tuple[Arrays, Arrays]:
    """root/svhn/{train,test}_32x32.mat: 'X' is H x W x C x N uint8, 'y' is N x 1 with the
    digit 0 stored as label 10 (as in the original files)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = _random_split(n, (3, 32, 32), 10, rng)
        y = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        savemat(folder / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
        out.append(_as_torch(images, labels))
    return out[0], out[1]


def write_flowers102(root: str | Path, n_per_split: tuple[int, int, int] = (6, 4, 5), seed: int = 0) -> dict:
    """root/flowers-102/{jpg/image_00001.jpg..., imagelabels.mat, setid.mat} with images of
    varying sizes; returns {'train'|'val'|'test': labels (0-based)}. JPEG is lossy, so only
    shapes and labels round-trip."""
    from PIL import Image
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = Path(root) / "flowers-102"
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    total = sum(n_per_split)
    labels = rng.integers(1, 103, size=total)  # 1-based in the original
    for i in range(total):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "jpg" / f"image_{i + 1:05d}.jpg")
    ids = np.arange(1, total + 1)
    a, b, _ = n_per_split
    split_ids = {"trnid": ids[:a], "valid": ids[a:a + b], "tstid": ids[a + b:]}
    savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(base / "setid.mat", {k: v[None, :] for k, v in split_ids.items()})
    return {"train": torch.from_numpy(labels[:a] - 1), "val": torch.from_numpy(labels[a:a + b] - 1),
            "test": torch.from_numpy(labels[a + b:] - 1)}


def write_usps(root: str | Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> tuple[Arrays, Arrays]:
    """root/usps.bz2 and root/usps.t.bz2, torchvision's USPS files: bz2 text in libsvm format,
    one image a line, ``label 1:v1 ... 256:v256`` with labels 1..10 and 16 x 16 pixels in [-1, 1].
    Returns what torchvision makes of them: uint8 ((v + 1) / 2 * 255) in float32, labels 0..9."""
    import bz2

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for filename, n in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        values = np.round(rng.uniform(-1, 1, size=(n, 256)), 6)
        labels = (np.arange(n) % 10) + 1
        lines = [f"{lab} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row))
                 for lab, row in zip(labels, values)]
        (root / filename).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        images = ((values.astype(np.float32) + 1) / 2 * 255).astype(np.uint8).reshape(n, 1, 16, 16)
        out.append(_as_torch(images, labels - 1))
    return out[0], out[1]


def write_emnist(root: str | Path, split: str = "letters", n_train: int = 40, n_test: int = 20,
                 seed: int = 0) -> tuple[Arrays, Arrays]:
    """root/EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte, uncompressed
    idx as torchvision extracts them. EMNIST stores each 28 x 28 image transposed: the returned
    arrays are the upright images (what cifarlab serves); 'letters' labels run 1..26."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "EMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    first, k = (1, 26) if split == "letters" else (0, 10)
    out = []
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % k + first).astype(np.uint8)
        (folder / f"emnist-{split}-{part}-images-idx3-ubyte").write_bytes(idx_bytes(images.transpose(0, 2, 1)))
        (folder / f"emnist-{split}-{part}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
        out.append(_as_torch(images[:, None], labels.astype(np.int64)))
    return out[0], out[1]
