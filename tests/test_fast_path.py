"""The fast path computes the same function: one training step against fp32 eager NCHW.

Gradients are compared as relative norm errors: at initialisation BatchNorm's backward
subtracts nearly equal means, which amplifies rounding in the early layers' gradients (measured
on resnet20, batch 32: fp32 channels_last worst tensor 0.9%, all gradients 0.45%). Tolerances:
fp32 paths (channels_last, torch.compile) worst tensor < 3%, all < 1%, cosine > 0.9999, loss rel
1e-4/1e-3. A broken layout or dtype path gives cosines near 0.

CPU bf16 autocast (what `--amp auto` picks on CPUs with AVX512-BF16 or AMX) against fp32 NCHW,
one SGD step of resnet20 at batch 32, seeds 0-4, measured on an AMD EPYC with AVX512-BF16
(oneDNN's native bf16 path), 2026-12-03: loss rel 1.5e-4 .. 7.2e-4, all gradients 22.3% .. 25.4%
(worst tensor 50-80%, the first layers), cosine 0.968 .. 0.975; the SGD step's weight updates
the same 22.3% .. 25.4% and 0.968 .. 0.975 (an earlier session's AVX2 machine, bf16 emulated:
gradients 23%, cosine 0.972). Tolerances with margin: loss rel 3e-3, all gradients and all
updates < 35%, cosine > 0.95.
"""
from __future__ import annotations

import pytest
import torch

from cifarlab.config import make_config
from cifarlab.train import Trainer
from cifarlab.train.trainer import train_step


def one_step(tmp_path, updates=None, **fast):
    """One training step as the Trainer takes it: (loss, gradients, batch); the optimizer step's
    change to each weight goes into `updates` when a dict is given."""
    cfg = make_config(model="resnet20", dataset="synthetic", train_subset=64, test_subset=64, batch_size=32,
                      device="cpu", progress="off", epochs=1, val_fraction=0.0, augment=False,
                      run_dir=str(tmp_path / "unused"), **fast)
    trainer = Trainer(cfg, write=False)
    trainer._setup()
    trainer.data.train.set_epoch(1)
    x, y = next(iter(trainer.data.train))
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    trainer.model.train()
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    _, loss = train_step(trainer, x, y)
    grads = {n: p.grad.detach().float().clone() for n, p in trainer.model.named_parameters()}
    if updates is not None:
        updates.update({n: p.detach().float() - before[n] for n, p in trainer.model.named_parameters()})
    return loss.float(), grads, x


def compare(grads, ref):
    """(worst per-tensor relative error, global relative error, global cosine) of two gradient sets."""
    names = [n for n in ref if ref[n].norm() > 1e-8]
    worst = max(((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in names)
    a = torch.cat([grads[n].flatten() for n in names])
    b = torch.cat([ref[n].flatten() for n in names])
    return worst, ((a - b).norm() / b.norm()).item(), torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_channels_last_fp32_matches_eager(tmp_path):
    ref_loss, ref_grads, _ = one_step(tmp_path, channels_last="off", amp="off")
    loss, grads, x = one_step(tmp_path, channels_last="on", amp="off")
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    worst, total, cos = compare(grads, ref_grads)
    assert worst < 3e-2 and total < 1e-2 and cos > 0.9999, (worst, total, cos)


@pytest.mark.parametrize("seed", [0, 3])  # 3: the largest gradient error of seeds 0-4
def test_cpu_bf16_autocast_matches_fp32_within_measured_tolerance(tmp_path, seed):
    ref_upd, upd = {}, {}
    ref_loss, ref_grads, _ = one_step(tmp_path, ref_upd, channels_last="off", amp="off", seed=seed)
    loss, grads, _ = one_step(tmp_path, upd, channels_last="on", amp="bf16", seed=seed)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=3e-3)
    worst, total, cos = compare(grads, ref_grads)
    assert total < 0.35 and cos > 0.95, (worst, total, cos)
    worst, total, cos = compare(upd, ref_upd)
    assert total < 0.35 and cos > 0.95, (worst, total, cos)


def test_bf16_autocast_really_runs_in_bf16(tmp_path):
    cfg = make_config(model="resnet20", dataset="synthetic", amp="bf16", device="cpu")
    trainer = Trainer(cfg, write=False)
    with trainer.autocast():
        out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert out.dtype == torch.bfloat16


def test_compiled_step_matches_eager(tmp_path):
    ref_loss, ref_grads, _ = one_step(tmp_path, channels_last="off", amp="off")
    loss, grads, _ = one_step(tmp_path, channels_last="off", amp="off", compile=True, compile_mode="default")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    worst, total, cos = compare(grads, ref_grads)
    assert worst < 3e-2 and total < 1e-2 and cos > 0.9999, (worst, total, cos)


# -- the CPU heap: glibc keeps freed memory (train/cpu_heap.py) -----------------------------------------------
def test_keep_cpu_heap_sets_the_three_glibc_thresholds_once(monkeypatch):
    from cifarlab.train import cpu_heap

    calls = []
    monkeypatch.setattr(cpu_heap, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setitem(cpu_heap._state, "tuned", False)
    assert cpu_heap.keep_cpu_heap() is True
    # M_MMAP_THRESHOLD (-3) at glibc's 32 MiB maximum, M_TRIM_THRESHOLD (-1) 2 GiB, M_TOP_PAD (-2) 256 MiB
    assert sorted(calls) == [(-3, 32 * 2**20), (-2, 256 * 2**20), (-1, 2**31 - 1)]
    assert cpu_heap.keep_cpu_heap() is True and len(calls) == 3  # idempotent
    monkeypatch.setitem(cpu_heap._state, "tuned", False)
    monkeypatch.setattr(cpu_heap, "_mallopt", lambda: lambda param, value: 0)  # glibc refused a value
    assert cpu_heap.keep_cpu_heap() is False and not cpu_heap.heap_tuned()


def test_glibc_accepts_the_settings():
    """This project's machines run glibc: mallopt is found and takes every value (returns 1)."""
    from cifarlab.train import cpu_heap

    fn = cpu_heap._mallopt()
    assert fn is not None
    assert all(fn(p, v) == 1 for p, v in cpu_heap.TUNED.items())


@pytest.mark.parametrize("flag, expected", [(True, 1), (False, 0)])
def test_trainer_tunes_the_heap_on_cpu_unless_turned_off(monkeypatch, tmp_path, flag, expected):
    import cifarlab.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "keep_cpu_heap", lambda: calls.append(1) or True)
    cfg = make_config(model="lenet5", dataset="synthetic", device="cpu", cpu_heap=flag, progress="off",
                      run_dir=str(tmp_path / "r"))
    Trainer(cfg, write=False)
    assert len(calls) == expected


def test_throughput_table_flags_a_classic_loop_that_ran_on_a_tuned_heap():
    from cifarlab.bench import format_throughput

    side = {"train_images_per_s": 10.0, "eval_images_per_s": 20.0, "peak_memory_mb": None, "ms_per_image": 1.0}
    r = {"model": "m", "device": "cpu", "machine": "a CPU", "dataset": "synthetic", "batch_size": 2, "steps": 1, "repeats": 1,
         "classic": {**side, "cpu_heap_tuned": False}, "cifarlab": {**side, "cpu_heap_tuned": True}, "ratio": 1.5}
    assert "note:" not in format_throughput(r)
    r["classic"]["cpu_heap_tuned"] = True
    lines = format_throughput(r).splitlines()
    assert lines[-2].startswith("note: the classic loop ran on a heap") and lines[-1].endswith("1.50x")
