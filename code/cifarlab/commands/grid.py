"""`python -m cifarlab grid GROUP...`: run grid/<group>.txt into log/<group>/ (train.sh calls this)."""
from __future__ import annotations

NAME = "grid"
HELP = "run the experiment grid's lines (grid/<group>.txt): skip finished runs, resume unfinished ones"


def add_arguments(parser) -> None:
    parser.add_argument("groups", nargs="*", metavar="GROUP", help="grid groups (default: every grid/*.txt)")
    parser.add_argument("--only", default=None, metavar="RUN,...", help="only these run names")
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    parser.add_argument("--dataset", default=None, help="override every run's dataset")
    parser.add_argument("--extra", default="", metavar="'FLAGS'", help="extra flags appended to every run")
    parser.add_argument("--gpus", default="", metavar="'0 1 ...'", help="one queue of runs per GPU, in parallel")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--grid-dir", default=None, metavar="DIR", help="default: <project root>/grid")
    parser.add_argument("--log", default=None, metavar="DIR", help="default: <project root>/log")


def run(args) -> int:
    from cifarlab.train.grid import run_grid

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    results = run_grid(args.groups or None, only=only,
                       overrides={"epochs": args.epochs, "dataset": args.dataset}, extra=args.extra,
                       gpus=args.gpus.replace(",", " ").split(), dry_run=args.dry_run,
                       grid_dir=args.grid_dir, log_root=args.log)
    return 0 if all(r.ok for r in results) else 1
