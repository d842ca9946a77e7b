"""Checkpoints: atomic writes, safe loading (weights_only=True) and clear errors.

A checkpoint holds everything a bit-for-bit resume on CPU needs: model, optimizer, scheduler,
epoch, best-so-far, RNG states (torch, CUDA, NumPy, Python), callback states and the config.
NumPy's RNG state is stored as plain tensors/ints so that weights_only loading accepts it.

Resuming on a GPU: ``load_resume_state`` reads the file onto the CPU and lets ``load_state_dict``
move each tensor to its parameter's device. Mapping the whole file onto the GPU instead would
put the RNG states there (``torch.set_rng_state`` takes only a CPU ByteTensor) and turn
optimizer step counters that PyTorch keeps on the CPU into GPU tensors (a host read per step).
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.errors import CheckpointError
from cifarlab.utils import atomic_torch_save

FORMAT = "cifarlab-checkpoint-v1"


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _byte_state(t: torch.Tensor) -> torch.Tensor:
    # generator states are CPU ByteTensors whatever device the checkpoint was mapped to
    return t.detach().to("cpu", torch.uint8)


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_byte_state(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        # one state per GPU visible when saved: restore those that exist now (a run saved on
        # 4 GPUs resumes on 1; set_rng_state_all would raise on the missing ones)
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_byte_state(s), i)


def _python_state_to_plain(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _python_state_from_plain(st):
    version, internal, gauss = st
    return (version, tuple(internal), gauss)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    atomic_torch_save({"format": FORMAT, **payload}, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Load and check a cifarlab checkpoint; any problem is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or not readable ({first[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a cifarlab checkpoint")
    return ckpt


def load_resume_state(path: str | Path, model: torch.nn.Module, optimizer, scheduler=None,
                      model_name: str | None = None) -> dict[str, Any]:
    """Read a checkpoint onto the CPU and load model, optimizer and scheduler from it, wherever
    the model lives (CUDA, CPU, meta): model tensors are copied into the parameters, optimizer
    state follows each parameter's device (PyTorch's rule; step counters stay on the CPU). The
    returned dict's RNG states are CPU ByteTensors, ready for ``restore_rng``. ``model_name``:
    refuse a checkpoint made for another model with one clear line."""
    ckpt = load_checkpoint(path, map_location="cpu")
    saved = ckpt.get("config", {}).get("model")
    if model_name is not None and saved != model_name:
        raise CheckpointError(f"checkpoint {path} was made for model {saved!r}, not {model_name!r}")
    load_model_state(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({str(exc).splitlines()[0][:160]})") from None
