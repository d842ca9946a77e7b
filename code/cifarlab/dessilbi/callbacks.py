"""DessiLBI callbacks for the one training loop.

- ``SLBIPath`` (added by the plugin list whenever cfg.optimizer is slbi/slbi_adam): each epoch
  it updates the first-activation record (the prune order's epochs), appends the
  regularisation path (Gamma's support per layer) and evaluates validation accuracy with W*
  swapped in, next to the dense one. Files: ``slbi_path.csv`` (epoch, layer, kind, total,
  selected, ratio, units, units_selected, support, numel) and ``slbi_first_epoch.pt``;
  metrics.csv columns ``val_loss_wstar, val_acc_wstar, slbi_filters, slbi_filter_ratio,
  slbi_weight_ratio``.
- ``SLBIExperiment`` (added by ``python -m cifarlab slbi``): at the end of the run, on the
  best-validation checkpoint, the kernel picture, the percentile prune table and physical
  pruning (files ``kernels_<layer>.npy``, ``prune_table.csv``, ``physical_prune.json``).
- ``MaskedFinetune``: start from a finished SLBI run's best weights restricted to W* and keep
  the pruned weights at zero while training on (fine-tuning with the mask).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from cifarlab.dessilbi import toolbox as tb
from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.train.callbacks import Callback
from cifarlab.utils import atomic_torch_save, atomic_write_bytes, atomic_write_text

PATH_FILE = "slbi_path.csv"
FIRST_EPOCH_FILE = "slbi_first_epoch.pt"


def callbacks_from_config(cfg) -> list:
    return [SLBIPath()] if str(cfg.optimizer).startswith("slbi") else []


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


class SLBIPath(Callback):
    def __init__(self, eval_w_star: bool = True):
        self.eval_w_star = eval_w_star
        self.first: dict[str, torch.Tensor] = {}
        self.path: list[dict[str, Any]] = []

    def on_fit_start(self, trainer) -> None:
        if not tb.sparse_layers(trainer.model, trainer.optimizer):
            raise ConfigError("SLBIPath needs an SLBI optimizer with sparse layers")
        if not self.first:
            self.first = tb.new_first_epoch_record(trainer.model, trainer.optimizer)
        else:  # resumed: the record came from the checkpoint (on the CPU)
            self.first = {k: v.to(trainer.device) for k, v in self.first.items()}

    def on_epoch_end(self, trainer, epoch: int, row: dict[str, Any]) -> None:
        model, opt = trainer.model, trainer.optimizer
        tb.update_first_epoch(self.first, model, opt, epoch)
        sel = tb.selection(model, opt)  # one small host read per layer, once per epoch
        self.path.extend({"epoch": epoch, **r} for r in sel)
        conv = [r for r in sel if r["kind"] == "conv"]
        row["slbi_filters"] = sum(r["selected"] for r in conv)
        row["slbi_filter_ratio"] = row["slbi_filters"] / max(1, sum(r["total"] for r in conv))
        row["slbi_weight_ratio"] = sum(r["support"] for r in sel) / max(1, sum(r["numel"] for r in sel))
        row["val_loss_wstar"] = row["val_acc_wstar"] = None
        if self.eval_w_star and getattr(trainer, "data", None) is not None and trainer.data.val is not None:
            with tb.use_w_star(model, opt):
                row["val_loss_wstar"], row["val_acc_wstar"] = trainer.evaluate(trainer.data.val)
        if trainer.run_dir is not None:
            _write_csv(trainer.run_dir / PATH_FILE, self.path)
            atomic_torch_save({k: v.cpu() for k, v in self.first.items()}, trainer.run_dir / FIRST_EPOCH_FILE)
        self._last_row = row

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        last = [r for r in self.path if r["epoch"] == max((p["epoch"] for p in self.path), default=0)]
        conv = [r for r in last if r["kind"] == "conv"]
        summary["slbi_selected_filters"] = sum(r["selected"] for r in conv)
        summary["slbi_total_filters"] = sum(r["total"] for r in conv)
        row = getattr(self, "_last_row", None) or (trainer.history[-1] if trainer.history else {})
        summary["val_acc_wstar"] = row.get("val_acc_wstar")

    def state_dict(self) -> dict[str, Any]:
        return {"first": {k: v.cpu() for k, v in self.first.items()}, "path": list(self.path)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first = dict(state.get("first", {}))
        self.path = list(state.get("path", []))


@torch.no_grad()
def accuracy(model: nn.Module, loader, trainer=None) -> float:
    """Top-1 accuracy of ``model`` over a loader (one host read at the end). Under DDP each
    rank holds a share of the loader: with a trainer the counts are summed across ranks."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    n = 0
    ctx = trainer.autocast if trainer is not None else None
    for x, y in loader:
        if ctx is not None:
            with ctx():
                logits = model(x)
        else:
            logits = model(x)
        correct = correct.to(y.device) + (logits.argmax(1) == y).sum()
        n += y.shape[0]
    model.train(was)
    dist = getattr(trainer, "dist", None)
    if dist is not None and dist.enabled:
        from cifarlab.train.distributed import all_reduce_sum

        totals = torch.stack([correct.double(), torch.tensor(float(n), dtype=torch.float64, device=correct.device)])
        c, total = all_reduce_sum(totals, dist).tolist()
        return c / max(1.0, total)
    return correct.item() / max(1, n)


