"""`python -m cifarlab datasets`: list datasets, their shapes and where they were found, the
datasets registered in this process (cifarlab.data.register_dataset), and the forms that name
a user's own data."""
from __future__ import annotations

NAME = "datasets"
HELP = "list the datasets with classes, image shape, normalisation and where their files are"

OWN_DATA = [
    ("folder:PATH", "image folders PATH/train/<class>/*.png|jpg, PATH/test/<class>/ [, PATH/val/<class>/]"),
    ("npz:FILE", "arrays x_train, y_train, x_test, y_test [, classes] in a numpy .npz"),
    ("torchvision:NAME[:ARG]", "torchvision's classification sets, e.g. torchvision:STL10, "
                               "torchvision:EMNIST:letters, torchvision:USPS"),
]


def add_arguments(parser) -> None:
    parser.add_argument("--data-root", default=None, help="data root to search first (default ./data or $CIFARLAB_DATA)")


def _shape(info) -> str:
    return f"{info.in_channels}x{info.image_size[0]}x{info.image_size[1]}"


def run(args) -> int:
    from cifarlab.data import available_datasets, dataset_info, dataset_location, registered_datasets

    registered = set(registered_datasets())
    for name in available_datasets():
        if name in registered:
            continue
        info = dataset_info(name)
        if name == "synthetic":
            where = "generated (synthetic[:CxHxW][:classes])"
        else:
            found = dataset_location(name, args.data_root)
            where = str(found) if found else "not found locally (downloaded on first use)"
        print(f"{name:<12} {info.num_classes:>4} classes  {_shape(info):<9} {where}")
    for name in sorted(registered):
        info = dataset_info(name)
        print(f"{name:<12} {info.num_classes:>4} classes  {_shape(info):<9} registered in this process "
              f"(mean {', '.join(f'{m:.3f}' for m in info.mean)})")
    print("your own data (--dataset ...):")
    for form, what in OWN_DATA:
        print(f"  {form:<24} {what}")
    return 0
