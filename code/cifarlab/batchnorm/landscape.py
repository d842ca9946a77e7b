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

The course's own smoothness measures come from the same runs, per step and per model:
``grad_change`` = ||g_t - g_(t-1)|| (the change between consecutive steps' gradients, each on
its own batch) and ``weight_change`` = ||w_t - w_(t-1)|| (the length of the previous update),
so that the course's gradient-predictiveness band (min/max of grad_change over the rates) and
its beta-smoothness curve (max over the rates of grad_change / weight_change) need no extra
forward pass. Both are NaN at step 0. They cost two norms and one copy of the gradients and
weights per step, computed on the device and read with the losses.

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
import gzip
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
from cifarlab.utils import atomic_write_bytes, atomic_write_text

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch (1-based) -> batches


def check_lrs(lrs: Sequence[float]) -> list[float]:
    out = [float(v) for v in lrs]
    if not out:
        raise ConfigError("the loss landscape needs at least one learning rate")
    bad = [v for v in out if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(f"learning rates must be positive and finite, got {bad}")
    return out


@contextlib.contextmanager
def cpu_seeded(seed: int):
    """Seed only the CPU generator (models are built on the CPU) and restore it on exit.

    Not ``torch.manual_seed`` inside ``fork_rng(devices=[])``: manual_seed reseeds every CUDA
    generator too, and fork_rng without devices does not restore them."""
    gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(int(seed))
    try:
        yield
    finally:
        gen.set_state(saved)


def build_same_init(build: Callable[[], nn.Module], n: int, seed: int, device) -> list[nn.Module]:
    """n copies of ``build()``, each created right after seeding the CPU generator (same init)."""
    models = []
    for _ in range(n):
        with cpu_seeded(seed):
            model = build()
        models.append(model.to(device).train())
    return models


def _sq_norm_rows(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per leading index (one row per stacked model): the squared L2 norm over all tensors."""
    return sum(t.float().flatten(1).pow(2).sum(1) for t in tensors)


# -- the two trainers ----------------------------------------------------------------------------
class StackedAdam:
    """torch.optim.Adam (no weight decay, no amsgrad) on stacked tensors, one lr per model."""

    def __init__(self, params: dict[str, torch.Tensor], lrs: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lrs, self.betas, self.eps = params, lrs, betas, eps
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """One Adam step of every model; returns the length of each model's update [M]."""
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2_sqrt = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        step_size = self.lrs / bc1
        sq = torch.zeros_like(self.lrs)
        for k, p in self.params.items():
            g = grads[k]
            self.m[k].lerp_(g, 1 - b1)
            self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (self.v[k].sqrt() / bc2_sqrt).add_(self.eps)
            update = step_size.view(-1, *([1] * (p.dim() - 1))) * self.m[k] / denom
            p.sub_(update)
            sq += update.float().flatten(1).pow(2).sum(1)
        return sq.sqrt()

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
        self.prev_grads: dict[str, torch.Tensor] | None = None
        self.last_update = torch.full((len(models),), float("nan"), device=device)
        base = copy.deepcopy(models[0]).to("meta")  # the architecture only; state comes stacked

        def loss_one(p, b, x, y):
            with autocast():
                return loss_fn(functional_call(base, (p, b), (x,)), y).float()

        # randomness="different": each model draws its own dropout masks, as separate runs would
        self._step = vmap(grad_and_value(loss_one), in_dims=(0, 0, None, None), randomness="different")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step of every model: [3, M] = loss, ||g_t - g_(t-1)||, ||w_t - w_(t-1)||."""
        grads, loss = self._step(self.params, self.buffers, x, y)  # BN running stats update in place
        with torch.no_grad():
            if self.prev_grads is None:
                change = torch.full_like(self.last_update, float("nan"))
            else:
                change = _sq_norm_rows(grads[k] - self.prev_grads[k] for k in grads).sqrt()
            self.prev_grads = {k: g.detach() for k, g in grads.items()}
            dist = self.last_update  # the update that moved w_(t-1) to w_t
            self.last_update = self.opt.step(grads)
        return torch.stack([loss.detach().float(), change, dist])

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the stacked models at positions ``idx`` (drop diverged ones)."""
        self.params = {k: v[idx] for k, v in self.params.items()}
        self.buffers = {k: v[idx] for k, v in self.buffers.items()}
        self.opt.params = self.params
        self.opt.keep(idx)
        if self.prev_grads is not None:
            self.prev_grads = {k: v[idx] for k, v in self.prev_grads.items()}
        self.last_update = self.last_update[idx]


class SingleModel:
    """The classic loop for one model: forward, backward, torch.optim.Adam step."""

    def __init__(self, model: nn.Module, lr: float, loss_fn, betas=(0.9, 0.999), eps=1e-8,
                 autocast: Callable = contextlib.nullcontext):
        self.model, self.loss_fn, self.autocast = model, loss_fn, autocast
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, foreach=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.prev_grads: list[torch.Tensor] | None = None
        self.last_update = torch.full((), float("nan"), device=self.params[0].device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step: [3, 1] = loss, ||g_t - g_(t-1)||, ||w_t - w_(t-1)|| (as ConcurrentModels)."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.model(x), y).float()
        loss.backward()
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            if self.prev_grads is None:
                change = torch.full_like(self.last_update, float("nan"))
            else:
                change = _flat_norm(torch._foreach_sub(grads, self.prev_grads))
            self.prev_grads = [g.detach().clone() for g in grads]
            before = [p.detach().clone() for p in self.params]
            dist = self.last_update
        self.opt.step()
        with torch.no_grad():
            self.last_update = _flat_norm(torch._foreach_sub([p.detach() for p in self.params], before))
        return torch.stack([loss.detach(), change, dist])[:, None]


def _flat_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


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
    grad_change: np.ndarray | None = None  # [steps, M] ||g_t - g_(t-1)|| (NaN at step 0 and after divergence)
    weight_change: np.ndarray | None = None  # [steps, M] ||w_t - w_(t-1)||
    seed: int | None = None


def _first_bad(block: torch.Tensor) -> list[int | None]:
    """Per column of a [k, A] loss block: index of the first non-finite entry, or None."""
    bad = ~torch.isfinite(block)
    any_bad = bad.any(0).tolist()
    first = bad.float().argmax(0).tolist()
    return [f if a else None for f, a in zip(first, any_bad)]


class _Columns:
    """Per model, the (loss, grad_change, weight_change) of every step read so far."""

    def __init__(self, m: int):
        self.values: list[list[list[float]]] = [[] for _ in range(m)]  # model -> steps -> 3 values

    def add(self, orig: int, rows: list[list[float]]) -> None:
        self.values[orig].extend(rows)

    def arrays(self, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = np.full((3, steps, len(self.values)), np.nan)
        for j, col in enumerate(self.values):
            if col:
                out[:, :len(col), j] = np.asarray(col, dtype=float).T
        return out[0], out[1], out[2]


def _read(pending: list[torch.Tensor], alive: list[int], diverged: list[int | None], cols: _Columns,
          start: int) -> None:
    """One host read of k steps' [3, A] results; record them and any divergence (from ``start``)."""
    block = torch.stack(pending)  # [k, 3, A]
    firsts = _first_bad(block[:, 0])
    host = block.permute(2, 0, 1).cpu().tolist()  # [A][k][3]
    for orig, rows, bad in zip(alive, host, firsts):
        if diverged[orig] is not None:
            continue
        if bad is not None:
            rows = rows[:bad + 1]
            diverged[orig] = start + bad
        cols.add(orig, rows)
    pending.clear()


def train_landscape(name: str, build: Callable[[], nn.Module], lrs: Sequence[float], batches: Batches,
                    epochs: int, *, loss_fn=F.cross_entropy, seed: int = 2020, concurrent: bool = True,
                    device="cpu", betas=(0.9, 0.999), eps: float = 1e-8, check_every: int = 50,
                    autocast: Callable = contextlib.nullcontext,
                    progress: Callable[[str], None] | None = None) -> LandscapeRun:
    """Train one model per learning rate; return the training loss of every step of every model,
    with the course's grad_change and weight_change (see the module docstring)."""
    lrs = check_lrs(lrs)
    if not isinstance(epochs, int) or epochs <= 0:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    m = len(lrs)
    models = build_same_init(build, m, seed, device)
    t0 = time.perf_counter()
    cols = _Columns(m)
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
            _read(pending, alive, diverged, cols, len(step_epochs) - len(pending))
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
            its_epochs: list[int] = []
            pending = []
            stop = False
            for epoch in range(1, epochs + 1):
                for x, y in batches(epoch):
                    pending.append(trainer.step(x, y))
                    its_epochs.append(epoch)
                    if len(pending) >= check_every:
                        _read(pending, [i], diverged, cols, len(its_epochs) - len(pending))
                        if diverged[i] is not None:
                            stop = True
                            break
                if stop:
                    break
                if pending:
                    _read(pending, [i], diverged, cols, len(its_epochs) - len(pending))
                if diverged[i] is not None:
                    break
            if len(its_epochs) > len(step_epochs):  # the longest run defines the step axis
                step_epochs = its_epochs
            if progress:
                progress(f"{name}: lr {lr:g} done ({len(cols.values[i])} steps), {time.perf_counter() - t0:.1f}s")
            models[i] = None  # free its memory before the next one
            del trainer, model
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    losses, change, dist = cols.arrays(len(step_epochs))
    return LandscapeRun(name, lrs, losses, np.asarray(step_epochs), diverged, wall, concurrent,
                        grad_change=change, weight_change=dist, seed=seed)


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


def course_band(grad_change: np.ndarray, weight_change: np.ndarray,
                diverged_step: Sequence[int | None]) -> dict[str, np.ndarray]:
    """The course's per-step measures over the models still alive (as ``loss_band``):
    ``change_min``/``change_max`` of ||g_t - g_(t-1)|| (gradient predictiveness) and ``beta``,
    the max of ||g_t - g_(t-1)|| / ||w_t - w_(t-1)|| (effective beta-smoothness). NaN where no
    model has a finite value (step 0 always)."""
    change = np.asarray(grad_change, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = change / np.asarray(weight_change, dtype=float)
    alive = np.ones(change.shape, dtype=bool)
    for j, d in enumerate(diverged_step):
        if d is not None:
            alive[d:, j] = False
    out = {}
    for key, values, fn, init in (("change_min", change, np.min, np.inf), ("change_max", change, np.max, -np.inf),
                                  ("beta", ratio, np.max, -np.inf)):
        ok = alive & np.isfinite(values)
        red = fn(np.where(ok, values, init), axis=1, initial=init)
        out[key] = np.where(ok.any(1), red, np.nan)
    return out


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
# one row per (model, seed, lr, step): loss, grad_change, weight_change; gzip-compressed because
# every step of every rate is kept (the light pair, 5 epochs x 2 seeds: 37k rows, 2.3 MB raw, over
# the 2 MB a committed file may have); pandas reads it as it is
LOSSES_CSV = "landscape_losses.csv.gz"
RUNS_CSV = "landscape_runs.csv"  # model, seed, lr, diverged, diverged_step, final_loss, ...
# one row per (model, seed, step): loss min/max over the rates, n_alive, the course's change band and beta
BAND_CSV = "landscape_band.csv"
LOSS_COLUMNS = ["model", "seed", "lr", "step", "epoch", "loss", "grad_change", "weight_change"]
RUN_COLUMNS = ["model", "seed", "lr", "diverged", "diverged_step", "final_loss", "concurrent", "wall_time_s"]
BAND_COLUMNS = ["model", "seed", "step", "epoch", "min", "max", "n_alive", "change_min", "change_max", "beta"]


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()


def _nan_array(run: LandscapeRun, values: np.ndarray | None) -> np.ndarray:
    return np.full(run.losses.shape, np.nan) if values is None else values


def save_landscape(run_dir: str | Path, runs: list[LandscapeRun]) -> None:
    """Write the per-step values, the per-rate outcome and the bands of every (model, seed),
    atomically (rewritten whole after each finished landscape, so a resumed study finds them)."""
    run_dir = Path(run_dir)
    loss_rows, run_rows, band_rows = [], [], []
    for run in runs:
        band = loss_band(run.losses, run.diverged_step)
        change, dist = _nan_array(run, run.grad_change), _nan_array(run, run.weight_change)
        course = course_band(change, dist, run.diverged_step)
        for j, lr in enumerate(run.lrs):
            col = run.losses[:, j]
            last = len(col) if run.diverged_step[j] is None else run.diverged_step[j] + 1
            for s in range(last):
                loss_rows.append({"model": run.name, "seed": run.seed, "lr": lr, "step": s,
                                  "epoch": int(run.epochs[s]), "loss": float(col[s]),
                                  "grad_change": float(change[s, j]), "weight_change": float(dist[s, j])})
            finite = col[:last][np.isfinite(col[:last])]
            run_rows.append({"model": run.name, "seed": run.seed, "lr": lr,
                             "diverged": run.diverged_step[j] is not None,
                             "diverged_step": run.diverged_step[j],
                             "final_loss": float(finite[-1]) if len(finite) else float("nan"),
                             "concurrent": run.concurrent, "wall_time_s": run.wall_time_s})
        for s in range(len(band["step"])):
            band_rows.append({"model": run.name, "seed": run.seed, "step": s, "epoch": int(run.epochs[s]),
                              "min": float(band["min"][s]), "max": float(band["max"][s]),
                              "n_alive": int(band["n_alive"][s]), "change_min": float(course["change_min"][s]),
                              "change_max": float(course["change_max"][s]), "beta": float(course["beta"][s])})
    # mtime=0: the same losses give the same bytes (the report is deterministic)
    atomic_write_bytes(run_dir / LOSSES_CSV, gzip.compress(_csv(loss_rows, LOSS_COLUMNS).encode(), mtime=0))
    atomic_write_text(run_dir / RUNS_CSV, _csv(run_rows, RUN_COLUMNS))
    atomic_write_text(run_dir / BAND_CSV, _csv(band_rows, BAND_COLUMNS))


def load_landscape_runs(run_dir: str | Path) -> list[LandscapeRun]:
    """The landscapes saved in ``run_dir`` (as ``save_landscape`` wrote them), in file order;
    [] when there are none. A resumed study keeps these and trains only the missing ones."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not all((run_dir / f).is_file() for f in (LOSSES_CSV, RUNS_CSV, BAND_CSV)):
        return []
    losses, runs, band = (pd.read_csv(run_dir / f) for f in (LOSSES_CSV, RUNS_CSV, BAND_CSV))
    if "seed" not in runs:  # a study from before seeds were recorded
        return []
    out = []
    for (name, seed), r in runs.groupby(["model", "seed"], sort=False):
        lrs = [float(v) for v in r["lr"]]
        b = band[(band["model"] == name) & (band["seed"] == seed)].sort_values("step")
        steps = len(b)
        arrays = {k: np.full((steps, len(lrs)), np.nan) for k in ("loss", "grad_change", "weight_change")}
        rows = losses[(losses["model"] == name) & (losses["seed"] == seed)]
        for j, lr in enumerate(lrs):
            col = rows[np.isclose(rows["lr"], lr, rtol=1e-7, atol=0)]
            for k in arrays:
                arrays[k][col["step"].to_numpy(int), j] = col[k].to_numpy(float)
        div = [None if pd.isna(d) else int(d) for d in r["diverged_step"]]
        out.append(LandscapeRun(str(name), lrs, arrays["loss"], b["epoch"].to_numpy(int), div,
                                float(r["wall_time_s"].iloc[0]), str(r["concurrent"].iloc[0]).lower() == "true",
                                grad_change=arrays["grad_change"], weight_change=arrays["weight_change"],
                                seed=int(seed)))
    return out