class SLBIExperiment(Callback):
    """End-of-run DessiLBI analysis on the best-validation checkpoint (see the module docstring)."""

    def __init__(self, prune_sets: list[list[str]] | None = None,
                 percents=(5, 10, 20, 40, 60, 80), picture_layer: str | None = "conv3",
                 physical_percent: float = 80.0, speed_batch: int = 256):
        self.prune_sets = prune_sets or []
        self.percents = [float(p) for p in percents]
        self.picture_layer = picture_layer
        self.physical_percent = physical_percent
        self.speed_batch = speed_batch

    def _best_state(self, trainer):
        """Optimizer state and first-activation record of the best checkpoint (model weights the
        Trainer already loaded); the live state when nothing was written."""
        path_cb = next((cb for cb in trainer.callbacks if isinstance(cb, SLBIPath)), None)
        first = path_cb.first if path_cb is not None else None
        # every rank reads best.pt (trainer.run_dir is set on rank 0 only), so all analyse the same W*
        rundir = getattr(trainer, "rundir", None)
        best = None if rundir is None else rundir.best
        if best is not None and best.is_file():
            from cifarlab.train.checkpoint import load_checkpoint

            ckpt = load_checkpoint(best, map_location="cpu")  # state follows each parameter's device
            if ckpt.get("optimizer") is not None:  # a dense run's best.pt has no optimizer state (only SLBI's Gamma matters)
                trainer.optimizer.load_state_dict(ckpt["optimizer"])
            if path_cb is not None:
                state = ckpt.get("callbacks", [])[trainer.callbacks.index(path_cb)]
                first = {k: v.to(trainer.device) for k, v in state.get("first", {}).items()}
        return first

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        if getattr(trainer, "data", None) is None or summary.get("test_acc") is None:
            return
        model, opt = trainer.model, trainer.optimizer
        first = self._best_state(trainer)
        is_slbi = bool(tb.sparse_layers(model, opt))
        out_dir = trainer.run_dir
        test = trainer.data.test
        base_acc = accuracy(model, test, trainer)
        summary["slbi_analysis_test_acc"] = base_acc
        modules = dict(model.named_modules())
        # 1. the kernel picture (|W| and, with SLBI, |W*|)
        if self.picture_layer in modules and isinstance(modules[self.picture_layer], nn.Conv2d) and out_dir:
            w = modules[self.picture_layer].weight
            tiles = {"w": tb.kernel_tile(w)}
            if is_slbi and w in opt.state:
                tiles["w_star"] = tb.kernel_tile(tb.w_star(w, opt.state[w]["gamma"]))
            for k, v in tiles.items():
                buf = io.BytesIO()
                np.save(buf, v)
                atomic_write_bytes(out_dir / f"kernels_{self.picture_layer}_{k}.npy", buf.getvalue())
        # 2. the percentile prune table on the test set
        rows = [{"layers": "none", "percent": 0.0, "test_acc": base_acc}]
        if is_slbi:
            with tb.use_w_star(model, opt):
                summary["test_acc_wstar"] = accuracy(model, test, trainer)
            rows.append({"layers": "w_star", "percent": float("nan"), "test_acc": summary["test_acc_wstar"]})
        for layers in self.prune_sets:
            for p in self.percents:
                with tb.prune_layers(model, layers, p, first):
                    acc = accuracy(model, test, trainer)
                rows.append({"layers": "+".join(layers), "percent": p, "test_acc": acc})
                summary[f"prune_{'+'.join(layers)}_{p:g}_test_acc"] = acc
        if out_dir:
            _write_csv(out_dir / "prune_table.csv", rows)
        # 3. physical pruning: the percentile-pruned first set, and W*'s selected filters
        exports = []
        x = next(iter(test))[0][: self.speed_batch]
        if self.prune_sets:
            layers = self.prune_sets[0]
            with tb.prune_layers(model, layers, self.physical_percent, first) as h:
                keep = {n: (k if k.dim() == 1 else k.any(dim=1)) for n, k in h.keep.items()}
                exports.append(self._export(f"{'+'.join(layers)}@{self.physical_percent:g}%", model, keep, x, test, trainer))
        if is_slbi:
            keep = {n: tb.filter_support(opt.state[m.weight]["gamma"])
                    for n, m in tb.sparse_layers(model, opt).items() if m is not _output_layer(model)}
            with tb.use_w_star(model, opt):
                exports.append(self._export("w_star", model, keep, x, test, trainer))
        if exports:
            summary["physical_prune"] = {e["name"]: {k: e[k] for k in ("params_after", "flops_after", "speedup",
                                                                      "masked_test_acc", "pruned_test_acc")}
                                         for e in exports}
            if out_dir:
                atomic_write_text(out_dir / "physical_prune.json", json.dumps(exports, indent=2))

    def _export(self, name, model, keep, x, test, trainer) -> dict:
        from cifarlab.dessilbi.physical_prune import compare_models, export_pruned

        masked, pruned, plan = export_pruned(model, keep, x[:2])
        info = compare_models(masked, pruned, x)
        info.update(name=name, plan={p.layer: len(p.idxs) for p in plan},
                    masked_test_acc=accuracy(masked, test, trainer), pruned_test_acc=accuracy(pruned, test, trainer))
        return info


