"""EDropout (Salehinejad & Valaee, TNNLS 2021) as a Trainer callback.

Per training step, during the search phase:
  1. the NS trial states of one binary-DE generation are scored together on the current
     mini-batch (one no-grad forward of NS stacked copies of the batch, each copy masked by its
     own state; ``edropout_search.margin_energy``);
  2. greedy selection against the parents' stored costs; the best state of the population masks
     the real step: masked forward, the loss, backward, gradients of dropped units zeroed;
  3. dropped weights are kept unchanged: their gradients are masked and, because weight decay
     and momentum would still move them inside ``optimizer.step``, their values from before the
     step are put back after it. They are used again as soon as their bit returns.
The first step of a run scores the initial population itself (Bernoulli(p0)) instead of trials.
A cost stays with its state: a parent is not re-scored on later batches (one scoring forward
per candidate per step, as in the reference). This is what lets the freeze rule see exact
repeats, and it also means that a state which scored well on an easy batch keeps its low cost,
so the best state tends to settle early.

Early convergence: from ``edropout_freeze_epoch`` on, the state freezes the first time the best
cost repeats one of the previous 9 best costs; from then on every step trains the frozen
(pruned) network and the search stops. The test runs on the device every step; the host reads
the flag after the first step of each freeze-phase epoch (where the repeat usually happens:
greedy selection keeps the best parent and its cost whenever no trial beats it) and at the end
of every epoch — no other host synchronisation. Steps after a repeat that the host has not read
yet already train the frozen state; only their (discarded) search is wasted.

Evaluation: the Trainer's val/test numbers are EDropout(P) (best state on, BatchNorm running
statistics of the masked training) — the network this method delivers, and what selects the
best checkpoint. The test evaluation uses the state of the best-validation epoch, matching the
weights the Trainer restores from best.pt. The callback adds (summary.json, issue 12):
  * ``f_acc``: EDropout(F), every unit on, after recalibrating BatchNorm for the all-on network
    on up to ``bn_recal_batches`` training batches (edropout/recalibrate.py; the statistics
    gathered under the masks do not fit it); ``val_acc_F`` per epoch the same way;
  * ``f_acc_batch_stats``: F with each test batch's own statistics (the released code's way);
  * ``r_paper`` (R as the released code counts it), ``r_params`` and ``flops_kept`` (the
    physically pruned export against the dense network), fractions; ``test_acc_pruned``;
  * the search's bookkeeping: ``search_steps`` (steps whose training state came from the search,
    up to the freeze), ``state_changes`` (how often that state changed), and per unit the number
    of those steps that kept it (``kept_steps``, in edropout_state.pt), summarised as
    ``units_never_trained``, the fraction of units no search step kept: their weights never left
    their initialisation before the freeze.
All the bookkeeping lives on the device and is read with the epoch's one host sync.

Random-mask baselines (``edropout_random_keep``): one fixed random state keeping that fraction
of the units, frozen from the first step — the same masked training without the search. They
report P, R and the export only: F is meaningless for a state that never changed.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist

from cifarlab.edropout import search as S
from cifarlab.edropout.recalibrate import bn_batch_stats, bn_state_restored, recalibrate_bn
from cifarlab.edropout.unit_masks import UnitMasks
from cifarlab.errors import CheckpointError
from cifarlab.train.callbacks import Callback


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class EDropout(Callback):
    def __init__(self, states: int = 8, freeze_epoch: int = 100, p0: float = 0.5, mutation: str = "original",
                 random_keep: float | None = None, seed: int = 0, chunk: int | None = None,
                 probe: bool | None = None, export: bool = True, bn_recal_batches: int = 100):
        if mutation not in S.MUTATION_RULES:
            raise ValueError(f"unknown mutation rule {mutation!r}")
        self.ns, self.freeze_epoch, self.p0, self.mutation = states, freeze_epoch, p0, mutation
        self.random_keep, self.seed, self.export = random_keep, seed, export
        # training batches forwarded to recalibrate BatchNorm for F (12,800 images at batch 128;
        # the running statistics of training average about 10 batches, momentum 0.1)
        self.bn_recal_batches = bn_recal_batches
        # how candidates are scored (UnitMasks): one forward per candidate computing only its
        # kept filters ("probe"; default on CPU), or stacked populations of ``chunk`` candidates
        # per forward (default on GPU, chunk None = all NS at once)
        self.probe, self.chunk = probe, chunk
        self.masks: UnitMasks | None = None
        self._pending: dict | None = None
        self._eval_full = False  # evaluate with every unit on (EDropout F)
        self._eval_batch_stats = False  # ... with BatchNorm using each batch's statistics
        self._between_epochs = False
        self._checked = False  # the freeze phase's mid-epoch host read done this epoch
        self._kept_cache: tuple[bytes, dict] | None = None

    @classmethod
    def from_config(cls, cfg) -> "EDropout":
        return cls(states=cfg.edropout_states, freeze_epoch=cfg.edropout_freeze_epoch, p0=cfg.edropout_p0,
                   mutation=cfg.edropout_mutation, random_keep=getattr(cfg, "edropout_random_keep", None),
                   seed=cfg.seed)

    @property
    def mode(self) -> str:
        return "search" if self.random_keep is None else "random"

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, device) -> None:
        """Find the units, install the masks and draw the initial population (or random state)."""
        self.device = torch.device(device)
        self.masks = UnitMasks(model).install()
        d = self.masks.size
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(self.seed) * 1000003 + 0xED)  # own stream: the search never shifts torch's
        self.pop = self.costs = None
        self.history = torch.full((S.HISTORY,), float("nan"), device=self.device)
        self.best_cost = torch.full((), float("nan"), device=self.device)
        self.converged = torch.zeros((), dtype=torch.bool, device=self.device)
        self.frozen_state = torch.ones(d, dtype=torch.bool, device=self.device)
        self.frozen_epoch = None
        # bookkeeping of the search, on the device (read with the epoch's one host sync)
        self.search_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.state_changes = torch.zeros((), dtype=torch.long, device=self.device)
        self.kept_steps = torch.zeros(d, dtype=torch.int32, device=self.device)
        if self.random_keep is None:
            self.pop = S.init_population(self.ns, d, self.p0, self.gen)
            self.state = self.pop[0].clone()  # until the first step has scored the population
            self.frozen = False
        else:
            self.state = S.random_state(d, self.random_keep, self.gen)
            self.frozen, self.frozen_epoch = True, 0
        self.best_epoch_state = self.state.clone()
        self._saved: list | None = None
        self._between_epochs = True  # no epoch running: evaluations use the best epoch's state
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None

    def on_fit_start(self, trainer) -> None:
        self.setup(trainer.model, trainer.device)

    # -- the training step -------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, model, pop: torch.Tensor, x: torch.Tensor, y: torch.Tensor, autocast=None) -> torch.Tensor:
        """Margin energy of each state of ``pop`` on the batch (x, y): ``(NS,)``, on the device."""
        ns, b = pop.shape[0], x.shape[0]
        probe = self.probe if self.probe is not None else x.device.type == "cpu"
        if probe:
            costs = []
            for s in pop:
                with self.masks.probe(s), (autocast() if autocast else contextlib.nullcontext()):
                    costs.append(S.margin_energy(model(x), y))
            return self._reduce(torch.stack(costs))
        chunk = self.chunk or ns
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        costs = []
        for i in range(0, ns, chunk):
            p = pop[i:i + chunk]
            xx = x.repeat(p.shape[0], *([1] * (x.dim() - 1)))
            if channels_last:
                xx = xx.contiguous(memory_format=torch.channels_last)
            with self.masks.population(p), (autocast() if autocast else contextlib.nullcontext()):
                logits = model(xx)
            costs.append(S.margin_energy(logits.reshape(p.shape[0], b, -1), y))
        return self._reduce(torch.cat(costs))

    @staticmethod
    def _reduce(costs: torch.Tensor) -> torch.Tensor:
        world = _dist_world()
        if world > 1:  # every rank must evolve the same population: average the ranks' costs
            dist.all_reduce(costs)
            costs /= world
        return costs

    def search_step(self, model, x, y, epoch: int, autocast=None) -> None:
        """One generation on this batch; sets ``self.state`` (the state that masks this step):
        the best of the population by cost, or the frozen state once the best cost repeated.
        No host synchronisation (a test counts them)."""
        first = self.costs is None
        if first:  # first step: score the initial population itself
            trial = self.pop
        else:
            trial = S.trial_population(self.pop, self.gen, self.mutation)
        trial_costs = self.score(model, trial, x, y, autocast)
        if first:
            self.pop, self.costs = trial, trial_costs
        else:
            self.pop, self.costs = S.select(self.pop, self.costs, trial, trial_costs)
        best, self.best_cost = S.best_of(self.pop, self.costs)
        repeated, self.history = S.convergence_step(self.history, self.best_cost)
        before, searching = self.state, ~self.converged  # converged before this step: not a search step
        if epoch >= self.freeze_epoch:
            newly = repeated & ~self.converged
            self.frozen_state = torch.where(newly, best, self.frozen_state)
            self.converged = self.converged | repeated
            self.state = torch.where(self.converged, self.frozen_state, best)
        else:
            self.state = best
        self.search_steps += searching
        self.kept_steps += self.state & searching
        if not first:  # the first state replaces a placeholder, not a chosen state
            self.state_changes += (self.state != before).any() & searching

    @staticmethod
    def _train_model(trainer):
        """The module the masked step runs: the DDP wrapper when there is one (its backward
        averages the ranks' gradients), never the compiled one (the masking forwards switch per
        step, which a compiled graph would not see). With --compile the Trainer wraps DDP in
        torch.compile: unwrap the compiled module, not the DDP wrapper under it."""
        m = getattr(trainer, "train_model", None)
        if m is None:
            return trainer.model
        return getattr(m, "_orig_mod", m)  # torch.compile's OptimizedModule keeps what it wraps there

    def forward_loss(self, trainer, x, y):
        if not self.frozen:
            self.search_step(trainer.model, x, y, trainer.epoch, trainer.autocast)
            if trainer.epoch >= self.freeze_epoch and not self._checked:
                # one host read in each epoch of the freeze phase, after its first step (when
                # the repeat usually happens), so that the rest of the epoch skips the search
                self._checked = True
                if bool(self.converged):
                    self.frozen, self.frozen_epoch = True, trainer.epoch
                    self.state = self.frozen_state.clone()
        self.masks.set_state(self.state)
        with trainer.autocast():
            logits = self._train_model(trainer)(x)
            loss = trainer.loss_fn(logits, y)
        return logits, loss

    def on_after_backward(self, trainer) -> None:
        self.mask_gradients_and_save()

    def on_batch_end(self, trainer, loss) -> None:
        self.restore_dropped()

    def mask_gradients_and_save(self) -> None:
        """Zero the gradients of dropped units and remember their weights before the step."""
        pm = self.masks.param_masks(self.state)
        for p, keep in pm:
            if p.grad is not None:
                p.grad.mul_(keep)
        self._saved = [(p, keep, p.detach().clone()) for p, keep in pm]

    @torch.no_grad()
    def restore_dropped(self) -> None:
        """Undo what weight decay / momentum did to dropped units in the optimizer step."""
        if self._saved:
            for p, keep, old in self._saved:
                p.copy_(torch.where(keep, p, old))
        self._saved = None

    # -- evaluation ------------------------------------------------------------------------------
    def eval_state(self, trainer=None) -> torch.Tensor:
        # after an epoch's end the Trainer's next evaluation may be the test one, on the
        # best-validation weights: use the state of that epoch
        writes = trainer is None or getattr(trainer, "rundir", None) is not None
        return self.best_epoch_state if (self._between_epochs and writes) else self.state

    @contextlib.contextmanager
    def _eval_masks(self, trainer):
        if self._eval_full:
            self.masks.full()
        else:
            self.masks.set_state(self.eval_state(trainer))
        try:
            if self._eval_batch_stats:  # Trainer.evaluate has set eval mode: BN layers back to batch statistics
                with bn_batch_stats(trainer.model):
                    yield
            else:
                yield
        finally:
            self.masks.set_state(self.state)

    def eval_context(self, trainer):
        if self.masks is None:
            return contextlib.nullcontext()
        return self._eval_masks(trainer)

    def recalibrate_full(self, trainer) -> int:
        """BatchNorm running statistics for the all-on network, from training batches (the
        caller restores the old ones: ``bn_state_restored``). Returns the images used."""
        self.masks.full()
        try:
            return recalibrate_bn(trainer.model, trainer.data.train, self.bn_recal_batches, trainer.autocast,
                                  getattr(trainer, "channels_last", False))
        finally:
            self.masks.set_state(self.state)

    def evaluate_full(self, trainer, loader, bn: str = "recalibrated"):
        """(loss, acc) with every unit on: EDropout(F). ``bn``: "recalibrated" (running
        statistics recomputed for the all-on network) or "batch" (each batch's statistics).
        Every BatchNorm buffer is restored afterwards, bit for bit."""
        if bn not in ("recalibrated", "batch"):
            raise ValueError(f"bn must be 'recalibrated' or 'batch', got {bn!r}")
        with bn_state_restored(trainer.model):
            if bn == "recalibrated":
                self.recalibrate_full(trainer)
            self._eval_full, self._eval_batch_stats = True, bn == "batch"
            try:
                return trainer.evaluate(loader)
            finally:
                self._eval_full = self._eval_batch_stats = False

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self._between_epochs = False
        self._checked = False

    def search_counts(self) -> dict[str, Any]:
        """search_steps, state_changes, units_never_trained (fraction): one host read."""
        steps, changes, never = torch.stack([self.search_steps.double(), self.state_changes.double(),
                                             (self.kept_steps == 0).double().mean()]).tolist()
        return {"search_steps": int(steps), "state_changes": int(changes), "units_never_trained": never}

    def on_epoch_end(self, trainer, epoch: int, row: dict[str, Any]) -> None:
        # the epoch's one host sync for the search: converged flag, best cost, units kept, counts
        conv, cost, kept, steps, changes, never = torch.stack([
            self.converged.double(), self.best_cost.double(), self.state.double().mean(),
            self.search_steps.double(), self.state_changes.double(), (self.kept_steps == 0).double().mean()]).tolist()
        if not self.frozen and conv:
            self.frozen, self.frozen_epoch = True, epoch
            self.state = self.frozen_state.clone()
            kept = self.state.float().mean().item()
        row["val_acc_P"] = row.get("val_acc")
        data = getattr(trainer, "data", None)
        if self.mode == "search" and data is not None and getattr(data, "val", None) is not None:
            row["val_loss_F"], row["val_acc_F"] = self.evaluate_full(trainer, data.val)
        row["units_kept_pct"] = 100.0 * kept
        from cifarlab.edropout.export import r_paper

        row["r_paper"] = r_paper(self.masks.layers, self.state)
        if self.export:
            row["params_kept_pct"] = self.kept_info(trainer, self.state)["params_kept_pct"]
        row["best_cost"] = cost if math.isfinite(cost) else None
        row["edropout_frozen"] = int(self.frozen)
        if self.mode == "search":
            row["search_steps"], row["state_changes"], row["units_never_trained"] = int(steps), int(changes), never
        score = row.get("val_acc") if row.get("val_acc") is not None else row.get("train_acc")
        if score is not None and score > getattr(trainer, "best_val_acc", -1.0):
            self.best_epoch_state = self.state.clone()  # the Trainer will save this epoch as best.pt
        self._between_epochs = True

    def example_input(self, trainer) -> torch.Tensor:
        info = trainer.data.info
        return torch.zeros(1, info.in_channels, *info.image_size, device=trainer.device)

    def kept_info(self, trainer, state: torch.Tensor) -> dict:
        """R and the export's sizes for ``state`` (cached: after the freeze the state is constant)."""
        from cifarlab.edropout.export import export_pruned

        key = state.cpu().numpy().tobytes()
        if self._kept_cache is None or self._kept_cache[0] != key:
            _, info = export_pruned(trainer.model, self.masks.layers, state, self.example_input(trainer))
            self._kept_cache = (key, info)
        return self._kept_cache[1]

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        from cifarlab.edropout.export import r_paper

        state = self.eval_state(trainer)
        d = self.masks.size
        search = self.mode == "search"
        summary.update({
            "edropout_mode": self.mode, "edropout_random_keep": self.random_keep,
            "edropout_units": d, "units_kept": int(state.sum().item()),
            "units_kept_pct": 100.0 * state.float().mean().item(),
            "edropout_frozen_epoch": self.frozen_epoch,
            "test_acc_P": summary.get("test_acc"),
            "r_paper": r_paper(self.masks.layers, state),
        })
        if search:
            summary.update(self.search_counts())
        hist = getattr(trainer, "history", [])
        best_row = next((r for r in hist if r.get("epoch") == getattr(trainer, "best_epoch", None)), None)
        if best_row is not None:
            summary["val_acc_P"] = best_row.get("val_acc")
            if search:
                summary["val_acc_F"] = best_row.get("val_acc_F")
        data = getattr(trainer, "data", None)
        if search and summary.get("test_acc") is not None and data is not None:
            # the best checkpoint's weights (the Trainer loaded best.pt), every unit on
            summary["f_acc"] = self.evaluate_full(trainer, data.test, "recalibrated")[1]
            summary["f_acc_batch_stats"] = self.evaluate_full(trainer, data.test, "batch")[1]
            summary["f_bn_recal_batches"] = min(self.bn_recal_batches, len(data.train))
            summary["f_batch_stats_batch_size"] = getattr(data.test, "batch_size", None)
        if not self.export or data is None:
            return
        from cifarlab.edropout.export import evaluate_model, export_pruned, write_edropout_files

        pruned, info = export_pruned(trainer.model, self.masks.layers, state, self.example_input(trainer))
        summary["params_kept_pct"] = info["params_kept_pct"]
        summary["pruned_params"] = info["pruned_params"]
        summary["r_params"] = info["r_params"]
        summary["flops_kept"] = info["flops_kept"]
        if summary.get("test_acc") is not None:
            summary["test_acc_pruned"] = evaluate_model(pruned, data.test, trainer)
        if trainer.run_dir is not None:
            write_edropout_files(trainer.run_dir, self.masks.layers, state, info,
                                 kept_steps=self.kept_steps if search else None,
                                 search_steps=summary.get("search_steps"))

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.masks is None:
            return {}
        return {
            "units": self.masks.size, "mode": self.mode, "pop": self.pop, "costs": self.costs,
            "history": self.history, "best_cost": self.best_cost, "converged": self.converged,
            "frozen_state": self.frozen_state, "state": self.state, "frozen": self.frozen,
            "frozen_epoch": self.frozen_epoch, "best_epoch_state": self.best_epoch_state,
            "generator": self.gen.get_state(), "search_steps": self.search_steps,
            "state_changes": self.state_changes, "kept_steps": self.kept_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.masks is None:  # the Trainer restores before on_fit_start: apply at set-up
            self._pending = state
        else:
            self._apply_state(state)

    def _apply_state(self, st: dict[str, Any]) -> None:
        if st.get("units") != self.masks.size or st.get("mode") != self.mode:
            raise CheckpointError(f"EDropout state in the checkpoint ({st.get('units')} units, mode "
                                  f"{st.get('mode')}) does not fit this run ({self.masks.size} units, {self.mode})")
        dev = self.device

        def to(t):
            return None if t is None else t.to(dev)

        self.pop, self.costs = to(st["pop"]), to(st["costs"])
        self.history, self.best_cost = to(st["history"]), to(st["best_cost"])
        self.converged, self.frozen_state = to(st["converged"]), to(st["frozen_state"])
        self.state, self.best_epoch_state = to(st["state"]), to(st["best_epoch_state"])
        self.frozen, self.frozen_epoch = bool(st["frozen"]), st["frozen_epoch"]
        self.gen.set_state(st["generator"].cpu())
        if "kept_steps" in st:  # checkpoints from before the bookkeeping start it at zero
            self.search_steps, self.state_changes = to(st["search_steps"]), to(st["state_changes"])
            self.kept_steps = to(st["kept_steps"])


def callbacks_from_config(cfg) -> list[Callback]:
    return [EDropout.from_config(cfg)] if cfg.edropout else []
