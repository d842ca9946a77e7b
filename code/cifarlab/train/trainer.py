"""The one training loop. Techniques plug in through callbacks (train/callbacks.py).

Speed by construction: data already on the device (cifarlab.data), bf16 autocast where the GPU
or CPU computes bf16 natively (train/precision.py),
channels_last, freed CPU memory kept for reuse (train/cpu_heap.py), foreach/fused optimizer
steps, optional torch.compile, large-batch evaluation, and no host synchronisation inside an
epoch: losses and correct counts are summed on the device and read once per epoch.

Resume: every epoch ends by writing metrics.csv/log.txt (from the history), best.pt when the
validation accuracy improved, then last.pt — each atomically. last.pt holds the history, so a
run killed at any moment resumes from its last complete epoch with files matching it, and on
CPU ends with exactly the metrics of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any

import torch
import torch.nn as nn

from cifarlab.config import TrainConfig, save_yaml
from cifarlab.errors import CheckpointError, ConfigError, RunDirError
from cifarlab.machine import hardware_label
from cifarlab.optim import build_optimizer, build_scheduler
from cifarlab.train.build import model_from_config
from cifarlab.train.callbacks import Callback
from cifarlab.train.checkpoint import (capture_rng, load_checkpoint, load_model_state, load_resume_state, restore_rng,
                                      save_checkpoint)
from cifarlab.train.cpu_heap import keep_cpu_heap
from cifarlab.train.distributed import (all_reduce_sum, barrier, broadcast_flag, init_distributed, maybe_sync_batchnorm,
                                        shutdown, training_device)
from cifarlab.train.losses import build_loss
from cifarlab.train.plugins import callbacks_from_config
from cifarlab.train.precision import autocast, resolve_amp
from cifarlab.train.rundir import RunDirectory
from cifarlab.utils import count_params, forward_flops, seed_everything


def count_flops(model: nn.Module, in_channels: int, image_size, device) -> int:
    """FLOPs of one forward pass on one image; a model that cannot take the images is one error line."""
    try:
        return forward_flops(model, torch.zeros(1, in_channels, *image_size, device=device))
    except RuntimeError as exc:  # e.g. LeNet-5's 5x5 convs on 8x8 images: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the model cannot take {in_channels}x{'x'.join(map(str, image_size))} "
                          f"images ({first}); choose another model or --image-size") from None


def best_payload(payload: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """What best.pt keeps: everything but the optimizer and scheduler state, which only resuming
    needs (last.pt has it). Adam/Adadelta state would triple the file (resnet20: 3.3 MB instead of
    1.1 MB), and the runs report/ draws from keep best.pt in git under 2 MB. SLBI is the exception:
    its Gamma lives in the optimizer state and W*, the prune tables and fine-tuning need it."""
    if str(cfg.optimizer).startswith("slbi"):
        return payload
    return {**payload, "optimizer": None, "scheduler": None}


def train_step(trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch, as the Trainer takes it (the EDropout bench times this):
    the first callback whose forward_loss returns (logits, loss) supplies them (EDropout's
    search), else the model runs under autocast; then backward, the after-backward hooks and the
    optimizer step. Returns the detached (logits, loss); nothing is read back to the host."""
    out = None
    for cb in trainer.callbacks:
        out = cb.forward_loss(trainer, x, y)
        if out is not None:
            break
    if out is None:
        with trainer.autocast():
            logits = trainer.train_model(x)
            loss = trainer.loss_fn(logits, y)
    else:
        logits, loss = out
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for cb in trainer.callbacks:
        cb.on_after_backward(trainer)
    trainer.optimizer.step()
    trainer.global_step += 1
    return logits.detach(), loss.detach()