def _output_layer(model: nn.Module):
    """The last conv/linear module: its output units are the classes and are never removed."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            last = m
    return last


class MaskedFinetune(Callback):
    """Fine-tune a finished SLBI run's best weights restricted to W*: load them at the start (not
    on resume), and zero the pruned weights again after every optimizer step."""

    def __init__(self, source_run: str | Path):
        self.source = Path(source_run)
        self.masks: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer) -> None:
        if not self.masks:
            self.masks = self._load_source(trainer)
        self._pairs = []
        modules = dict(trainer.model.named_modules())
        for name, mask in self.masks.items():
            w = modules[name].weight
            self._pairs.append((w, mask.to(device=w.device, dtype=w.dtype)))
        self._apply()

    def _load_source(self, trainer) -> dict[str, torch.Tensor]:
        from cifarlab.config import make_config
        from cifarlab.optim import build_optimizer
        from cifarlab.train.checkpoint import load_checkpoint, load_model_state

        best = self.source / "checkpoints" / "best.pt"
        if not best.is_file():
            raise CheckpointError(f"fine-tuning needs a finished SLBI run: {best} not found")
        ckpt = load_checkpoint(best, map_location=trainer.device)
        src_cfg = ckpt["config"]
        if src_cfg.get("model") != trainer.cfg.model:
            raise ConfigError(f"source run {self.source} trained {src_cfg.get('model')!r}, not {trainer.cfg.model!r}")
        if not str(src_cfg.get("optimizer", "")).startswith("slbi"):
            raise ConfigError(f"source run {self.source} used {src_cfg.get('optimizer')!r}, not SLBI")
        load_model_state(trainer.model, ckpt["model"], best)
        src_opt = build_optimizer(make_config(src_cfg), trainer.model)
        src_opt.load_state_dict(ckpt["optimizer"])
        return {n: (src_opt.state[m.weight]["gamma"] != 0).cpu()
                for n, m in tb.sparse_layers(trainer.model, src_opt).items()}

    @torch.no_grad()
    def _apply(self) -> None:
        for w, mask in self._pairs:
            w.mul_(mask)

    def on_batch_end(self, trainer, loss) -> None:
        self._apply()

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        total = sum(m.numel() for m in self.masks.values())
        summary["finetune_source"] = str(self.source)
        summary["finetune_kept_weight_ratio"] = sum(int(m.sum()) for m in self.masks.values()) / max(1, total)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state.get("masks", {}))
