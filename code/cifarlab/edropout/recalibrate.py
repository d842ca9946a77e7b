"""BatchNorm statistics for a network other than the one they were gathered for.

EDropout trains with about half of the units masked, so the BatchNorm running statistics
describe the masked network. Switching every unit on (EDropout F) roughly doubles the next
layer's input variance; the mismatch compounds over the depth and the eval-mode network
predicts one class for every image (issue 12). Two ways to give F statistics that fit it:

  * ``recalibrate_bn``: reset the running statistics and forward up to ``max_batches``
    training batches in training mode without gradients, with ``momentum=None`` (BatchNorm's
    cumulative average), then evaluate in eval mode;
  * ``bn_batch_stats``: evaluate with each test batch's own statistics (what the released
    EDropout code did: it never calls ``model.eval()``; the result depends on the batch size).

Both change the BatchNorm layers, so they run inside ``bn_state_restored``, which puts back
every buffer (running mean, variance, batch counter), the momentum and the training flags
exactly, in place (the same tensors, bit for bit): a run that measures F continues as if it had
not. Random draws made while recalibrating (dropout layers in training mode) happen in a forked
RNG, so the run's random stream does not move either.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm) of ``model``."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextlib.contextmanager
def bn_state_restored(model: nn.Module):
    """On exit, every BatchNorm buffer, momentum and training flag is what it was on entry."""
    saved = []
    for bn in bn_layers(model):
        bufs = {name: b.detach().clone() for name, b in bn.named_buffers(recurse=False) if b is not None}
        saved.append((bn, bufs, bn.momentum, bn.training))
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, bufs, momentum, training in saved:
                for name, value in bufs.items():
                    getattr(bn, name).copy_(value)
                bn.momentum = momentum
                bn.training = training


@contextlib.contextmanager
def bn_batch_stats(model: nn.Module):
    """Inside: the BatchNorm layers normalise with each batch's own statistics (training mode),
    whatever mode the rest of the model is in; on exit their state is restored exactly.
    Enter it after ``model.eval()`` (Trainer.evaluate enters callbacks' contexts after it)."""
    with bn_state_restored(model):
        for bn in bn_layers(model):
            bn.train()
        yield


def _fork_rng(model: nn.Module):
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, max_batches: int = 100, autocast=None,
                   channels_last: bool = False, average_ranks: bool = True) -> int:
    """Running statistics = the cumulative average over the first ``max_batches`` of ``batches``
    ((x, y) pairs, e.g. the training loader), forwarded in training mode without gradients.

    Modifies the model's BatchNorm buffers: run it inside ``bn_state_restored`` to undo that.
    Under torch.distributed each rank averages its own shard, then the ranks' running means and
    variances are averaged (all ranks must call it). ``autocast``: a context factory, as the
    Trainer's. Returns the number of images this rank forwarded."""
    layers = bn_layers(model)
    if not layers:
        return 0
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    seen = 0
    try:
        with _fork_rng(model):
            for i, (x, _y) in enumerate(batches):
                if i >= max_batches:
                    break
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    model(x)
                seen += x.shape[0]
    finally:
        model.train(was_training)
    dist = torch.distributed
    if average_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for bn in layers:
            for buf in (bn.running_mean, bn.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf.div_(world)
    return seen
