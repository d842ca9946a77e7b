"""`python -m cifarlab models`: list registered models, optionally with parameter counts."""
from __future__ import annotations

NAME = "models"
HELP = "list the available models (with --params: parameter counts for 10 classes, 3x32x32)"


def add_arguments(parser) -> None:
    parser.add_argument("--params", action="store_true", help="build each model and print its parameter count")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=3)


def run(args) -> int:
    from cifarlab.models import available_models, build_model
    from cifarlab.errors import CifarlabError
    from cifarlab.utils import count_params

    for name in available_models():
        if args.params:
            try:
                n = count_params(build_model(name, num_classes=args.num_classes, in_channels=args.in_channels))
                print(f"{name:<22} {n:>12,}")
            except CifarlabError:
                print(f"{name:<22} {'(needs options)':>12}")
        else:
            print(name)
    return 0
