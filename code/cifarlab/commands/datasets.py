"""`python -m cifarlab datasets`: list datasets, their shapes and where they were found."""
from __future__ import annotations

NAME = "datasets"
HELP = "list the datasets with classes, image shape, normalisation and where their files are"


def add_arguments(parser) -> None:
    parser.add_argument("--data-root", default=None, help="data root to search first (default ./data or $CIFARLAB_DATA)")


def run(args) -> int:
    from cifarlab.data import available_datasets, dataset_info, dataset_location

    for name in available_datasets():
        info = dataset_info(name)
        shape = f"{info.in_channels}x{info.image_size[0]}x{info.image_size[1]}"
        if name == "synthetic":
            where = "generated (synthetic[:CxHxW][:classes])"
        else:
            found = dataset_location(name, args.data_root)
            where = str(found) if found else "not found locally (downloaded on first use)"
        print(f"{name:<12} {info.num_classes:>4} classes  {shape:<9} {where}")
    return 0
