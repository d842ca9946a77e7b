"""Count host synchronisations: the operations that make the host wait for the device.

On a GPU every ``.item()``, ``bool(tensor)``, ``int(tensor)``, ``tensor.tolist()`` or copy of a
device tensor to the CPU blocks the Python thread until the queued kernels finish. On a CPU the
same calls cost nothing, which is why a CPU-only test suite never sees them; but they are the
same aten operations on both, so counting them under a TorchDispatchMode on CPU proves what a
step will do on a GPU.

    with count_host_syncs() as counter:
        train_step(...)
    assert counter.syncs == 0, counter.where
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read a device value on the host (scalar reads and non-blocking-less transfers)
_SCALAR_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}


class HostSyncCounter(TorchDispatchMode):
    """Counts scalar reads of tensors and copies from a non-CPU device to the CPU.

    ``device``: the device a real run would use; a copy *to the CPU* of a tensor that lives on
    that device counts as a sync. On a CPU-only machine pass ``device="cpu"`` and only scalar
    reads count (CPU->CPU copies are not syncs anywhere)."""

    def __init__(self, device: str | torch.device | None = None, keep_stacks: bool = True):
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.syncs = 0
        self.where: list[str] = []
        self.keep_stacks = keep_stacks

    def _record(self, name: str) -> None:
        self.syncs += 1
        if self.keep_stacks:
            frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.where.append(f"{name} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in _SCALAR_READS:
            self._record(name)
        elif name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst = (args[0].device if name == "copy_" else kwargs.get("device"))
            if (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None
                    and torch.device(dst).type == "cpu"):
                self._record(f"{name} {src.device}->cpu")
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs(device: str | torch.device | None = None, keep_stacks: bool = True):
    """Context manager yielding a HostSyncCounter; ``counter.syncs`` after the block."""
    counter = HostSyncCounter(device, keep_stacks)
    with counter:
        yield counter
