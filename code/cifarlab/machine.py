"""What machine a figure came from: CPU model, the instruction sets that decide CPU speed, threads,
torch version, GPU. Benchmarks record it next to every figure, because the machines differ from
session to session (one AVX2-only, the next with AVX512-BF16, where bf16 autocast is 1.3-2x faster).
"""
from __future__ import annotations

import os
import platform
from typing import Any

import torch

from cifarlab.train.precision import cpu_has_native_bf16

# the CPU features that change which kernels oneDNN runs: fp32 vector width, and native bf16
FEATURES = (("avx2", "AVX2"), ("avx512", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx", "AMX"))


def _capabilities() -> dict[str, Any]:
    try:
        return dict(torch.cpu.get_capabilities())  # cpuinfo's CPUID answers (x86)
    except (AttributeError, RuntimeError):
        return {}


def _cpu_model(caps: dict[str, Any]) -> str:
    if caps.get("cpu_name"):
        return str(caps["cpu_name"])
    try:  # no PyTorch answer (not x86): the kernel's name for it
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine as a JSON-able dict (what `bench` records); machine_line() makes it one line."""
    device = torch.device(device)
    caps = _capabilities()
    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use (taskset, containers)
    except AttributeError:
        cores = os.cpu_count()
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {
        "cpu": _cpu_model(caps),
        "arch": platform.machine(),
        "cpu_features": {
            "avx2": bool(caps.get("avx2", False)),
            "avx512": bool(caps.get("avx512_f", False)),
            "avx512_bf16": bool(caps.get("avx512_bf16", False)),
            "amx": bool(caps.get("amx_tile", False) and caps.get("amx_bf16", False)),
        },
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # the vector ISA ATen dispatches to
        "native_bf16": cpu_has_native_bf16(),
        "logical_cpus": os.cpu_count(),
        "cores_available": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def machine_line(m: dict[str, Any]) -> str:
    """e.g. 'AMD EPYC (x86_64: AVX2, AVX-512, AVX512-BF16, no AMX), 2 threads on 2 of 2 CPUs, torch 2.14.1'."""
    if m["arch"] in ("x86_64", "AMD64", "i686", "i386"):
        arch = m["arch"] + ": " + ", ".join(label if m["cpu_features"].get(key) else f"no {label}"
                                            for key, label in FEATURES)
    else:  # these are x86 names; elsewhere say whether bf16 is native
        arch = m["arch"] + (": native bf16" if m.get("native_bf16") else "")
    threads = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    line = f"{m['cpu']} ({arch}), {threads} on {m['cores_available']} of {m['logical_cpus']} CPUs, torch {m['torch']}"
    if m.get("gpu"):
        line += f", GPU {m['gpu']}"
    return line


def hardware_label(device: torch.device | str = "cpu") -> str:
    """The short label a run's summary.json carries ("hardware") and the report prints beside its
    wall time: the GPU's name, or the CPU model, whether it computes bf16 natively, and the
    threads PyTorch trained with on how many usable cores.
    e.g. 'AMD EPYC (AVX512-BF16), 1 thread on 1 of 2 CPUs' or 'GPU NVIDIA H200'."""
    m = describe_machine(device)
    if m.get("gpu"):
        return f"GPU {m['gpu']}"
    feats = m["cpu_features"]
    isa = "AMX" if feats.get("amx") else "AVX512-BF16" if feats.get("avx512_bf16") else \
        "AVX-512" if feats.get("avx512") else "AVX2" if feats.get("avx2") else m["arch"]
    threads = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    return f"{m['cpu']} ({isa}), {threads} on {m['cores_available']} of {m['logical_cpus']} CPUs"