class Trainer:
    def __init__(self, cfg: TrainConfig, callbacks: list[Callback] | None = None, write: bool = True):
        self.cfg = cfg
        self.dist = init_distributed(cfg.device)
        # under DDP the local GPU; a CUDA device is made current (--device cuda:N), cuDNN autotunes
        self.device = training_device(cfg.device, self.dist)
        self.is_main = self.dist.is_main
        self.callbacks = list(callbacks or []) + callbacks_from_config(cfg)
        self.rundir = RunDirectory(cfg.resolved_run_dir()) if write else None
        self.run_dir = self.rundir.path if (self.rundir and self.is_main) else None
        # bf16 autocast where the GPU or CPU computes bf16 natively (train/precision.py)
        self.precision = resolve_amp(cfg.amp, self.device)
        self.use_bf16 = self.precision.amp == "bf16"
        # channels_last: on GPU the tensor-core layout; on CPU oneDNN's preferred one (resnet20
        # trains 1.25x faster, bench measurement), so "auto" means on everywhere
        self.channels_last = cfg.channels_last in ("on", "auto")
        if self.device.type == "cpu" and cfg.cpu_heap:
            keep_cpu_heap()  # no CPU caching allocator in PyTorch: stop glibc returning each step's pages
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best_val_acc = -1.0
        self.best_epoch = 0
        self.model: nn.Module | None = None

    # -- helpers callbacks use -----------------------------------------------------------------
    def autocast(self):
        return autocast(self.precision, self.device)

    def _cb(self, hook: str, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- set-up --------------------------------------------------------------------------------
    def _setup(self) -> bool:
        from cifarlab.data import build_loaders

        cfg = self.cfg
        resuming = False
        seed_everything(cfg.seed)
        # data first: a dataset that cannot be read stops the run before its directory is made
        self.data = build_loaders(cfg, self.device, rank=self.dist.rank, world_size=self.dist.world_size)
        info = self.data.info
        self.model = model_from_config(cfg, info.num_classes, info.in_channels).to(self.device)
        self.params = count_params(self.model)
        self.flops = count_flops(self.model, info.in_channels, info.image_size, self.device)  # fails if the images don't fit
        if self.rundir is not None:
            # every rank checks (read-only); only rank 0 creates folders
            resuming = self.rundir.prepare(cfg.resume) if self.is_main else self.rundir.last.is_file()
            barrier(self.dist)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model = maybe_sync_batchnorm(self.model, cfg.sync_bn, self.dist, self.device)  # --sync-bn under DDP
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.loss_fn = build_loss(cfg)
        self.start_epoch = 1
        self.wall_time_before = 0.0
        if resuming:
            self._load_last()
        if self.run_dir is not None:
            save_yaml(self.data.recorded_config(cfg), self.run_dir / "config.yaml")  # + measured normalisation
        self.train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        if cfg.compile:
            # at batch 128 a CIFAR step is launch-bound on a big GPU: CUDA graphs remove the launches
            mode = cfg.compile_mode
            if mode == "auto":
                mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.train_model = torch.compile(self.train_model, mode=mode)
        return resuming

    def _checkpoint_payload(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": epoch,
            "global_step": self.global_step,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "wall_time_s": self.wall_time_before + (time.time() - self.t_fit),
            "rng": capture_rng(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": self.cfg.to_dict(),
        }

    def _load_last(self) -> None:
        # read onto the CPU: RNG states must stay CPU ByteTensors (see train/checkpoint.py)
        ckpt = load_resume_state(self.rundir.last, self.model, self.optimizer, self.scheduler, self.cfg.model)
        self.start_epoch = ckpt["epoch"] + 1
        self.global_step = ckpt["global_step"]
        self.best_val_acc, self.best_epoch = ckpt["best_val_acc"], ckpt["best_epoch"]
        self.history = list(ckpt["history"])
        self.wall_time_before = ckpt["wall_time_s"]
        for cb, state in zip(self.callbacks, ckpt.get("callbacks", [])):
            cb.load_state_dict(state)
        self._resume_rng = ckpt["rng"]

    # -- the loop ------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int):
        loader = self.data.train
        self.train_model.train()
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        bar = self._progress(loader, epoch)
        for x, y in bar:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._cb("on_batch_start", x, y)
            logits, loss = train_step(self, x, y)
            loss_sum += loss.float() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
            self._cb("on_batch_end", loss)
        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=self.device)])
        loss_total, correct_total, n = all_reduce_sum(totals, self.dist).tolist()  # the epoch's one sync
        return loss_total / max(n, 1), correct_total / max(n, 1), int(n)

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, float]:
        """(mean loss, accuracy) over a loader, summed on the device and reduced across ranks."""
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, device=self.device)
        with contextlib.ExitStack() as stack:
            for cb in self.callbacks:
                stack.enter_context(cb.eval_context(self))
            for x, y in loader:
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self.autocast():
                    logits = model(x)
                    loss = self.loss_fn(logits, y)
                totals[0] += loss.float() * y.shape[0]
                totals[1] += (logits.argmax(1) == y).sum()
                totals[2] += y.shape[0]
        model.train(was_training)
        loss_sum, correct, n = all_reduce_sum(totals, self.dist).tolist()
        return loss_sum / max(n, 1), correct / max(n, 1)

    def _progress(self, loader, epoch):
        from cifarlab.train.live_plot import in_notebook

        show = self.cfg.progress == "on" or (self.cfg.progress == "auto" and (sys.stderr.isatty() or in_notebook()))
        if not (show and self.is_main):
            return loader
        from tqdm.auto import tqdm  # the ipywidgets bar in Jupyter, the text bar in a terminal

        return tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, total=len(loader))

    def _step_scheduler(self, val_acc, train_loss):
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # validation error drives the plateau schedule; without a validation split, training loss
            self.scheduler.step(1.0 - val_acc if val_acc is not None else train_loss)
        else:
            self.scheduler.step()

    def fit(self) -> dict[str, Any]:
        try:
            if self.rundir is not None and self.cfg.resume and not self.rundir.path.is_dir():
                raise RunDirError(f"--resume: no run to resume in {self.rundir.path}")
            # rank 0 holds the run directory's lock for the whole run: a second process gets
            # "DIR is in use by process N" before anything is read or written
            lock = self.rundir.lock() if (self.rundir is not None and self.is_main) else contextlib.nullcontext()
            with lock:
                return self._fit()
        finally:
            shutdown(self.dist)

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.t_fit = time.time()
        self._resume_rng = None
        self._setup()
        writer = self._tensorboard()
        self._cb("on_fit_start")
        if self._resume_rng is not None:  # after callbacks' set-up, so the stream continues exactly
            restore_rng(self._resume_rng)
        diverged = False
        header = [f"# {cfg.model} on {cfg.dataset}: {self.params:,} params, {self.flops / 1e6:.1f} MFLOPs, "
                  f"device {self.device}, world size {self.dist.world_size}, "
                  f"{'bf16 autocast' if self.use_bf16 else 'fp32'} ({self.precision.reason})"]
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            self.epoch = epoch
            self._cb("on_epoch_start", epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            t0 = time.time()
            train_loss, train_acc, n = self._train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.time() - t0
            if not math.isfinite(train_loss):
                diverged = True
                break
            val_loss = val_acc = None
            if self.data.val is not None:
                val_loss, val_acc = self.evaluate(self.data.val)
            row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "epoch_time_s": dt,
                   "images_per_s": n / dt if dt > 0 else 0.0}
            self._cb("on_epoch_end", epoch, row)
            self.history.append(row)
            improved = (val_acc if val_acc is not None else train_acc) > self.best_val_acc
            improved = broadcast_flag(improved, self.dist, self.device)
            if improved:
                self.best_val_acc = val_acc if val_acc is not None else train_acc
                self.best_epoch = epoch
            self._step_scheduler(val_acc, train_loss)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k, v, epoch)
            if self.run_dir is not None:
                self.rundir.write_metrics(self.history)
                self.rundir.write_log(header, self.history)
                payload = self._checkpoint_payload(epoch)
                if improved:
                    save_checkpoint(self.rundir.best, best_payload(payload, cfg))
                save_checkpoint(self.rundir.last, payload)
                if epoch == cfg.epochs or epoch % max(1, cfg.epochs // 20) == 0:
                    self._plot()
        summary = self._finish(diverged, header)
        if writer is not None:
            writer.close()
        return summary

    def _finish(self, diverged: bool, header: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        barrier(self.dist)  # rank 0 has written best.pt
        test_loss = test_acc = None
        if self.best_epoch > 0 and self.rundir is not None and self.rundir.best.is_file():
            best = load_checkpoint(self.rundir.best, map_location=self.device)
            load_model_state(self.model, best["model"], self.rundir.best)
            test_loss, test_acc = self.evaluate(self.data.test)
        elif self.best_epoch > 0:  # not writing: score the final weights
            test_loss, test_acc = self.evaluate(self.data.test)
        summary = {
            "model": cfg.model, "dataset": cfg.dataset, "params": self.params, "flops": self.flops,
            "epochs": cfg.epochs, "epochs_completed": len(self.history),
            "best_epoch": self.best_epoch, "best_val_acc": self.best_val_acc if self.best_epoch else None,
            "test_acc": test_acc, "test_loss": test_loss,
            "test_error": None if test_acc is None else 100.0 * (1.0 - test_acc),
            "wall_time_s": self.wall_time_before + (time.time() - self.t_fit),
            "diverged": diverged, "finished": True,
            "device": str(self.device), "hardware": hardware_label(self.device), "world_size": self.dist.world_size,
            "amp": self.precision.amp, "amp_reason": self.precision.reason,
            "train_images": self.data.train.num_samples * self.dist.world_size,
        }
        self._cb("on_fit_end", summary)
        if self.run_dir is not None:
            footer = []
            if diverged:
                footer.append(f"# diverged in epoch {len(self.history) + 1}: non-finite training loss")
            if test_acc is not None:
                footer.append(f"# test acc {100 * test_acc:.2f}% (best-validation checkpoint, epoch {self.best_epoch})")
            self.rundir.write_log(header, self.history, footer)
            self.rundir.write_summary(summary)
            self._plot()
        return summary

    def _plot(self) -> None:
        if not self.history:
            return
        from cifarlab.report.curves import plot_run_curves

        plot_run_curves(self.run_dir)

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.run_dir is not None):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
