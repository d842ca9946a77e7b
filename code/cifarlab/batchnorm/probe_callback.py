"""Santurkar probes as a Trainer callback: every K optimizer steps, on the current batch.

``on_after_backward`` sees the gradient the optimizer is about to apply (``p.grad``) at the
weights it is applied to, so the probe is exactly "move along -g from w" for this step. The
probe functions (analysis/bn_probes.py) leave weights, ``.grad``, BatchNorm running statistics
and the RNG untouched; the optimizer is never called. So a run with probes ends with the same
weights as one without (tests/test_bn.py checks it through the Trainer).

Output: ``<run_dir>/probes.csv``, one row per (step, eta):
    step, epoch, eta, loss, grad_diff, ratio, beta, grad_norm, train_loss
``step`` is the number of optimizer steps done before this one (0 = the first batch),
``train_loss`` the training loss of that batch at w (the eta = 0 point), ``beta`` the max
ratio of that step. Results stay on the device and are read once per epoch (no per-step
host sync), then the whole file is rewritten atomically. On resume the rows of epochs the
checkpoint does not cover are dropped first, so the file matches the resumed run.

Overhead: the time spent probing is measured (on GPU with one synchronisation before and after
each probe, i.e. every K steps) and reported as ``probe_overhead_pct`` in metrics.csv and
summary.json: probe time / (epoch time - probe time).
"""
from __future__ import annotations

import csv
import io
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cifarlab.batchnorm.probes import check_etas, gradient_at, probe_along_gradient
from cifarlab.errors import ConfigError
from cifarlab.train.callbacks import Callback
from cifarlab.utils import atomic_write_text

COLUMNS = ["step", "epoch", "eta", "loss", "grad_diff", "ratio", "beta", "grad_norm", "train_loss"]
PROBES_CSV = "probes.csv"


def read_probe_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("step", "epoch") else float(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.8g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class BNProbeCallback(Callback):
    def __init__(self, interval: int, etas=(0.2, 0.1, 0.05, 0.02, 0.01)):
        if not isinstance(interval, int) or interval <= 0:
            raise ConfigError(f"probe interval must be a positive integer, got {interval!r}")
        self.interval = interval
        self.etas = check_etas(etas)
        self.rows: list[dict[str, Any]] = []
        self.probe_time_s = 0.0
        self.train_time_s = 0.0

    # -- set-up and resume ---------------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        self._pending: list[list] = []  # [step, epoch, probe result, batch loss or None]
        self._batch = None
        self._first_epoch = True
        self._epoch_probe_s = 0.0

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self._first_epoch and trainer.run_dir is not None:
            # resumed (or fresh) run: keep only rows of epochs the checkpoint covers
            self.rows = [r for r in read_probe_rows(Path(trainer.run_dir) / PROBES_CSV) if r["epoch"] < epoch]
        self._first_epoch = False
        self._epoch_probe_s = 0.0

    # -- the probe -----------------------------------------------------------------------------
    def on_batch_start(self, trainer, x, y) -> None:
        self._batch = (x, y)

    def on_after_backward(self, trainer) -> None:
        if not trainer.is_main or trainer.global_step % self.interval != 0 or self._batch is None:
            return
        x, y = self._batch
        model = trainer.model
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(trainer.device)
        t0 = time.perf_counter()
        base = None
        if _world_size() > 1:  # .grad is the all-reduced mean; the difference needs the local one
            _, base = gradient_at(model, trainer.loss_fn, x, y,
                                  shift={n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                                  eta=0.0, autocast=trainer.autocast)
        res = probe_along_gradient(model, trainer.loss_fn, x, y, self.etas, base_grad=base,
                                   autocast=trainer.autocast)
        if cuda:
            torch.cuda.synchronize(trainer.device)
        self._epoch_probe_s += time.perf_counter() - t0
        self._pending.append([trainer.global_step, trainer.epoch, res, None])

    def on_batch_end(self, trainer, loss) -> None:
        if self._pending and self._pending[-1][3] is None and self._pending[-1][0] == trainer.global_step - 1:
            self._pending[-1][3] = loss.detach().float()
        self._batch = None  # do not keep the batch alive

    # -- once per epoch: one sync, then files --------------------------------------------------
    def _flush(self) -> list[dict[str, Any]]:
        if not self._pending:
            return []
        nan = torch.tensor(float("nan"))
        # one stacked tensor per step: [loss, grad_diff, ratio] x E, beta, grad_norm, train_loss
        packed = torch.stack([torch.cat([res["loss"], res["grad_diff"], res["ratio"],
                                         torch.stack([res["beta"], res["grad_norm"],
                                                      (tl if tl is not None else nan.to(res["beta"].device))])])
                              for _, _, res, tl in self._pending]).cpu().tolist()
        e = len(self.etas)
        new = []
        for (step, epoch, _, _), vals in zip(self._pending, packed):
            for i, eta in enumerate(self.etas):
                new.append({"step": step, "epoch": epoch, "eta": eta, "loss": vals[i],
                            "grad_diff": vals[e + i], "ratio": vals[2 * e + i], "beta": vals[3 * e],
                            "grad_norm": vals[3 * e + 1], "train_loss": vals[3 * e + 2]})
        self._pending = []
        return new

    def on_epoch_end(self, trainer, epoch: int, row: dict[str, Any]) -> None:
        new = self._flush()
        self.rows.extend(new)
        if trainer.run_dir is not None and trainer.is_main:
            _write_rows(Path(trainer.run_dir) / PROBES_CSV, self.rows)
        self.probe_time_s += self._epoch_probe_s
        epoch_time = float(row.get("epoch_time_s") or 0.0)
        self.train_time_s += max(epoch_time - self._epoch_probe_s, 0.0)
        betas = sorted(b for b in {r["step"]: r["beta"] for r in new}.values() if math.isfinite(b))
        row["probe_beta_median"] = statistics.median(betas) if betas else None
        row["probe_overhead_pct"] = (100.0 * self._epoch_probe_s / (epoch_time - self._epoch_probe_s)
                                     if epoch_time > self._epoch_probe_s > 0 else None)

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        if self._pending:  # an epoch cut short (diverged): keep what was probed
            self.rows.extend(self._flush())
            if trainer.run_dir is not None and trainer.is_main:
                _write_rows(Path(trainer.run_dir) / PROBES_CSV, self.rows)
        steps: dict[int, dict[str, Any]] = {}
        for r in self.rows:
            steps.setdefault(r["step"], r)
        betas = sorted(r["beta"] for r in steps.values() if math.isfinite(r["beta"]))
        summary["probe_interval"] = self.interval
        summary["probe_etas"] = list(self.etas)
        summary["probe_count"] = len(steps)
        summary["probe_beta_median"] = statistics.median(betas) if betas else None
        summary["probe_beta_max"] = betas[-1] if betas else None
        summary["probe_time_s"] = self.probe_time_s
        summary["probe_overhead_pct"] = (100.0 * self.probe_time_s / self.train_time_s
                                         if self.train_time_s > 0 else None)

    # -- checkpointed so that a resumed run keeps its overhead account ------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"probe_time_s": self.probe_time_s, "train_time_s": self.train_time_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe_time_s = float(state.get("probe_time_s", 0.0))
        self.train_time_s = float(state.get("train_time_s", 0.0))


def callbacks_from_config(cfg) -> list[Callback]:
    if not getattr(cfg, "probe_interval", 0):
        return []
    return [BNProbeCallback(cfg.probe_interval, cfg.probe_steps)]
