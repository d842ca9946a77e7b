"""DistributedDataParallel set-up under torchrun: NCCL on GPU, gloo on CPU; rank 0 writes.

Batch split: each of N ranks trains on cfg.batch_size // N images per step (data/bundle.py),
so the global batch, and with it the recipe's learning rate, stays the one configured.
BatchNorm then normalises over each rank's share; ``--sync-bn`` (cfg.sync_bn) converts the
model's BatchNorm layers to SyncBatchNorm so that they normalise over the global batch (CUDA
only: PyTorch's SyncBatchNorm does not run on the CPU).

The CUDA device is chosen before anything touches the GPU: each rank calls
``torch.cuda.set_device(LOCAL_RANK)`` and then joins the process group with ``device_id``, so
NCCL binds to that GPU at once (without it the first collective guesses, and barriers may
create a context on GPU 0). A single process given ``--device cuda:N`` sets device N current,
so ``torch.cuda.synchronize()`` and new tensors without a device use it, not GPU 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from cifarlab.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)  # before the process group: NCCL binds to this GPU
    if not dist.is_initialized():
        if use_cuda:
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def training_device(device_name: str, info: DistInfo) -> torch.device:
    """The device this process trains on: its local GPU under DDP, else ``device_name``
    (auto | cpu | cuda | cuda:N). A CUDA device is checked and made current, and cuDNN
    autotuning is switched on (every training batch has one shape, so the search pays once)."""
    if info.enabled and device_name != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank)
    elif device_name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device_name!r}: CUDA is not available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {device_name!r}: only {count} CUDA device(s) visible")
        if device.index is not None:
            torch.cuda.set_device(device.index)
        torch.backends.cudnn.benchmark = True
    return device


def maybe_sync_batchnorm(model: nn.Module, sync_bn: bool, info: DistInfo, device: torch.device) -> nn.Module:
    """SyncBatchNorm in place of BatchNorm when asked and running DDP; unchanged otherwise
    (one process already normalises over the whole batch). Parameters are the same objects
    and the state_dict keys do not change, so checkpoints load into the plain model."""
    if not (sync_bn and info.enabled):
        return model
    if device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, info: DistInfo, device) -> bool:
    """Rank 0's decision for everyone (e.g. 'this epoch is the new best')."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
