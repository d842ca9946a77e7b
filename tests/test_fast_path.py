"""The fast path computes the same function: one training step against fp32 eager NCHW.

Tolerances: channels_last in fp32 reorders reductions only (rel 1e-4); bf16 autocast keeps
8 bits of mantissa, so the loss agrees to 2% and each gradient tensor points the same way
(cosine > 0.99) with a norm within 5%; torch.compile (inductor) fuses kernels in fp32 (rel 1e-3).
"""
from __future__ import annotations

import pytest
import torch

from cifarlab.config import make_config
from cifarlab.train import Trainer


def one_step(tmp_path, **fast):
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
    with trainer.autocast():
        loss = trainer.loss_fn(trainer.train_model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in trainer.model.named_parameters()}
    return loss.detach().float(), grads, x


def test_channels_last_fp32_matches_eager(tmp_path):
    ref_loss, ref_grads, _ = one_step(tmp_path, channels_last="off", amp="off")
    loss, grads, x = one_step(tmp_path, channels_last="on", amp="off")
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_matches_fp32_within_tolerance(tmp_path):
    ref_loss, ref_grads, _ = one_step(tmp_path, channels_last="off", amp="off")
    loss, grads, _ = one_step(tmp_path, channels_last="on", amp="bf16")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    for name, g in ref_grads.items():
        if g.norm() < 1e-6:
            continue
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
        assert grads[name].norm().item() == pytest.approx(g.norm().item(), rel=5e-2), name


def test_bf16_autocast_really_runs_in_bf16(tmp_path):
    cfg = make_config(model="resnet20", dataset="synthetic", amp="bf16", device="cpu")
    trainer = Trainer(cfg, write=False)
    with trainer.autocast():
        out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert out.dtype == torch.bfloat16


def test_compiled_step_matches_eager(tmp_path):
    ref_loss, ref_grads, _ = one_step(tmp_path, channels_last="off", amp="off")
    loss, grads, _ = one_step(tmp_path, channels_last="off", amp="off", compile=True,
                              compile_mode="default")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-2, atol=1e-4, msg=name)
