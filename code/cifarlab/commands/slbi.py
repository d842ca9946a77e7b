"""`python -m cifarlab slbi`: a DessiLBI experiment run (training plus the end-of-run analysis).

Trains like `train` (every TrainConfig flag; `--recipe slbi_lenet` is the official LeNet-5
example) and then, on the best-validation checkpoint: test accuracy with W*, the kernel picture
of --picture-layer, the percentile prune table of --prune-layers at --prune-percents, and the
physically pruned model (params, FLOPs, measured speed-up, accuracy equal to the masked one).
`--finetune-from RUN` fine-tunes a finished SLBI run's W* with its mask held fixed.

    python -m cifarlab slbi --recipe slbi_lenet --dataset fashion --run-dir log/slbi/lenet5_slbi
    python -m cifarlab slbi --model lenet5 --optimizer sgd --lr 0.01 ... (the SGD baseline)
"""
from __future__ import annotations

from cifarlab.cli import add_config_arguments, config_from_args
from cifarlab.errors import ConfigError

NAME = "slbi"
HELP = "DessiLBI: train with SLBI (or a baseline), then W*, prune table, kernel picture, physical pruning"


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--prune-layers", default=None, metavar="L1,L2;L3",
                        help="layer sets to prune, ';' between sets, ',' within one "
                             "(default for lenet5: 'conv3;conv3,fc1'; none for other models)")
    parser.add_argument("--prune-percents", default="5,10,20,40,60,80", metavar="P,...",
                        help="percentages to prune each set by (default 5,10,20,40,60,80)")
    parser.add_argument("--physical-percent", type=float, default=80.0,
                        help="percentage of the first prune set to remove physically (default 80)")
    parser.add_argument("--picture-layer", default="conv3",
                        help="conv layer whose |weight| kernels are tiled into the picture (default conv3)")
    parser.add_argument("--finetune-from", default=None, metavar="RUN_DIR",
                        help="fine-tune this finished SLBI run's W* with its mask fixed")


def _parse_sets(text: str | None):
    """'conv3;conv3,fc1' -> [['conv3'], ['conv3', 'fc1']]; None -> the experiment's default."""
    if text is None:
        return None
    sets = [[n.strip() for n in part.split(",") if n.strip()] for part in text.split(";")]
    return [s for s in sets if s]


def _parse_percents(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--prune-percents expects numbers like 5,10,20, got {text!r}") from None


def _record_command(run_dir) -> None:
    """command.txt: the exact command line, for the report (only when run as `python -m cifarlab`)."""
    import shlex
    import sys
    from pathlib import Path

    from cifarlab.utils import atomic_write_text

    if Path(sys.argv[0]).name == "__main__.py" and Path(run_dir).is_dir():
        atomic_write_text(Path(run_dir) / "command.txt", "python -m cifarlab " + shlex.join(sys.argv[1:]) + "\n")


def run(args) -> int:
    from cifarlab.commands.train import resume_config
    from cifarlab.dessilbi.experiment import run as run_experiment, summary_line

    if args.experiment is None:
        args.experiment = "slbi"
    cfg = resume_config(args) if args.resume else config_from_args(args)
    summary = run_experiment(cfg=cfg, prune_sets=_parse_sets(args.prune_layers),
                             prune_percents=_parse_percents(args.prune_percents),
                             physical_percent=args.physical_percent, picture_layer=args.picture_layer,
                             finetune_from=args.finetune_from)
    run_dir = cfg.resolved_run_dir()
    _record_command(run_dir)
    print(f"{summary_line(summary)}; run directory: {run_dir}")
    return 0
