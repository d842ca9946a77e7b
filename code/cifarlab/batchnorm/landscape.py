"""The course loss landscape: one model per learning rate, training loss at every step, and the
band between the min and max curves over the rates.

As in the course starter: Adam (betas 0.9/0.999, eps 1e-8, no weight decay), the same batches
for every model, every model starting from the same initial weights (the model is built under
the same seed for each rate, so the band shows the effect of the rate alone).

Two ways to train the M models, with identical results up to float rounding:
- ``concurrent=True``: the M models' parameters and buffers are stacked
  (``torch.func.stack_module_state``) and one ``vmap``-ed ``functional_call`` computes all M
  losses and gradients in one batched step; Adam runs on the stacked tensors with a per-model
  learning rate. One kernel launch serves all models, which is what pays on a GPU.
- ``concurrent=False``: the classic loop, one nn.Module + torch.optim.Adam after another.

Divergence: a model whose training loss is non-finite at step s is recorded as diverged from s
(its loss at s is kept as recorded, NaN after), it is dropped from the stack (no more compute),
and the band at steps >= s is taken over the remaining models. The check reads the losses to
the host every ``check_every`` steps (not every step), so a diverged model may run a few steps
on NaN weights before it is dropped; this changes nothing for the others (vmap keeps the
models independent).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from cifarlab.errors import ConfigError
from cifarlab.utils import atomic_write_text

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch (1-based) -> batches


def check_lrs(lrs: Sequence[float]) -> list[float]:
    out = [float(v) for v in lrs]
    if not out:
        raise ConfigError("the loss landscape needs at least one learning rate")
    bad = [v for v in out if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(f"learning rates must be positive and finite, got {bad}")
    return out


def build_same_init(build: Callable[[], nn.Module], n: int, seed: int, device) -> list[nn.Module]:
    """n copies of ``build()``, each created right after ``torch.manual_seed(seed)`` (same init)."""
    models = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(n):
            torch.manual_seed(seed)
            models.append(build().to(device).train())
    return models


# -- the two trainers ----------------------------------------------------------------------------
class StackedAdam:
    """torch.optim.Adam (no weight decay, no amsgrad) on stacked tensors, one lr per model."""

    def __init__(self, params: dict[str, torch.Tensor], lrs: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lrs, self.betas, self.eps = params, lrs, betas, eps
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2_sqrt = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        step_size = self.lrs / bc1
        for k, p in self.params.items():
            g = grads[k]
            self.m[k].lerp_(g, 1 - b1)
            self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (self.v[k].sqrt() / bc2_sqrt).add_(self.eps)
            p.sub_(step_size.view(-1, *([1] * (p.dim() - 1))) * self.m[k] / denom)

    def keep(self, idx: torch.Tensor) -> None:
        for d in (self.m, self.v):
            for k in d:
                d[k] = d[k][idx]
        self.lrs = self.lrs[idx]


class ConcurrentModels:
    """M models of one architecture trained together: stacked state, one vmapped step."""

    def __init__(self, models: list[nn.Module], lrs: Sequence[float], loss_fn, betas=(0.9, 0.999),
                 eps=1e-8, autocast: Callable = contextlib.nullcontext):
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = buffers
        device = next(iter(self.params.values())).device
        self.opt = StackedAdam(self.params, torch.tensor(list(lrs), device=device), betas, eps)
        base = copy.deepcopy(models[0]).to("meta")  # the architecture only; state comes stacked

        def loss_one(p, b, x, y):
            with autocast():
                return loss_fn(functional_call(base, (p, b), (x,)), y).float()

        # randomness="different": each model draws its own dropout masks, as separate runs would
        self._step = vmap(grad_and_value(loss_one), in_dims=(0, 0, None, None), randomness="different")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grads, loss = self._step(self.params, self.buffers, x, y)  # BN running stats update in place
        self.opt.step(grads)
        return loss.detach()

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the stacked models at positions ``idx`` (drop diverged ones)."""
        self.params = {k: v[idx] for k, v in self.params.items()}
        self.buffers = {k: v[idx] for k, v in self.buffers.items()}
        self.opt.params = self.params
        self.opt.keep(idx)


class SingleModel:
    """The classic loop for one model: forward, backward, torch.optim.Adam step."""

    def __init__(self, model: nn.Module, lr: float, loss_fn, betas=(0.9, 0.999), eps=1e-8,
                 autocast: Callable = contextlib.nullcontext):
        self.model, self.loss_fn, self.autocast = model, loss_fn, autocast
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, foreach=True)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.model(x), y).float()
        loss.backward()
        self.opt.step()
        return loss.detach()


# -- training one landscape ----------------------------------------------------------------------
@dataclass
class LandscapeRun:
    name: str
    lrs: list[float]
    losses: np.ndarray  # [steps, M]; NaN after a model's divergence step
    epochs: np.ndarray  # [steps] epoch (1-based) of each step
    diverged_step: list[int | None]
    wall_time_s: float
    concurrent: bool


