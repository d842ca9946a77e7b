"""``folder:PATH``: an image-folder tree, decoded once and cached as one tensor file.

Layout: PATH/train/<class>/<image>, PATH/test/<class>/<image> and optionally PATH/val/<class>/<image>
(else build_loaders holds out the usual seeded validation split). Images may sit in sub-folders
of a class folder; hidden files and folders are skipped, as are files that are not images.

- classes: the train class folders' names, sorted; test and val may lack a class, but may not
  have one train lacks (its label would be unknown);
- channels: 1 when every image is greyscale (PIL modes 1, L, LA, I, I;16, F), else 3 (grey
  images repeated, alpha dropped);
- size: the images' common size, or ``image_size`` N: the shorter side scaled to N and the
  centre N x N kept (custom.fit_size);
- mean and std: measured on the train split (custom.pixel_stats).

Cache: ``<data root>/.cifarlab_cache/folder-<key>.pt`` (``~/.cache/cifarlab`` when the data root
is read-only), written atomically once the whole tree decoded without error. The key hashes the
tree's relative file list, the files' sizes and image_size, so adding, removing or replacing a
file (with one of another size) decodes the tree again, while moving or copying the tree keeps it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cifarlab.data.custom import CustomData, fit_size, from_arrays
from cifarlab.data.registry import DatasetInfo
from cifarlab.errors import DatasetError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass
class Tree:
    path: Path
    classes: list[str]  # the train class folders, sorted
    files: dict[str, list[tuple[Path, int, int]]] = field(default_factory=dict)  # split -> (file, label, bytes)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and all(not part.startswith(".") for part in rel):
            out.append(p)
    return out


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def scan_tree(path: Path, name: str) -> Tree:
    """List the tree and check its layout (no image is opened); one DatasetError per problem."""
    where = f"dataset {name!r}"
    layout = f"expected {path}/train/<class>/*.png and {path}/test/<class>/*.png (optionally {path}/val/<class>/)"
    if not path.exists():
        raise DatasetError(f"{where}: no such folder {path}")
    if not path.is_dir():
        raise DatasetError(f"{where}: {path} is not a folder; {layout}")
    for split in ("train", "test"):
        if not (path / split).is_dir():
            raise DatasetError(f"{where}: {path / split} is missing; {layout}")
    per_split: dict[str, list[tuple[str, list[Path]]]] = {}
    for split in SPLITS:
        split_dir = path / split
        if not split_dir.is_dir():
            continue
        folders = _class_folders(split_dir)
        if not folders:
            loose = [p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
            hint = f" (its {len(loose)} images must go into one folder per class)" if loose else ""
            raise DatasetError(f"{where}: no class folders in {split_dir}{hint}; {layout}")
        classes = []
        for folder in folders:
            images = _images_in(folder)
            if not images:
                raise DatasetError(f"{where}: class folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
            classes.append((folder.name, images))
        per_split[split] = classes
    train_classes = [c for c, _ in per_split["train"]]
    if len(train_classes) < 2:
        raise DatasetError(f"{where}: a classifier needs at least 2 classes, {path / 'train'} has "
                           f"{len(train_classes)} ({', '.join(train_classes)})")
    label = {c: i for i, c in enumerate(train_classes)}
    tree = Tree(path, train_classes)
    for split, classes in per_split.items():
        for c, _ in classes:
            if c not in label:
                raise DatasetError(f"{where}: {split} class {c!r} ({path / split / c}) has no folder in "
                                   f"{path / 'train'}, so it has no label")
        tree.files[split] = [(p, label[c], p.stat().st_size) for c, images in classes for p in images]
    return tree


def tree_key(tree: Tree, image_size: int | None) -> str:
    """sha256 of the relative file list, the file sizes and image_size (see the module doc)."""
    h = hashlib.sha256(f"folder-v{CACHE_VERSION}:{image_size}\n".encode())
    for split in SPLITS:
        for p, _, size in tree.files.get(split, []):
            h.update(f"{p.relative_to(tree.path).as_posix()}\t{size}\n".encode())
    return h.hexdigest()


def decode_image(path: Path) -> np.ndarray:
    """One image file -> uint8 H x W (greyscale modes) or H x W x 3 (everything else)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.array(img.convert("L" if img.mode in GREY_MODES else "RGB"))
    except Exception as exc:  # unreadable, truncated, not an image: name the file
        text = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {text[0] if text else 'corrupt'}"
        raise DatasetError(f"cannot read image {path} ({why})") from None


