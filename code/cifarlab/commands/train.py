"""`python -m cifarlab train`: one training run into a run directory."""
from __future__ import annotations

import os

from cifarlab.cli import add_config_arguments, config_from_args
from cifarlab.config import load_yaml
from cifarlab.errors import ConfigError, RunDirError

NAME = "train"
HELP = "train a model (the seed recipe by default) into a run directory"

# Options that may change when a run is resumed; every other given flag must match the run.
RESUMABLE_CHANGES = {"epochs", "device", "progress", "tensorboard", "num_workers", "eval_batch_size",
                     "compile", "compile_mode", "data_root", "resume", "run_dir"}


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def resume_config(args):
    """With --resume the run's own config.yaml is authoritative; given flags must agree with it."""
    from pathlib import Path

    from cifarlab.config import TrainConfig

    fresh = config_from_args(args)
    run_dir = fresh.resolved_run_dir()
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        if not Path(run_dir).is_dir():
            raise RunDirError(f"--resume: no run to resume in {run_dir}")
        return fresh  # killed before its first write: start it afresh
    saved = load_yaml(saved_file)
    given = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
    for key, value in given.items():
        if key in RESUMABLE_CHANGES:
            continue
        if key == "recipe" and saved.get("recipe") is None:  # written by an older resume
            _check_legacy_recipe(fresh, saved, saved_file)
            continue
        if getattr(fresh, key) != _as_field(saved.get(key), key):
            raise ConfigError(f"--resume: --{key.replace('_', '-')} {getattr(fresh, key)!r} differs from the "
                              f"run's {saved.get(key)!r} in {saved_file}")
    merged = {**saved, **{k: given[k] for k in given if k in RESUMABLE_CHANGES}}
    merged["resume"] = True
    if merged.get("recipe") is None and given.get("recipe") is not None:
        merged["recipe"] = given["recipe"]  # checked above: name it again in the rewritten config
    merged["run_dir"] = str(run_dir)
    # the recipe stays in the config (make_config lays the saved fields over its preset), so the
    # rewritten config.yaml still names it and a second resume with the same flags is accepted
    from cifarlab.config import make_config

    return make_config(merged)


def _check_legacy_recipe(fresh, saved: dict, saved_file) -> None:
    """A config.yaml rewritten by an older resume says ``recipe: null`` while its fields hold the
    preset's values: the given --recipe agrees when the fields it sets (and no flag overrides)
    match the saved ones."""
    from cifarlab.config import RECIPES

    for key in RECIPES.get(fresh.recipe, {}):
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        if getattr(fresh, key) != _as_field(saved[key], key):
            raise ConfigError(f"--resume: --recipe {fresh.recipe!r} sets {key} {getattr(fresh, key)!r}, which "
                              f"differs from the run's {saved[key]!r} in {saved_file}")


def _as_field(value, key):
    if key == "betas" and value is not None:
        return tuple(value)
    return value


def run(args) -> int:
    from cifarlab.train import Trainer

    cfg = resume_config(args) if args.resume else config_from_args(args)
    summary = Trainer(cfg).fit()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    run_dir = cfg.resolved_run_dir()
    if summary.get("diverged"):
        print(f"diverged (non-finite loss) after {summary['epochs_completed']} epochs; run directory: {run_dir}")
    else:
        acc = summary.get("test_acc")
        print(f"test accuracy {100 * acc:.2f}% (best-validation epoch {summary['best_epoch']}); "
              f"run directory: {run_dir}; curves: {run_dir / 'curves.png'}")
    return 0


