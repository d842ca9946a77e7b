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
LENET_PRUNE_SETS = "conv3;conv3,fc1"


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--prune-layers", default=None, metavar="L1,L2;L3",
                        help="layer sets to prune, ';' between sets, ',' within one "
                             f"(default for lenet5: {LENET_PRUNE_SETS!r}; none for other models)")
    parser.add_argument("--prune-percents", default="5,10,20,40,60,80", metavar="P,...",
                        help="percentages to prune each set by (default 5,10,20,40,60,80)")
    parser.add_argument("--physical-percent", type=float, default=80.0,
                        help="percentage of the first prune set to remove physically (default 80)")
    parser.add_argument("--picture-layer", default="conv3",
                        help="conv layer whose |weight| kernels are tiled into the picture (default conv3)")
    parser.add_argument("--finetune-from", default=None, metavar="RUN_DIR",
                        help="fine-tune this finished SLBI run's W* with its mask fixed")


def _parse_sets(text: str | None, model: str) -> list[list[str]]:
    if text is None:
        text = LENET_PRUNE_SETS if model == "lenet5" else ""
    sets = [[n.strip() for n in part.split(",") if n.strip()] for part in text.split(";")]
    return [s for s in sets if s]


def _parse_percents(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--prune-percents expects numbers like 5,10,20, got {text!r}") from None
    bad = [v for v in values if not 0 <= v <= 100]
    if bad or not values:
        raise ConfigError(f"--prune-percents must be in [0, 100], got {text!r}")
    return values


def _record_command(run_dir) -> None:
    """command.txt: the exact command line, for the report (only when run as `python -m cifarlab`)."""
    import shlex
    import sys
    from pathlib import Path

    from cifarlab.utils import atomic_write_text

    if Path(sys.argv[0]).name == "__main__.py" and Path(run_dir).is_dir():
        atomic_write_text(Path(run_dir) / "command.txt", "python -m cifarlab " + shlex.join(sys.argv[1:]) + "\n")


def run(args) -> int:
    from cifarlab.dessilbi.callbacks import MaskedFinetune, SLBIExperiment
    from cifarlab.commands.train import resume_config
    from cifarlab.train import Trainer

    if args.experiment is None:
        args.experiment = "slbi"
    cfg = resume_config(args) if args.resume else config_from_args(args)
    if not 0 <= args.physical_percent <= 100:
        raise ConfigError(f"--physical-percent must be in [0, 100], got {args.physical_percent}")
    callbacks = [SLBIExperiment(prune_sets=_parse_sets(args.prune_layers, cfg.model),
                                percents=_parse_percents(args.prune_percents),
                                picture_layer=args.picture_layer, physical_percent=args.physical_percent)]
    if args.finetune_from:
        if cfg.optimizer.startswith("slbi"):
            raise ConfigError("--finetune-from trains with the mask fixed: use a dense optimizer such as sgd")
        callbacks.append(MaskedFinetune(args.finetune_from))
    summary = Trainer(cfg, callbacks=callbacks).fit()
    run_dir = cfg.resolved_run_dir()
    _record_command(run_dir)
    acc = summary.get("test_acc")
    line = f"test accuracy {100 * acc:.2f}%" if acc is not None else "no test accuracy"
    if summary.get("test_acc_wstar") is not None:
        line += f", with W* {100 * summary['test_acc_wstar']:.2f}%"
    print(f"{line}; run directory: {run_dir}")
    return 0