def _decode_split(files: list[tuple[Path, int, int]]) -> list[np.ndarray]:
    return [decode_image(p) for p, _, _ in files]


def _stack(tree: Tree, decoded: dict[str, list[np.ndarray]], image_size: int | None, name: str):
    colour = any(a.ndim == 3 for arrays in decoded.values() for a in arrays)
    out = {}
    first: tuple[Path, tuple] | None = None
    for split, arrays in decoded.items():
        images = []
        for (p, _, _), a in zip(tree.files[split], arrays):
            if colour and a.ndim == 2:
                a = np.repeat(a[:, :, None], 3, axis=2)
            x = torch.from_numpy(np.ascontiguousarray(a if a.ndim == 3 else a[:, :, None])).permute(2, 0, 1)
            if image_size is not None:
                x = fit_size(x[None], image_size)[0]
            if first is None:
                first = (p, tuple(x.shape[1:]))
            elif tuple(x.shape[1:]) != first[1]:
                (h0, w0), (h1, w1) = first[1], x.shape[1:]
                raise DatasetError(f"dataset {name!r}: images differ in size ({first[0]} is {w0}x{h0}, {p} is "
                                   f"{w1}x{h1}); pass --image-size N (image_size=N) to resize them to N x N")
            images.append(x)
        labels = torch.tensor([lab for _, lab, _ in tree.files[split]], dtype=torch.int64)
        out[split] = (torch.stack(images).contiguous(), labels)
    return out


def cache_dirs(data_root: Path) -> list[Path]:
    from cifarlab.data.sources import CACHE_DIR, _cache_dir

    return [Path(data_root) / CACHE_DIR, _cache_dir()]


def _cache_name(key: str) -> str:
    return f"folder-{key[:24]}.pt"


def _read_cache(data_root: Path, key: str, name: str) -> CustomData | None:
    for folder in cache_dirs(data_root):
        path = folder / _cache_name(key)
        if not path.is_file():
            continue
        try:
            blob = torch.load(path, weights_only=True)
            if blob.get("version") != CACHE_VERSION or blob.get("key") != key:
                continue
            (c, h, w), k = blob["shape"], len(blob["classes"])
            info = DatasetInfo(name, k, c, (h, w), tuple(blob["mean"]), tuple(blob["std"]), list(blob["classes"]))
            split = lambda s: None if blob[s] is None else tuple(blob[s])  # noqa: E731
            return CustomData(info, split("train"), split("test"), split("val"))
        except Exception:  # a damaged or foreign cache is ignored, then rewritten
            continue
    return None


def _write_cache(data_root: Path, key: str, data: CustomData) -> Path | None:
    from cifarlab.utils import atomic_torch_save

    i = data.info
    blob = {"version": CACHE_VERSION, "key": key, "classes": list(i.classes), "mean": list(i.mean),
            "std": list(i.std), "shape": [i.in_channels, *i.image_size],
            "train": list(data.train), "test": list(data.test), "val": None if data.val is None else list(data.val)}
    for folder in cache_dirs(data_root):
        try:
            atomic_torch_save(blob, folder / _cache_name(key))
            os.chmod(folder / _cache_name(key), 0o644)  # mkstemp makes 0600; a shared data root must stay readable
            return folder / _cache_name(key)
        except OSError:
            continue  # read-only data root: try the user cache
    return None  # nowhere writable: just no cache


def load_folder(tree: Tree, name: str, data_root: Path, image_size: int | None, key: str) -> CustomData:
    """The tree's arrays: from the cache, else decoded (then cached)."""
    cached = _read_cache(data_root, key, name)
    if cached is not None:
        return cached
    decoded = {split: _decode_split(files) for split, files in tree.files.items()}
    arrays = _stack(tree, decoded, image_size, name)
    data = from_arrays(name, arrays["train"], arrays["test"], arrays.get("val"), classes=tree.classes)
    _write_cache(data_root, key, data)
    return data
