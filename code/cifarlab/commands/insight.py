"""`python -m cifarlab insight`: filters, feature maps, confusion matrix, mistakes of a run."""
from __future__ import annotations

NAME = "insight"
HELP = "first-layer filters, feature maps, confusion matrix / per-class accuracy and the most confident mistakes of a finished run"


def add_arguments(parser) -> None:
    parser.add_argument("--run-dir", required=True, metavar="DIR", help="a run directory with checkpoints/best.pt")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default <run-dir>/insight)")
    parser.add_argument("--layer", default=None, metavar="NAME",
                        help="layer whose feature maps are drawn (default: the stage before the last)")
    parser.add_argument("--mistakes", type=int, default=16, help="how many confident mistakes to show")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--data-root", default=None, metavar="DIR", help="override the run's data root")


def run(args) -> int:
    from cifarlab.interpret.insight import run_insight

    paths = run_insight(args.run_dir, args.out, args.layer, args.mistakes, args.data_root, args.checkpoint)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0
