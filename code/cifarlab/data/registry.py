"""Dataset names and their fixed facts: classes, image shape, normalisation constants.

For the built-in datasets nothing here touches the disk: ``dataset_info`` answers for datasets
that are not installed, so a model can be built (and FLOPs counted) before any data is read.
A user's own data (``folder:PATH``, ``npz:FILE``, ``torchvision:NAME[:ARG]`` and names
registered with ``register_dataset``, see custom.py) has facts only its files can tell: for
those ``dataset_info`` loads the data (from its cache when there is one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from cifarlab.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]  # (H, W) of the tensors the loaders yield
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    fixed_size: bool = True  # False: variable-size images, the DataLoader path (Flowers-102)
    hflip: bool = True  # horizontal flips keep the meaning of the images (not for digits or text)


_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck"]
_CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge
bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange
orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower
sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
willow_tree wolf woman worm""".split()
_MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
                  "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Normalisation constants: mean/std of the training split's pixels on [0, 1].
# - cifar10 uses the constants of pytorch-cifar and the seed project. Its std (0.2023, ...) is the
#   mean of per-image stds, not the pixel std (0.2470, 0.2435, 0.2616); kept for comparability.
# - fashion was measured here on Debian's 60k training images: 0.28604 / 0.35302.
# - mnist, cifar100, svhn: the widely used pixel statistics; kmnist: the commonly quoted
#   0.1918 / 0.3483 (not measurable offline; consistent with its ink ratio vs MNIST).
# - flowers102: ImageNet statistics (the images are natural photos resized on the fly).
# - synthetic: measured on make_synthetic's output (see synthetic.py).
_INFOS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465),
                           (0.2023, 0.1994, 0.2010), _CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, 3, (32, 32), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), _CIFAR100_CLASSES),
    "fashion": DatasetInfo("fashion", 10, 1, (28, 28), (0.2860,), (0.3530,), _FASHION_CLASSES),
    "kmnist": DatasetInfo("kmnist", 10, 1, (28, 28), (0.1918,), (0.3483,), _KMNIST_CLASSES),
    "mnist": DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), _MNIST_CLASSES),
    "svhn": DatasetInfo("svhn", 10, 3, (32, 32), (0.4377, 0.4438, 0.4728),
                        (0.1980, 0.2010, 0.1970), [str(d) for d in range(10)]),
    "flowers102": DatasetInfo("flowers102", 102, 3, (32, 32), _IMAGENET_MEAN, _IMAGENET_STD,
                              [], fixed_size=False),
    "synthetic": DatasetInfo("synthetic", 10, 3, (32, 32), (0.5,), (0.2,), []),
}

# Which datasets may be flipped horizontally: digits and characters change meaning when
# mirrored (mnist, kmnist, svhn); clothes, objects and flowers do not.
HFLIP_OK = {"cifar10": True, "cifar100": True, "fashion": True, "kmnist": False, "mnist": False,
            "svhn": False, "flowers102": True, "synthetic": True}

_INFOS = {k: replace(v, hflip=HFLIP_OK[k]) for k, v in _INFOS.items()}

# Names of a user's own data: folder:PATH, npz:FILE, torchvision:NAME[:ARG] (see custom.py).
CUSTOM_KINDS = ("folder", "npz", "torchvision")
DATASET_FORMS = "synthetic:CxHxW[:classes], folder:PATH, npz:FILE, torchvision:NAME[:ARG]"

_SYNTH_RE = re.compile(r"^synthetic(?::(\d+)x(\d+)x(\d+))?(?::(\d+))?$")


def available_datasets() -> list[str]:
    """Built-in names, then the names registered in this process with register_dataset."""
    from cifarlab.data.custom import registered_datasets

    return sorted(_INFOS) + [n for n in registered_datasets() if n not in _INFOS]


def parse_custom(name: str) -> tuple[str, str] | None:
    """(kind, argument) of a user's own dataset: ('folder', PATH), ('npz', FILE),
    ('torchvision', 'NAME[:ARG]') or ('registered', name); None for built-in names."""
    if not isinstance(name, str):
        return None
    kind, sep, arg = name.partition(":")
    if sep and kind in CUSTOM_KINDS:
        if not arg.strip():
            what = {"folder": "PATH", "npz": "FILE", "torchvision": "NAME"}[kind]
            raise ConfigError(f"dataset {name!r} is incomplete: use {kind}:{what}")
        return kind, arg
    from cifarlab.data.custom import registered_datasets

    if name in registered_datasets():
        return "registered", name
    return None


def check_dataset_name(name) -> None:
    """Raise ConfigError unless ``name`` names a dataset: a built-in one, synthetic[:...], a
    registered one, folder:PATH, npz:FILE or torchvision:NAME[:ARG]. Reads no files (a missing
    folder is reported when the data is loaded, before anything is written)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dataset must be a name, got {name!r}")
    if name in _INFOS or parse_synthetic(name) is not None:
        return
    custom = parse_custom(name)
    if custom is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(available_datasets())} "
                          f"(or {DATASET_FORMS}; Python: cifarlab.data.register_dataset)")
    if custom[0] == "torchvision":
        from cifarlab.data.torchvision_sets import parse_torchvision

        parse_torchvision(custom[1])


def parse_synthetic(name: str) -> tuple[tuple[int, int, int], int] | None:
    """``synthetic[:CxHxW][:classes]`` -> (shape, num_classes); None for other names.

    The suffix lets a config ask for e.g. grayscale 28x28 synthetic data
    (``--dataset synthetic:1x28x28:10``) without extra config fields.
    """
    m = _SYNTH_RE.match(name)
    if m is None:
        return None
    c, h, w, k = m.groups()
    shape = (int(c), int(h), int(w)) if c else (3, 32, 32)
    num_classes = int(k) if k else 10
    if min(shape) < 1 or num_classes < 2:
        raise ConfigError(f"bad synthetic dataset {name!r}: need C, H, W >= 1 and at least 2 classes")
    return shape, num_classes


def base_name(name: str) -> str:
    """'synthetic:1x28x28' -> 'synthetic'; other names unchanged."""
    return "synthetic" if parse_synthetic(name) is not None else name


def dataset_info(name: str, image_size: int | tuple[int, int] | None = None, data_root=None,
                 download: bool = False) -> DatasetInfo:
    """Facts of a dataset; ``image_size`` overrides the output size of variable-size datasets
    and resizes a user's own data. ``data_root`` and ``download`` matter only for a user's own
    data, which is loaded (or read from its cache) to answer."""
    if isinstance(name, str) and name not in _INFOS and parse_custom(name) is not None:
        from cifarlab.data.custom import load_custom

        return load_custom(name, data_root, image_size, download).info
    synth = parse_synthetic(name) if isinstance(name, str) else None
    if synth is not None:
        from cifarlab.data.synthetic import SYNTH_MEAN, SYNTH_STD

        (c, h, w), k = synth
        return DatasetInfo(name, k, c, (h, w), (SYNTH_MEAN,) * c, (SYNTH_STD,) * c,
                           [f"class {i}" for i in range(k)])
    if name not in _INFOS:
        check_dataset_name(name)  # raises, listing the valid names and forms
    info = _INFOS[name]
    if name == "flowers102":
        from torchvision.datasets import Flowers102

        size = image_size or 32
        hw = (size, size) if isinstance(size, int) else tuple(size)
        info = DatasetInfo(name, 102, 3, hw, info.mean, info.std, list(Flowers102.classes), False, info.hflip)
    return info
