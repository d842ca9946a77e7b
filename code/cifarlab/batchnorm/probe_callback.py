"""Santurkar probes as a Trainer callback: every K optimizer steps, on the current batch.

``on_after_backward`` sees the gradient the optimizer is about to apply (``p.grad``) at the
weights it is applied to, so the probe is exactly "move along -g from w" for this step. The
probe functions (batchnorm/probes.py) leave weights, ``.grad``, BatchNorm running statistics
and the RNG untouched, run in fp32 even when training uses bf16 autocast, and never call the
optimizer. So a run with probes ends with the same weights as one without (tests/test_bn.py
checks it through the Trainer).

Step sizes: the absolute ``etas`` and the ``rel_etas``, fractions of the gradient step
lr * sqrt(P) (P = parameters with a gradient, lr = the optimizer's current rate), moved along
-g/||g||, so the distance is the same for networks whose gradient norms differ (probes.py).

Output: ``<run_dir>/probes.csv``, one row per (step, step size):
    step, epoch, kind, eta, eta_rel, distance, loss, grad_diff, ratio, beta, grad_norm,
    step_length, train_loss, base_loss
``kind`` is "abs" or "rel"; ``eta`` the absolute step size (computed for the relative ones),
``eta_rel`` = eta ||g|| / step_length (computed for the absolute ones), ``distance`` = ||eta g||;
``beta`` the max ratio over the rows of the same step and kind. ``step`` is the number of
optimizer steps done before this one (0 = the first batch), ``train_loss`` the training loss of
that batch at w (as the training pass computed it), ``base_loss`` L(w) recomputed by the probe
in fp32 with its own RNG state (the eta = 0 point of the probe's curves).

No host synchronisation at a probed step: results stay on the device and are read once per
epoch (one stacked copy), then the whole file is rewritten atomically. The probe time is
measured with CUDA events on a GPU (read at the epoch's end) and with the host clock on a CPU.
On resume the rows of epochs the checkpoint does not cover are dropped first, so the file
matches the resumed run.

Overhead: reported as ``probe_overhead_pct`` in metrics.csv and summary.json, probe time /
(epoch time - probe time). A probe costs one forward+backward per step size plus one for the
reference gradient (ten with the default 5 + 4 step sizes), in fp32.
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

from cifarlab.batchnorm.probes import check_etas, gradient_step_length, probe_along_gradient
from cifarlab.errors import ConfigError
from cifarlab.train.callbacks import Callback
from cifarlab.utils import atomic_write_text

COLUMNS = ["step", "epoch", "kind", "eta", "eta_rel", "distance", "loss", "grad_diff", "ratio", "beta",
           "grad_norm", "step_length", "train_loss", "base_loss"]
PROBES_CSV = "probes.csv"
DEFAULT_ETAS = (0.2, 0.1, 0.05, 0.02, 0.01)
DEFAULT_REL_ETAS = (0.4, 0.2, 0.1, 0.05)
# The interval of an ordinary training run with probes (`train --probe-interval`), the one the
# study's overhead stage measures: ten fp32 forward+backward passes per probe every 200 steps is
# about 5% of an fp32 training run's time, about 8% of a bf16 one's (the probe stays in fp32).
DEFAULT_PROBE_INTERVAL = 200
_INT = ("step", "epoch")


def read_probe_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            rows.append({k: (int(v) if k in _INT else v if k == "kind" else float(v)) for k, v in r.items()})
        return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r.get(k, math.nan):.8g}" if k not in _INT and k != "kind" else r[k]) for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _median(values) -> float | None:
    vals = sorted(v for v in values if isinstance(v, float) and math.isfinite(v))
    return statistics.median(vals) if vals else None


def _betas(rows: list[dict[str, Any]], kind: str) -> list[float]:
    return list({r["step"]: r["beta"] for r in rows if r.get("kind", "abs") == kind}.values())


class BNProbeCallback(Callback):
    def __init__(self, interval: int, etas=DEFAULT_ETAS, rel_etas=DEFAULT_REL_ETAS):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
            raise ConfigError(f"probe interval must be a positive integer, got {interval!r}")
        self.interval = interval
        self.etas = check_etas(etas, allow_empty=True)
        self.rel_etas = check_etas(rel_etas, allow_empty=True, what="relative probe step sizes")
        if not self.etas and not self.rel_etas:
            raise ConfigError("probe step sizes must not be empty (give absolute or relative ones)")
        self.rows: list[dict[str, Any]] = []
        self.probe_time_s = 0.0
        self.train_time_s = 0.0

    # -- set-up and resume ---------------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        if _world_size() > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules()):
            # the probe runs on rank 0 alone; a SyncBatchNorm forward there would wait for the others
            raise ConfigError("BatchNorm probes do not run with --sync-bn under DDP (the probe runs on rank 0 "
                              "alone): drop --sync-bn or --probe-interval")
        # [step, epoch, probe result, step length, batch loss or None, timing]
        self._pending: list[list] = []
        self._batch = None
        self._first_epoch = True
        self._epoch_probe_s = 0.0
        self._n_params: int | None = None

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self._first_epoch and trainer.run_dir is not None:
            # resumed (or fresh) run: keep only rows of epochs the checkpoint covers
            self.rows = [r for r in read_probe_rows(Path(trainer.run_dir) / PROBES_CSV) if r["epoch"] < epoch]
        self._first_epoch = False
        self._epoch_probe_s = 0.0

    # -- the probe -----------------------------------------------------------------------------
    def on_batch_start(self, trainer, x, y) -> None:
        self._batch = (x, y)

    def _step_length(self, trainer) -> float:
        if self._n_params is None:
            self._n_params = sum(p.numel() for p in trainer.model.parameters() if p.grad is not None)
        lr = trainer.optimizer.param_groups[0]["lr"]  # a Python float (a 0-d tensor is kept as is)
        return lr * math.sqrt(self._n_params) if isinstance(lr, torch.Tensor) \
            else gradient_step_length(lr, self._n_params)

    def on_after_backward(self, trainer) -> None:
        if not trainer.is_main or trainer.global_step % self.interval != 0 or self._batch is None:
            return
        x, y = self._batch
        model = trainer.model  # the module itself, not a DDP/compiled wrapper
        cuda = trainer.device.type == "cuda"
        step = self._step_length(trainer) if self.rel_etas else None
        if cuda:  # timed on the device: no synchronisation now, read once at the epoch's end
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        res = probe_along_gradient(model, trainer.loss_fn, x, y, self.etas, rel_etas=self.rel_etas,
                                   step_length=step)
        if cuda:
            end.record()
            timing = (start, end)
        else:
            self._epoch_probe_s += time.perf_counter() - t0
            timing = None
        self._pending.append([trainer.global_step, trainer.epoch, res, step, None, timing])

    def on_batch_end(self, trainer, loss) -> None:
        if self._pending and self._pending[-1][4] is None and self._pending[-1][0] == trainer.global_step - 1:
            self._pending[-1][4] = loss.detach().float()
        self._batch = None  # do not keep the batch alive

    # -- once per epoch: one sync, then files --------------------------------------------------
    def _flush(self) -> list[dict[str, Any]]:
        if not self._pending:
            return []
        timed = [p[5] for p in self._pending if p[5] is not None]
        if timed:
            torch.cuda.synchronize()
            self._epoch_probe_s += sum(s.elapsed_time(e) for s, e in timed) / 1000.0
        e = len(self.etas) + len(self.rel_etas)
        # one stacked tensor per step: [eta, eta_rel, distance, loss, grad_diff, ratio] x E, then
        # beta, beta_rel, grad_norm, train_loss, base_loss; one copy to the host for the epoch
        rows = []
        for _, _, res, _, tl, _ in self._pending:
            dev = res["grad_norm"].device
            tl = tl.to(dev) if tl is not None else torch.full((), math.nan, device=dev)
            rows.append(torch.cat([res["eta"], res["eta_rel"], res["distance"], res["loss"], res["grad_diff"],
                                   res["ratio"], torch.stack([res["beta"], res["beta_rel"], res["grad_norm"],
                                                              tl, res["base_loss"]])]))
        packed = torch.stack(rows).cpu().tolist()
        kinds = ["abs"] * len(self.etas) + ["rel"] * len(self.rel_etas)
        given = list(self.etas) + list(self.rel_etas)  # written as given, not as their float32 copies
        new = []
        for (step, epoch, _, length, _, _), vals in zip(self._pending, packed):
            tail = vals[6 * e:]
            for i, kind in enumerate(kinds):
                eta = given[i] if kind == "abs" else vals[i]
                eta_rel = given[i] if kind == "rel" else vals[e + i]
                new.append({"step": step, "epoch": epoch, "kind": kind, "eta": eta, "eta_rel": eta_rel,
                            "distance": vals[2 * e + i], "loss": vals[3 * e + i], "grad_diff": vals[4 * e + i],
                            "ratio": vals[5 * e + i], "beta": tail[0] if kind == "abs" else tail[1],
                            "grad_norm": tail[2], "step_length": float(length) if length is not None else math.nan,
                            "train_loss": tail[3], "base_loss": tail[4]})
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
        row["probe_beta_median"] = _median(_betas(new, "rel" if self.rel_etas else "abs"))
        row["probe_overhead_pct"] = (100.0 * self._epoch_probe_s / (epoch_time - self._epoch_probe_s)
                                     if epoch_time > self._epoch_probe_s > 0 else None)

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        if self._pending:  # an epoch cut short (diverged): keep what was probed
            self.rows.extend(self._flush())
            if trainer.run_dir is not None and trainer.is_main:
                _write_rows(Path(trainer.run_dir) / PROBES_CSV, self.rows)
        rel, ab = _betas(self.rows, "rel"), _betas(self.rows, "abs")
        finite = sorted(b for b in (rel or ab) if math.isfinite(b))
        summary["probe_interval"] = self.interval
        summary["probe_etas"] = list(self.etas)
        summary["probe_rel_etas"] = list(self.rel_etas)
        summary["probe_count"] = len({r["step"] for r in self.rows})
        summary["probe_beta_median"] = _median(rel or ab)  # the relative steps' when there are any
        summary["probe_beta_rel_median"] = _median(rel)
        summary["probe_beta_abs_median"] = _median(ab)
        summary["probe_beta_max"] = finite[-1] if finite else None
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
    return [BNProbeCallback(cfg.probe_interval, cfg.probe_steps,
                            getattr(cfg, "probe_rel_steps", DEFAULT_REL_ETAS))]
