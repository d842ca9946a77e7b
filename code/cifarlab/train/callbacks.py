"""The callback interface of the one training loop.

Techniques (SLBI bookkeeping, variance-shift tracking, EDropout, BatchNorm probes) subclass
``Callback`` and override the hooks they need. The Trainer calls, in order, per run:

    on_fit_start(trainer)
    for each epoch:   on_epoch_start(trainer, epoch)
      for each batch: on_batch_start(trainer, x, y)
                      forward_loss(trainer, x, y)   # first callback returning non-None wins
                      on_after_backward(trainer)     # gradients present, before optimizer.step
                      on_batch_end(trainer, loss)    # loss is a 0-d tensor: do not .item() it
                      on_epoch_end(trainer, epoch, row)   # row: the metrics.csv dict, add columns
    on_fit_end(trainer, summary)                       # summary: the summary.json dict, add keys

``state_dict``/``load_state_dict`` are saved in every checkpoint so that a resumed run
continues the technique exactly. ``eval_context(trainer)`` may return a context manager in
which validation/test evaluation runs (e.g. evaluate the pruned network).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch


class Callback:
    """Base class: every hook is a no-op."""

    def on_fit_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer, epoch: int) -> None:
        pass

    def on_batch_start(self, trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def forward_loss(self, trainer, x: torch.Tensor, y: torch.Tensor):
        """Return (logits, loss) to replace the standard forward and loss, or None."""
        return None

    def on_after_backward(self, trainer) -> None:
        pass

    def on_batch_end(self, trainer, loss: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, trainer, epoch: int, row: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        pass

    def eval_context(self, trainer):
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
