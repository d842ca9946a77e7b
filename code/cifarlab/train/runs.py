"""One run from Python, the way a notebook wants it: train into ``run_dir`` unless that run
already finished (then read its summary), resume it when it was cut off.

    summary = train_run(ROOT / "log/notebook/resnet18", model="resnet18", dataset="cifar10")
    summary = train_run(LOG / "smoke/lenet5", **SMOKE)   # seconds, on synthetic images
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A seconds-long real run: LeNet-5 on synthetic 28x28 images (notebooks' SMOKE mode, tests).
SMOKE: dict[str, Any] = dict(model="lenet5", dataset="synthetic:1x28x28", epochs=2, train_subset=256,
                             test_subset=64, batch_size=64, lr=0.05, progress="off")


def finished_summary(run_dir: str | Path) -> dict | None:
    """The summary of a finished run in ``run_dir``, else None."""
    f = Path(run_dir) / "summary.json"
    if not f.is_file():
        return None
    try:
        summary = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return summary if summary.get("finished") else None


def train_run(run_dir: str | Path, callbacks: list | None = None, **options) -> dict:
    """Train ``make_config(**options)`` into ``run_dir``; a finished run is not retrained, an
    unfinished one (config.yaml written) is resumed. Returns the run's summary."""
    from cifarlab.config import make_config
    from cifarlab.train import Trainer

    run_dir = Path(run_dir)
    done = finished_summary(run_dir)
    if done is not None:
        print(f"finished run found, not retraining: {run_dir}")
        return done
    resume = (run_dir / "config.yaml").is_file()
    return Trainer(make_config(**options, run_dir=str(run_dir), resume=resume), callbacks=callbacks).fit()