def _first_bad(block: torch.Tensor) -> list[int | None]:
    """Per column of a [k, A] loss block: index of the first non-finite entry, or None."""
    bad = ~torch.isfinite(block)
    any_bad = bad.any(0).tolist()
    first = bad.float().argmax(0).tolist()
    return [f if a else None for f, a in zip(first, any_bad)]


def _run_single(trainer: SingleModel, batches: Batches, epochs: int, check_every: int):
    """Train one model; stop at the check after its loss turns non-finite.

    Returns (losses up to and including the first non-finite one, epoch of each, that step or None).
    """
    losses: list[float] = []
    step_epochs: list[int] = []
    pending: list[torch.Tensor] = []

    def check() -> int | None:
        if not pending:
            return None
        block = torch.stack(pending)[:, None]
        bad = _first_bad(block)[0]
        vals = block[:, 0].cpu().tolist()
        pending.clear()
        losses.extend(vals if bad is None else vals[:bad + 1])
        return None if bad is None else len(losses) - 1

    for epoch in range(1, epochs + 1):
        for x, y in batches(epoch):
            pending.append(trainer.step(x, y))
            step_epochs.append(epoch)
            if len(pending) >= check_every and (bad := check()) is not None:
                return losses, step_epochs, bad
        if (bad := check()) is not None:
            return losses, step_epochs, bad
    return losses, step_epochs, None


def train_landscape(name: str, build: Callable[[], nn.Module], lrs: Sequence[float], batches: Batches,
                    epochs: int, *, loss_fn=F.cross_entropy, seed: int = 2020, concurrent: bool = True,
                    device="cpu", betas=(0.9, 0.999), eps: float = 1e-8, check_every: int = 50,
                    autocast: Callable = contextlib.nullcontext,
                    progress: Callable[[str], None] | None = None) -> LandscapeRun:
    """Train one model per learning rate; return the training loss of every step of every model."""
    lrs = check_lrs(lrs)
    if not isinstance(epochs, int) or epochs <= 0:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    m = len(lrs)
    models = build_same_init(build, m, seed, device)
    t0 = time.perf_counter()
    columns: list[list[float]] = [[] for _ in range(m)]  # per model, its losses so far
    step_epochs: list[int] = []
    diverged: list[int | None] = [None] * m

    if concurrent:
        trainer = ConcurrentModels(models, lrs, loss_fn, betas, eps, autocast)
        del models
        alive = list(range(m))  # original index of each stacked row
        pending: list[torch.Tensor] = []

        def check():
            nonlocal alive
            if not pending:
                return
            block = torch.stack(pending)  # [k, A]: one host read per check
            start = len(step_epochs) - len(pending)
            for orig, col, bad in zip(alive, block.T.cpu().tolist(), _first_bad(block)):
                if diverged[orig] is not None:
                    continue
                if bad is not None:
                    col = col[:bad + 1]
                    diverged[orig] = start + bad
                columns[orig].extend(col)
            pending.clear()
            keep = [j for j, orig in enumerate(alive) if diverged[orig] is None]
            if len(keep) < len(alive):
                alive = [alive[j] for j in keep]
                if alive:
                    trainer.keep(torch.tensor(keep, device=next(iter(trainer.params.values())).device))

        for epoch in range(1, epochs + 1):
            for x, y in batches(epoch):
                if not alive:
                    break
                pending.append(trainer.step(x, y))
                step_epochs.append(epoch)
                if len(pending) >= check_every:
                    check()
            check()
            if progress:
                progress(f"{name}: epoch {epoch}/{epochs}, {len(alive)}/{m} models alive, "
                         f"{time.perf_counter() - t0:.1f}s")
    else:
        for i, (model, lr) in enumerate(zip(models, lrs)):
            trainer = SingleModel(model, lr, loss_fn, betas, eps, autocast)
            columns[i], its_epochs, diverged[i] = _run_single(trainer, batches, epochs, check_every)
            if len(its_epochs) > len(step_epochs):  # the longest run defines the step axis
                step_epochs = its_epochs
            if progress:
                progress(f"{name}: lr {lr:g} done ({len(columns[i])} steps), {time.perf_counter() - t0:.1f}s")
            models[i] = None  # free its memory before the next one
            del trainer, model
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = len(step_epochs)
    losses = np.full((steps, m), np.nan)
    for i, col in enumerate(columns):
        losses[:len(col), i] = col
    return LandscapeRun(name, lrs, losses, np.asarray(step_epochs), diverged, wall, concurrent)


