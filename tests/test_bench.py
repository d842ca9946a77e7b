"""Benchmarks say where they ran, and compare the fp32 classic loop with cifarlab's defaults."""
from __future__ import annotations

import json

import pytest
import torch

from cifarlab import bench
from cifarlab.machine import describe_machine, machine_line

BF16_CPU = {"cpu_name": "Test CPU 9000", "avx2": True, "avx512_f": True, "avx512_bf16": True,
            "amx_tile": False, "amx_bf16": False}
AVX2_CPU = {"cpu_name": "Old CPU", "avx2": True, "avx512_f": False, "avx512_bf16": False,
            "amx_tile": False, "amx_bf16": False}


def fake_cpu(monkeypatch, caps):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps))


def test_machine_description_names_the_features_that_matter(monkeypatch):
    fake_cpu(monkeypatch, BF16_CPU)
    m = describe_machine("cpu")
    assert m["cpu"] == "Test CPU 9000"
    assert m["cpu_features"] == {"avx2": True, "avx512": True, "avx512_bf16": True, "amx": False}
    assert m["native_bf16"] is True and m["gpu"] is None
    assert m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    json.dumps(m)  # recorded as JSON
    line = machine_line({**m, "arch": "x86_64"})
    assert line.startswith("Test CPU 9000 (x86_64: AVX2, AVX-512, AVX512-BF16, no AMX), ")
    assert f"torch {torch.__version__}" in line and "GPU" not in line

    fake_cpu(monkeypatch, {**AVX2_CPU})
    m = describe_machine("cpu")
    assert m["native_bf16"] is False
    assert "(x86_64: AVX2, no AVX-512, no AVX512-BF16, no AMX)" in machine_line({**m, "arch": "x86_64"})
    fake_cpu(monkeypatch, {**BF16_CPU, "amx_tile": True, "amx_bf16": True})
    assert describe_machine("cpu")["cpu_features"]["amx"] is True


def test_machine_line_names_the_gpu_and_the_threads():
    m = {"cpu": "C", "arch": "x86_64", "threads": 1, "cores_available": 1, "logical_cpus": 2, "torch": "2.x",
         "cpu_features": {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False},
         "gpu": "NVIDIA H200"}
    assert machine_line(m) == ("C (x86_64: AVX2, no AVX-512, no AVX512-BF16, no AMX), 1 thread on 1 of 2 CPUs, "
                               "torch 2.x, GPU NVIDIA H200")


def test_hardware_label_is_the_gpu_or_the_cpu_with_its_fastest_relevant_isa(monkeypatch):
    import cifarlab.machine as M

    base = {"cpu": "C", "arch": "x86_64", "threads": 1, "cores_available": 1, "logical_cpus": 2, "torch": "2.x",
            "cpu_features": {"avx2": True, "avx512": True, "avx512_bf16": True, "amx": False}, "gpu": None}
    monkeypatch.setattr(M, "describe_machine", lambda device="cpu": base)
    assert M.hardware_label("cpu") == "C (AVX512-BF16), 1 thread on 1 of 2 CPUs"
    base.update(threads=2, cpu_features={"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False})
    assert M.hardware_label("cpu") == "C (AVX2), 2 threads on 1 of 2 CPUs"
    base.update(gpu="NVIDIA H200")
    assert M.hardware_label("cpu") == "GPU NVIDIA H200"


def test_bench_optimizer_prints_and_records_the_machine(monkeypatch, tmp_path, capsys):
    fake_cpu(monkeypatch, BF16_CPU)
    r = bench.bench_optimizer("lenet5", "cpu", repeats=1, optimizers=["sgd"], out_dir=tmp_path)
    saved = json.loads(next(tmp_path.glob("optimizer-lenet5-cpu-*.json")).read_text())
    assert saved["machine_info"]["cpu"] == "Test CPU 9000" and saved["machine_info"]["cpu_features"]["avx512_bf16"]
    assert saved["machine"] == r["machine"] and "AVX512-BF16" in saved["machine"]
    assert bench.format_optimizer(r).splitlines()[0] == f"machine: {r['machine']}"


@pytest.mark.parametrize("caps, ours", [(BF16_CPU, torch.bfloat16), (AVX2_CPU, torch.float32)])
def test_bench_throughput_classic_stays_fp32_cifarlab_follows_auto(monkeypatch, tmp_path, caps, ours):
    """(a) trains in fp32 whatever the CPU offers; (b) with the Trainer's defaults, so bf16 exactly
    where the CPU has native bf16. The dtypes are those the models' training forwards produced."""
    import cifarlab.models
    import cifarlab.train.build

    fake_cpu(monkeypatch, caps)
    seen: list[set] = []
    real_build = cifarlab.models.build_model

    def build_and_watch(*a, **kw):
        model, dtypes = real_build(*a, **kw), set()
        seen.append(dtypes)
        model.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype) if m.training else None)
        return model

    monkeypatch.setattr(cifarlab.models, "build_model", build_and_watch)
    monkeypatch.setattr(cifarlab.train.build, "build_model", build_and_watch)
    r = bench.bench_throughput("lenet5", "cpu", batch_size=16, steps=1, repeats=1, out_dir=tmp_path)
    assert seen == [{torch.float32}, {ours}]  # classic first, then the Trainer's
    assert r["classic"]["amp"] == "off" and r["cifarlab"]["amp"] == ("bf16" if ours == torch.bfloat16 else "off")
    saved = json.loads(next(tmp_path.glob("throughput-lenet5-cpu-*.json")).read_text())
    assert saved["machine_info"]["cpu"] == caps["cpu_name"]
    assert saved["cifarlab"]["amp_reason"].startswith("--amp auto: CPU ")
    text = bench.format_throughput(r)
    assert text.splitlines()[0] == f"machine: {r['machine']}"
    assert f"cifarlab precision: {'bf16' if ours == torch.bfloat16 else 'fp32'} (--amp auto" in text
