"""A DessiLBI experiment: train (SLBI, or a dense baseline), then analyse the best-validation
checkpoint: test accuracy with W*, the kernel picture, the percentile prune table and the
physically pruned model. Notebook 05 and ``python -m cifarlab slbi`` both call ``run``.

    from cifarlab.dessilbi import run
    summary = run(run_dir=LOG / "slbi/lenet5_slbi", recipe="slbi_lenet", dataset="fashion")
    summary = run(run_dir=LOG / "slbi/lenet5_sgd", recipe="slbi_lenet", optimizer="sgd", lr=0.01)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cifarlab.errors import ConfigError

LENET_PRUNE_SETS: list[list[str]] = [["conv3"], ["conv3", "fc1"]]
PRUNE_PERCENTS: list[float] = [5, 10, 20, 40, 60, 80]


def check_percents(percents: Sequence[float]) -> list[float]:
    values = [float(p) for p in percents]
    if not values or any(not 0 <= p <= 100 for p in values):
        raise ConfigError(f"prune percents must be in [0, 100], got {list(percents)}")
    return values


def run(run_dir: str | Path | None = None, *, prune_sets: Sequence[Sequence[str]] | None = None,
        prune_percents: Sequence[float] = PRUNE_PERCENTS, physical_percent: float = 80.0,
        picture_layer: str = "conv3", finetune_from: str | Path | None = None, resume: bool | None = None,
        cfg=None, **options: Any) -> dict:
    """Train and analyse one DessiLBI run; returns its summary (finished runs are not retrained).

    ``options`` are TrainConfig fields (``recipe="slbi_lenet"``, ``dataset``, ``epochs``,
    ``optimizer``, ``slbi_lambda`` ...), or pass a ready ``cfg``. ``prune_sets``: layer sets to
    prune (default: conv3 and conv3+fc1 for lenet5, none otherwise). ``finetune_from``: a finished
    SLBI run whose W* is fine-tuned with its mask fixed (needs a dense optimizer)."""
    from cifarlab.config import make_config
    from cifarlab.dessilbi.callbacks import MaskedFinetune, SLBIExperiment
    from cifarlab.train import Trainer
    from cifarlab.train.runs import finished_summary

    if cfg is None:
        if run_dir is not None:
            options["run_dir"] = str(run_dir)
            done = finished_summary(run_dir)
            if done is not None:
                print(f"finished run found, not retraining: {run_dir}")
                return done
            if resume is None:
                resume = (Path(run_dir) / "config.yaml").is_file()
        options.setdefault("experiment", "slbi")
        cfg = make_config(**options, resume=bool(resume))
    if not 0 <= physical_percent <= 100:
        raise ConfigError(f"physical percent must be in [0, 100], got {physical_percent}")
    if prune_sets is None:
        prune_sets = LENET_PRUNE_SETS if cfg.model == "lenet5" else []
    callbacks = [SLBIExperiment(prune_sets=[list(s) for s in prune_sets], percents=check_percents(prune_percents),
                                picture_layer=picture_layer, physical_percent=physical_percent)]
    if finetune_from:
        if cfg.optimizer.startswith("slbi"):
            raise ConfigError("fine-tuning from a run trains with the mask fixed: use a dense optimizer such as sgd")
        callbacks.append(MaskedFinetune(str(finetune_from)))
    return Trainer(cfg, callbacks=callbacks).fit()


def prune_tables(run_dirs: dict[str, str | Path]):
    """The prune tables of several runs side by side (columns suffixed by the dict's keys)."""
    import pandas as pd

    merged = None
    for label, rd in run_dirs.items():
        t = pd.read_csv(Path(rd) / "prune_table.csv").set_index(["layers", "percent"]).add_suffix(f" ({label})")
        merged = t if merged is None else merged.join(t, how="outer")
    return merged.reset_index() if merged is not None else pd.DataFrame()


def summary_line(summary: dict) -> str:
    acc = summary.get("test_acc")
    line = f"test accuracy {100 * acc:.2f}%" if acc is not None else "no test accuracy"
    if summary.get("test_acc_wstar") is not None:
        line += f", with W* {100 * summary['test_acc_wstar']:.2f}%"
    return line

