"""Small shared helpers: atomic writes, seeding, device choice."""
from __future__ import annotations

import os
import random
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

# Fault injection for the kill-and-resume test: CIFARLAB_KILL_DURING_SAVE=N makes the Nth
# atomic torch save of this process SIGKILL itself halfway through writing its temp file.
_KILL_DURING_SAVE = int(os.environ.get("CIFARLAB_KILL_DURING_SAVE", "0"))
_saves = 0


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str | Path) -> None:
    import io

    global _saves
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    _saves += 1
    if _KILL_DURING_SAVE and _saves == _KILL_DURING_SAVE:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write_bytes(path, data)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, example_inputs: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward of ``example_inputs`` (FlopCounterMode: a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_inputs)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
