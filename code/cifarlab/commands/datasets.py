"""`python -m cifarlab datasets`: list datasets, their shapes and where they were found."""
from __future__ import annotations

NAME = "datasets"
HELP = "list the datasets with classes, image shape and normalisation"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from cifarlab.data import available_datasets, dataset_info

    for name in available_datasets():
        info = dataset_info(name)
        shape = f"{info.in_channels}x{info.image_size[0]}x{info.image_size[1]}"
        print(f"{name:<12} {info.num_classes:>4} classes  {shape:<9} mean {tuple(round(m, 4) for m in info.mean)}")
    return 0