# -- the band ------------------------------------------------------------------------------------
def loss_band(losses: np.ndarray, diverged_step: Sequence[int | None]) -> dict[str, np.ndarray]:
    """Per step: min and max training loss over the models still alive, and how many are.

    A model counts up to (not including) its divergence step; non-finite values never count.
    Steps with no model alive get NaN.
    """
    losses = np.asarray(losses, dtype=float)
    steps, m = losses.shape
    alive = np.isfinite(losses)
    for j, d in enumerate(diverged_step):
        if d is not None:
            alive[d:, j] = False
    masked_lo = np.where(alive, losses, np.inf)
    masked_hi = np.where(alive, losses, -np.inf)
    n = alive.sum(1)
    lo = np.where(n > 0, masked_lo.min(1, initial=np.inf), np.nan)
    hi = np.where(n > 0, masked_hi.max(1, initial=-np.inf), np.nan)
    return {"step": np.arange(steps), "min": lo, "max": hi, "n_alive": n}


def band_width(band: dict[str, np.ndarray]) -> float:
    """Mean of (max - min) over the steps where at least two models are alive (NaN if none)."""
    ok = band["n_alive"] >= 2
    return float(np.mean(band["max"][ok] - band["min"][ok])) if ok.any() else float("nan")


# -- speed: concurrent against one after another ------------------------------------------------
def measure_speedup(build: Callable[[], nn.Module], lrs: Sequence[float], batches: list, *,
                    loss_fn=F.cross_entropy, seed: int = 2020, device="cpu", warmup: int = 2,
                    autocast: Callable = contextlib.nullcontext) -> dict:
    """Seconds for ``len(batches)`` steps of all M models: sequential vs one vmapped step.

    Both start from the same models and see the same batches; ``warmup`` steps of each are
    run first and not timed (allocator, kernel selection).
    """
    lrs = check_lrs(lrs)
    if len(batches) == 0:
        raise ConfigError("measure_speedup needs at least one batch")
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    singles = [SingleModel(mdl, lr, loss_fn, autocast=autocast)
               for mdl, lr in zip(build_same_init(build, len(lrs), seed, device), lrs)]
    for s in singles:
        for x, y in batches[:warmup]:
            s.step(x, y)
    sync()
    t0 = time.perf_counter()
    for s in singles:
        for x, y in batches:
            s.step(x, y)
    sync()
    seq = time.perf_counter() - t0
    del singles
    conc_models = ConcurrentModels(build_same_init(build, len(lrs), seed, device), lrs, loss_fn,
                                   autocast=autocast)
    for x, y in batches[:warmup]:
        conc_models.step(x, y)
    sync()
    t0 = time.perf_counter()
    for x, y in batches:
        conc_models.step(x, y)
    sync()
    conc = time.perf_counter() - t0
    return {"models": len(lrs), "steps": len(batches), "sequential_s": seq, "concurrent_s": conc,
            "speedup": seq / conc if conc > 0 else float("nan"), "device": str(device)}


# -- files in the run directory ------------------------------------------------------------------
LOSSES_CSV = "landscape_losses.csv"  # model, lr, step, epoch, loss (one row per step and model)
RUNS_CSV = "landscape_runs.csv"  # model, lr, diverged, diverged_step, final_loss, ...
BAND_CSV = "landscape_band.csv"  # model, step, epoch, min, max, n_alive


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()


def save_landscape(run_dir: str | Path, runs: list[LandscapeRun]) -> None:
    """Write the per-step losses, the per-rate outcome and the band of each model, atomically."""
    run_dir = Path(run_dir)
    loss_rows, run_rows, band_rows = [], [], []
    for run in runs:
        band = loss_band(run.losses, run.diverged_step)
        for j, lr in enumerate(run.lrs):
            col = run.losses[:, j]
            last = len(col) if run.diverged_step[j] is None else run.diverged_step[j] + 1
            for s in range(last):
                loss_rows.append({"model": run.name, "lr": lr, "step": s, "epoch": int(run.epochs[s]),
                                  "loss": float(col[s])})
            finite = col[:last][np.isfinite(col[:last])]
            run_rows.append({"model": run.name, "lr": lr, "diverged": run.diverged_step[j] is not None,
                             "diverged_step": run.diverged_step[j],
                             "final_loss": float(finite[-1]) if len(finite) else float("nan"),
                             "concurrent": run.concurrent, "wall_time_s": run.wall_time_s})
        for s in range(len(band["step"])):
            band_rows.append({"model": run.name, "step": s, "epoch": int(run.epochs[s]),
                              "min": float(band["min"][s]), "max": float(band["max"][s]),
                              "n_alive": int(band["n_alive"][s])})
    atomic_write_text(run_dir / LOSSES_CSV, _csv(loss_rows, ["model", "lr", "step", "epoch", "loss"]))
    atomic_write_text(run_dir / RUNS_CSV, _csv(run_rows, ["model", "lr", "diverged", "diverged_step",
                                                          "final_loss", "concurrent", "wall_time_s"]))
    atomic_write_text(run_dir / BAND_CSV, _csv(band_rows, ["model", "step", "epoch", "min", "max", "n_alive"]))
