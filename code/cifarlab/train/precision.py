"""Which precision a run trains in: the one place where `--amp auto|bf16|off` is decided.

auto means bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere:
- CUDA GPUs with bf16 tensor cores (Ampere and later; torch.cuda.is_bf16_supported without emulation);
- CPUs with AMX-BF16, or with AVX512-BF16 unless they are Intel CPUs without AMX, as PyTorch's
  cpuinfo reports them (torch.cpu.get_capabilities()), with oneDNN available to use them. There
  bf16 convolutions and matmuls run on the bf16 dot-product units (resnet20 1.35x, vgg_a_bn 2.07x
  per training step on an AMD EPYC (Zen 4) with AVX512-BF16, issue 17). An Intel Xeon with
  AVX512-BF16 but no AMX (family 6 model 207 under KVM, session 8) trains faster in fp32: resnet20
  455 vs 349 img/s, the dropout study's pre-activation ResNet 271 vs 254 (one thread, real trainer;
  bench/RESULTS.md). A likely reason, not measured: Zen 4 runs 512-bit fp32 FMAs at half rate,
  which its bf16 dot products escape, while this Xeon's full-rate fp32 leaves bf16 only the cost
  of its conversions.
  Elsewhere (AVX2, or AVX-512 without BF16) bf16 is emulated with conversions, so fp32 stays.
`off` forces fp32, `bf16` forces bf16 autocast wherever it runs.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch


class Precision(NamedTuple):
    amp: str  # "bf16" | "off": what the run uses
    reason: str  # why, for log.txt and summary.json


def cpu_bf16_units() -> list[str]:
    """The native bf16 units PyTorch reports on this CPU: a subset of ["AVX512-BF16", "AMX-BF16"]."""
    try:
        caps = torch.cpu.get_capabilities()  # cpuinfo's CPUID flags (x86); {} or missing elsewhere
    except (AttributeError, RuntimeError):
        return []
    units = []
    if caps.get("avx512_bf16", False):
        units.append("AVX512-BF16")
    if caps.get("amx_bf16", False) and caps.get("amx_tile", False):
        units.append("AMX-BF16")
    return units


def cpu_vendor() -> str:
    """"intel", "amd" or "" (unknown), from the CPU's name in PyTorch's cpuinfo answer."""
    try:
        name = str(torch.cpu.get_capabilities().get("cpu_name", "")).lower()
    except (AttributeError, RuntimeError):
        return ""
    return "intel" if name.startswith("intel") else "amd" if name.startswith("amd") else ""


def cpu_has_native_bf16() -> bool:
    """True where oneDNN computes bf16 on the CPU's own bf16 units (AVX512-BF16 or AMX)."""
    return bool(cpu_bf16_units()) and torch.backends.mkldnn.is_available()


def cuda_has_native_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_amp(amp: str, device: torch.device | str) -> Precision:
    """The precision for `amp` ("auto" | "bf16" | "off") on `device`, with the reason."""
    device = torch.device(device)
    if amp == "off":
        return Precision("off", "--amp off")
    if amp == "bf16":
        return Precision("bf16", "--amp bf16")
    if amp != "auto":
        raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")  # config validation catches users first
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return Precision("bf16", "--amp auto: GPU has bf16 tensor cores")
        return Precision("off", "--amp auto: GPU without native bf16")
    if device.type == "cpu":
        if cpu_has_native_bf16():
            units = cpu_bf16_units()
            if units == ["AVX512-BF16"] and cpu_vendor() == "intel":
                return Precision("off", "--amp auto: Intel CPU with AVX512-BF16 but no AMX, where fp32 "
                                        "trains faster (resnet20 1.30x)")
            return Precision("bf16", f"--amp auto: CPU has {' and '.join(units)}")
        return Precision("off", "--amp auto: CPU without native bf16 (no AVX512-BF16 or AMX)")
    return Precision("off", f"--amp auto: no bf16 autocast on {device.type}")


def autocast(precision: Precision | str, device: torch.device | str):
    """The context a forward pass runs under for a resolved precision."""
    amp = precision.amp if isinstance(precision, Precision) else precision
    if amp == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
