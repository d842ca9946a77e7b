"""`--amp auto|bf16|off`: bf16 autocast where the CPU computes bf16 natively, and runs say what they used.

The CPU's capability is faked at its source, torch.cpu.get_capabilities() (cpuinfo's CPUID flags),
so the whole chain (capability -> choice -> Trainer -> log.txt/summary.json) is exercised both ways
on any machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifarlab.config import make_config
from cifarlab.train import Callback, Trainer
from cifarlab.train import precision as P

BF16_CPU = {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": False, "amx_tile": False}
AMX_CPU = {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}
# the same flags named by vendor: Zen 4 gains from bf16, an Intel Xeon without AMX trains faster in fp32
AMD_BF16_CPU = {**BF16_CPU, "cpu_name": "AMD EPYC"}
INTEL_BF16_CPU = {**BF16_CPU, "cpu_name": "Intel Xeon"}
INTEL_AMX_CPU = {**AMX_CPU, "cpu_name": "Intel(R) Xeon(R) Platinum 8480+"}
# AVX-512 without its BF16 extension (Skylake-X, Zen 3 has no AVX-512 at all): oneDNN would emulate bf16
PLAIN_CPU = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False, "amx_tile": False}


def fake_cpu(monkeypatch, caps):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps))


@pytest.mark.parametrize("caps, units", [(BF16_CPU, ["AVX512-BF16"]), (AMX_CPU, ["AVX512-BF16", "AMX-BF16"]),
                                         (PLAIN_CPU, []), ({}, []),
                                         ({"amx_bf16": True, "amx_tile": False}, [])])
def test_bf16_units_come_from_pytorchs_capabilities(monkeypatch, caps, units):
    fake_cpu(monkeypatch, caps)
    assert P.cpu_bf16_units() == units
    assert P.cpu_has_native_bf16() is bool(units)


def test_no_native_bf16_without_onednn_or_a_capability_api(monkeypatch):
    fake_cpu(monkeypatch, BF16_CPU)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not P.cpu_has_native_bf16()
    assert P.resolve_amp("auto", "cpu").amp == "off"
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: no API, so no guess
    assert P.cpu_bf16_units() == []


@pytest.mark.parametrize("amp, caps, expected", [
    ("auto", BF16_CPU, "bf16"), ("auto", AMX_CPU, "bf16"), ("auto", PLAIN_CPU, "off"),
    ("auto", AMD_BF16_CPU, "bf16"), ("auto", INTEL_BF16_CPU, "off"), ("auto", INTEL_AMX_CPU, "bf16"),
    ("off", BF16_CPU, "off"), ("off", PLAIN_CPU, "off"),
    ("bf16", BF16_CPU, "bf16"), ("bf16", PLAIN_CPU, "bf16"), ("bf16", INTEL_BF16_CPU, "bf16"),
])
def test_resolve_amp_on_cpu(monkeypatch, amp, caps, expected):
    fake_cpu(monkeypatch, caps)
    choice = P.resolve_amp(amp, torch.device("cpu"))
    assert choice.amp == expected
    assert f"--amp {amp}" in choice.reason
    if amp == "auto":
        assert ("CPU has AVX512-BF16" in choice.reason) == (expected == "bf16")
        assert ("AMX-BF16" in choice.reason) == caps.get("amx_bf16", False)
        assert ("without native bf16" in choice.reason) == (caps is PLAIN_CPU)
        assert ("Intel CPU with AVX512-BF16 but no AMX" in choice.reason) == (caps is INTEL_BF16_CPU)


@pytest.mark.parametrize("name, vendor", [("Intel Xeon", "intel"), ("Intel(R) Core(TM) i7", "intel"),
                                          ("AMD EPYC", "amd"), ("AMD Ryzen 9 7950X", "amd"),
                                          ("Apple M2", ""), (None, "")])
def test_cpu_vendor_from_the_cpu_name(monkeypatch, name, vendor):
    fake_cpu(monkeypatch, {} if name is None else {"cpu_name": name})
    assert P.cpu_vendor() == vendor


def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch):
    monkeypatch.setattr(P, "cuda_has_native_bf16", lambda device: True)
    assert P.resolve_amp("auto", "cuda:0").amp == "bf16"
    monkeypatch.setattr(P, "cuda_has_native_bf16", lambda device: False)  # e.g. a V100: emulated bf16
    assert P.resolve_amp("auto", "cuda:0").amp == "off"
    assert P.resolve_amp("bf16", "cuda:0").amp == "bf16"


def test_autocast_context_matches_the_choice():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with P.autocast(P.Precision("bf16", ""), "cpu"):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    with P.autocast(P.Precision("off", ""), "cpu"):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32


def test_this_machine_pytorch_agrees_with_the_kernels_cpu_flags():
    """The API answer is the CPU's: /proc/cpuinfo's avx512_bf16 / amx_bf16 flags say the same."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or torch.cpu.get_capabilities().get("architecture") not in ("x86_64", None):
        pytest.skip("needs Linux on x86_64")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    units = P.cpu_bf16_units()
    assert ("AVX512-BF16" in units) == ("avx512_bf16" in flags)
    assert ("AMX-BF16" in units) == ("amx_bf16" in flags and "amx_tile" in flags)
    intel_without_amx = units == ["AVX512-BF16"] and P.cpu_vendor() == "intel"
    assert P.resolve_amp("auto", "cpu").amp == ("bf16" if P.cpu_has_native_bf16() and not intel_without_amx
                                                else "off")


class ForwardDtype(Callback):
    """Records the dtype of the model's logits in training steps: what autocast really did."""

    def __init__(self):
        self.dtypes = set()

    def on_fit_start(self, trainer):
        trainer.model.register_forward_hook(
            lambda m, i, out: self.dtypes.add(out.dtype) if m.training else None)


@pytest.mark.parametrize("amp, cpu, expected", [
    ("auto", "bf16-cpu", "bf16"), ("auto", "plain-cpu", "off"),
    ("off", "bf16-cpu", "off"), ("off", "plain-cpu", "off"),
    ("bf16", "bf16-cpu", "bf16"), ("bf16", "plain-cpu", "bf16"),
])
def test_trainer_runs_and_records_the_precision(monkeypatch, tmp_path, amp, cpu, expected):
    fake_cpu(monkeypatch, BF16_CPU if cpu == "bf16-cpu" else PLAIN_CPU)
    probe = ForwardDtype()
    cfg = make_config(model="lenet5", dataset="synthetic", train_subset=128, test_subset=64, batch_size=64,
                      epochs=1, device="cpu", progress="off", amp=amp, run_dir=str(tmp_path / "run"))
    summary = Trainer(cfg, callbacks=[probe]).fit()
    assert probe.dtypes == {torch.bfloat16 if expected == "bf16" else torch.float32}
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["amp"] == summary["amp"] == expected
    assert on_disk["amp_reason"].startswith(f"--amp {amp}")
    header = (tmp_path / "run" / "log.txt").read_text().splitlines()[0]
    assert header.startswith("# lenet5 on synthetic")
    assert ("bf16 autocast" if expected == "bf16" else "fp32") in header
    assert f"--amp {amp}" in header


def test_default_config_is_auto():
    """The default is what make demo, the studies and the report's CPU runs get."""
    assert make_config().amp == "auto"
