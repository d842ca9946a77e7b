"""The BatchNorm study: Santurkar probes pinned by hand (absolute and relative step sizes, float64,
dropout, train mode, no autocast, no host sync), probing leaves training unchanged, concurrent
(vmap) landscape training equals sequential, the course's measures by hand, divergence handling,
run_study / CLI / resume, the probe-overhead stage, report."""
from __future__ import annotations

import contextlib
import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarlab.batchnorm import landscape as L
from cifarlab.batchnorm.probe_callback import BNProbeCallback, callbacks_from_config
from cifarlab.batchnorm.probes import gradient_at, gradient_step_length, probe_along_gradient
from cifarlab.config import make_config
from cifarlab.errors import ConfigError
from cifarlab.machine import hardware_label

torch.set_num_threads(1)


def mse0(out, y):
    return ((out[:, 0] - y) ** 2).mean()


def quadratic_model():
    """L(w) = mean over x in {(1,0), (0,2)} of (w.x)^2 = (w1^2 + 4 w2^2) / 2: H = diag(1, 4)."""
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    return m, x, torch.zeros(2)


def with_grad(model, loss_fn, x, y):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return model


class Tiny(nn.Module):
    """Conv -> BN -> ReLU -> pool -> Linear: BN in the path, small enough for exact checks."""

    def __init__(self, c=1, k=3, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 2 * 2, k)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def register_tiny_pair(mp) -> None:
    """Registry entries for a tiny plain / BN pair (``bntest`` and ``bntest_bn``), undone by ``mp``.

    Registered at run time, not import time, so no other test file ever sees them."""
    from cifarlab.models import registry

    mp.setitem(registry._MODELS, "bntest", lambda num_classes=10, in_channels=3: Tiny(in_channels, num_classes, False))
    mp.setitem(registry._MODELS, "bntest_bn", lambda num_classes=10, in_channels=3: Tiny(in_channels, num_classes))


def tiny_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# -- the probe definitions, by hand -------------------------------------------------------------
def test_probe_quadratic_hand_values():
    model, x, y = quadratic_model()
    with_grad(model, mse0, x, y)
    assert model.weight.grad.tolist() == [[1.0, 4.0]]  # g = H w = (1, 4)
    res = probe_along_gradient(model, mse0, x, y, [0.1, 0.05])
    # w - 0.1 g = (0.9, 0.6): L = (0.81 + 4 * 0.36) / 2; w - 0.05 g = (0.95, 0.8): L = (0.9025 + 2.56) / 2
    assert res["loss"].tolist() == pytest.approx([1.125, 1.73125], rel=1e-6)
    # grad L(w) - grad L(w - eta g) = eta H g = eta (1, 16)
    assert res["grad_diff"].tolist() == pytest.approx([0.1 * math.sqrt(257), 0.05 * math.sqrt(257)], rel=1e-6)
    # a quadratic has the same ratio ||H g|| / ||g|| at every eta, and that is beta
    beta = math.sqrt(257 / 17)
    assert res["ratio"].tolist() == pytest.approx([beta, beta], rel=1e-6)
    assert float(res["beta"]) == pytest.approx(beta, rel=1e-6)
    assert float(res["grad_norm"]) == pytest.approx(math.sqrt(17), rel=1e-6)


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.w * x


def test_probe_beta_is_the_max_over_eta():
    """L(w) = w^4 at w = 1: g = 4, L(1 - 4 eta) = (1 - 4 eta)^4, grad = 4 (1 - 4 eta)^3."""
    model = Scalar()
    x, y = torch.ones(1, 1), torch.zeros(1)
    quartic = lambda out, t: ((out[:, 0] - t) ** 4).mean()  # noqa: E731
    with_grad(model, quartic, x, y)
    res = probe_along_gradient(model, quartic, x, y, [0.2, 0.1, 0.05])
    assert res["loss"].tolist() == pytest.approx([0.2 ** 4, 0.6 ** 4, 0.8 ** 4], rel=1e-5)
    assert res["grad_diff"].tolist() == pytest.approx([4 - 4 * 0.2 ** 3, 4 - 4 * 0.6 ** 3, 4 - 4 * 0.8 ** 3],
                                                      rel=1e-5)
    assert res["ratio"].tolist() == pytest.approx([4.96, 7.84, 9.76], rel=1e-5)
    assert float(res["beta"]) == pytest.approx(9.76, rel=1e-5)  # at eta = 0.05, not the largest eta


def test_probe_on_a_bn_net_matches_a_shifted_copy_and_finite_differences():
    torch.manual_seed(0)
    model = Tiny()
    x, y = tiny_batch()
    with_grad(model, F.cross_entropy, x, y)
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    etas = [0.1, 1e-3]
    res = probe_along_gradient(model, F.cross_entropy, x, y, etas)
    for i, eta in enumerate(etas):
        shifted = copy.deepcopy(model).train()  # train mode: BN normalises with the batch statistics
        with torch.no_grad():
            for n, p in shifted.named_parameters():
                p.sub_(eta * g[n])
        shifted.zero_grad()
        loss = F.cross_entropy(shifted(x), y)
        loss.backward()
        diff = torch.linalg.vector_norm(torch.cat([(g[n] - p.grad).flatten() for n, p in shifted.named_parameters()]))
        assert float(res["loss"][i]) == pytest.approx(loss.item(), rel=1e-5)
        assert float(res["grad_diff"][i]) == pytest.approx(diff.item(), rel=1e-4)
    # first order: (L(w - eta g) - L(w)) / eta -> -||g||^2 as eta -> 0 (the direction is -g)
    l0 = F.cross_entropy(copy.deepcopy(model).train()(x), y).item()
    slope = (float(res["loss"][1]) - l0) / 1e-3
    assert slope == pytest.approx(-float(res["grad_norm"]) ** 2, rel=0.05)


def test_probe_leaves_weights_grads_buffers_modes_and_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(Tiny(), nn.Dropout(0.5))
    x, y = tiny_batch()
    model.train()
    with_grad(model, F.cross_entropy, x, y)
    model[0].fc.eval()  # a submodule in its own mode must get it back
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    res = probe_along_gradient(model, F.cross_entropy, x, y, [0.2, 0.1, 0.05, 0.02, 0.01])
    assert torch.equal(torch.rand(3), expected_next)  # the RNG stream continues as if no probe ran
    assert torch.isfinite(res["loss"]).all()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # weights, running stats, num_batches_tracked
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert model.training and model[0].training and not model[0].fc.training
    # gradient_at is as harmless, and at eta = 0 it reproduces .grad (same mode, same batch)
    torch.manual_seed(5)
    loss, g0 = gradient_at(nn.Sequential(model[0]), F.cross_entropy, x, y)
    assert set(g0) == {"0." + n for n, _ in model[0].named_parameters()}


def test_bad_step_sizes_and_missing_gradients_are_config_errors():
    model, x, y = quadratic_model()
    with pytest.raises(ConfigError, match="no gradients"):
        probe_along_gradient(model, mse0, x, y, [0.1])
    with_grad(model, mse0, x, y)
    for etas in ([], [0.1, -0.2], [float("nan")], ["a"]):
        with pytest.raises(ConfigError):
            probe_along_gradient(model, mse0, x, y, etas)
    with pytest.raises(ConfigError):
        BNProbeCallback(0)
    assert callbacks_from_config(make_config(probe_interval=0)) == []
    (cb,) = callbacks_from_config(make_config(probe_interval=7, probe_steps=[0.1, 0.01]))
    assert cb.interval == 7 and cb.etas == [0.1, 0.01]


def test_relative_step_sizes_move_the_same_distance_by_hand():
    """Quadratic: g = (1, 4), ||g|| = sqrt(17). eta_rel 0.5 of a step of length 2 moves a distance
    of 1 along -g: eta = 1 / sqrt(17), w - eta g = (1 - 1/sqrt(17), 1 - 4/sqrt(17))."""
    model, x, y = quadratic_model()
    with_grad(model, mse0, x, y)
    res = probe_along_gradient(model, mse0, x, y, [0.1], rel_etas=[0.5], step_length=2.0)
    r17 = math.sqrt(17)
    w1, w2 = 1 - 1 / r17, 1 - 4 / r17
    assert res["relative"].tolist() == [False, True]
    assert res["eta"].tolist() == pytest.approx([0.1, 1 / r17], rel=1e-6)
    assert res["eta_rel"].tolist() == pytest.approx([0.1 * r17 / 2, 0.5], rel=1e-6)
    assert res["distance"].tolist() == pytest.approx([0.1 * r17, 1.0], rel=1e-6)
    assert float(res["loss"][1]) == pytest.approx((w1 ** 2 + 4 * w2 ** 2) / 2, rel=1e-6)
    # grad diff = eta H g = eta (1, 16); both kinds give the quadratic's ratio ||H g|| / ||g||
    assert float(res["grad_diff"][1]) == pytest.approx(math.sqrt(257) / r17, rel=1e-5)
    assert float(res["beta"]) == pytest.approx(math.sqrt(257 / 17), rel=1e-5)
    assert float(res["beta_rel"]) == pytest.approx(math.sqrt(257 / 17), rel=1e-5)
    assert gradient_step_length(1e-3, 400) == pytest.approx(0.02)
    with pytest.raises(ConfigError, match="step_length"):
        probe_along_gradient(model, mse0, x, y, [0.1], rel_etas=[0.5])


class Affine64(nn.Module):
    """One float64 weight w; the output is w itself (x = 1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x):
        return self.w * x


def test_gradient_difference_is_taken_in_the_models_precision():
    """L(w) = w + eps w^2 / 2 with eps = 1e-9, at w = 1: g = 1 + eps, and
    grad L(w) - grad L(w - eta g) = eps eta g = 5e-10 at eta = 0.5. Rounded to float32 first,
    both gradients are 1.0 and the difference is 0."""
    eps = 1e-9
    model = Affine64()
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1)
    loss_fn = lambda out, t: (out + 0.5 * eps * out ** 2).mean()  # noqa: E731
    with_grad(model, loss_fn, x, y)
    res = probe_along_gradient(model, loss_fn, x, y, [0.5, 0.25])
    g = 1 + eps
    assert res["grad_diff"].tolist() == pytest.approx([eps * 0.5 * g, eps * 0.25 * g], rel=1e-6)
    assert res["ratio"].tolist() == pytest.approx([eps, eps], rel=1e-5)
    assert res["grad_diff"].dtype == torch.float32


class DropNet(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def test_with_dropout_grad_diff_goes_to_zero_and_losses_match_a_forward_from_the_same_rng_state():
    torch.manual_seed(0)
    model = DropNet()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with_grad(model, F.cross_entropy, x, y)  # the training pass: its own dropout mask
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    etas = [1e-2, 1e-4, 1e-6]
    torch.manual_seed(11)
    state = torch.get_rng_state()
    res = probe_along_gradient(model, F.cross_entropy, x, y, etas)
    # one mask for the reference and every shifted forward: grad_diff = eta ||H g|| + O(eta^2)
    diff, norm = res["grad_diff"].double(), float(res["grad_norm"])
    assert float(diff[-1]) < 1e-5 * norm
    assert float(diff[1] / diff[2]) == pytest.approx(100, rel=1e-3)
    assert float(res["ratio"][1]) == pytest.approx(float(res["ratio"][2]), rel=1e-3)
    # every probe loss is the loss of a plain forward of the shifted model from the same RNG state
    for i, eta in enumerate([0.0] + etas):
        shifted = copy.deepcopy(model).train()
        with torch.no_grad():
            for n, p in shifted.named_parameters():
                p.sub_(eta * g[n])
        torch.set_rng_state(state)
        expected = F.cross_entropy(shifted(x), y).item()
        got = float(res["base_loss"]) if i == 0 else float(res["loss"][i - 1])
        assert got == pytest.approx(expected, rel=1e-6), eta
    # the training pass's .grad (another mask) as the reference would not go to zero
    other = probe_along_gradient(model, F.cross_entropy, x, y, etas, base_grad=g)
    assert float(other["grad_diff"][-1]) > 100 * float(diff[-1])


def test_gradient_at_uses_train_mode_even_on_a_model_in_eval_mode():
    torch.manual_seed(0)
    model = Tiny()
    x, y = tiny_batch()
    with torch.no_grad():  # running statistics far from the batch's, so train and eval differ
        model.bn.running_mean.fill_(2.0)
        model.bn.running_var.fill_(5.0)
    model.eval()

    def grads(train):
        m = copy.deepcopy(model).train(train)
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        return {n: p.grad for n, p in m.named_parameters()}

    loss, g = gradient_at(model, F.cross_entropy, x, y)
    train_g, eval_g = grads(True), grads(False)
    for n in train_g:
        torch.testing.assert_close(g[n], train_g[n], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(g["conv.weight"], eval_g["conv.weight"], rtol=1e-2)
    assert not model.training and not model.bn.training  # its own mode comes back


def test_gradient_at_a_shift_is_the_gradient_of_a_shifted_copy_and_defaults_to_no_shift():
    """gradient_at(shift=s, eta) = (L, grad L) at w - eta*s, for the parameters in s only; an
    unused parameter gets a zero gradient; without eta the point is w itself."""
    torch.manual_seed(0)
    model = Tiny()
    model.unused = nn.Parameter(torch.ones(3))  # in the shift, never in the forward
    x, y = tiny_batch()
    shift = {"conv.weight": torch.randn_like(model.conv.weight), "fc.bias": torch.randn_like(model.fc.bias),
             "unused": torch.ones(3)}
    eta = 0.3
    loss, g = gradient_at(model, F.cross_entropy, x, y, shift=shift, eta=eta)
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        for n, s in shift.items():
            ref.get_parameter(n).sub_(eta * s)
    ref.zero_grad()
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    assert set(g) == set(shift)  # only the shifted parameters
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    for n in ("conv.weight", "fc.bias"):
        torch.testing.assert_close(g[n], ref.get_parameter(n).grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(g["unused"], torch.zeros(3))
    # no eta: the gradient at w (a shift alone does not move the point)
    loss0, g0 = gradient_at(model, F.cross_entropy, x, y, shift=shift)
    here = copy.deepcopy(model).train()
    here.zero_grad()
    F.cross_entropy(here(x), y).backward()
    torch.testing.assert_close(g0["conv.weight"], here.conv.weight.grad, rtol=1e-5, atol=1e-7)


def test_global_norm_of_low_precision_gradients_is_taken_in_float32():
    """bf16 and fp16 tensors are widened to float32 before the norm: a sum of 1,000 squares in
    bf16 would keep ~3 significant digits; the result equals the float32 norm."""
    from cifarlab.batchnorm.probes import global_norm

    t = torch.full((1000,), 3.0, dtype=torch.bfloat16)
    u = torch.tensor([4.0], dtype=torch.float16)
    got = global_norm([t, u])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(math.sqrt(1000 * 9.0 + 16.0), rel=1e-6)
    with pytest.raises(ConfigError, match="^no gradients to probe: does the model have trainable parameters"):
        global_norm([])


def test_probe_argument_errors_say_what_is_wrong():
    model, x, y = quadratic_model()
    with_grad(model, mse0, x, y)
    with pytest.raises(ConfigError, match="^probe step sizes must not be empty$"):
        probe_along_gradient(model, mse0, x, y, [], rel_etas=[])
    with pytest.raises(ConfigError, match="^relative probe step sizes must be positive"):
        probe_along_gradient(model, mse0, x, y, [0.1], rel_etas=[-1.0], step_length=1.0)
    with pytest.raises(ConfigError, match="^relative probe step sizes need the gradient step's length"):
        probe_along_gradient(model, mse0, x, y, [], rel_etas=[0.1])
    with pytest.raises(ConfigError, match=r"^base_grad lacks parameters \['weight'\]$"):
        probe_along_gradient(model, mse0, x, y, [0.1], base_grad={})
    # relative etas alone are a valid probe (no absolute ones), and so are absolute ones alone
    r = probe_along_gradient(model, mse0, x, y, [], rel_etas=[0.1], step_length=1.0)
    assert r["eta"].shape == (1,) and r["relative"].dtype == torch.bool and bool(r["relative"][0])
    assert torch.isnan(r["beta"]) and torch.isfinite(r["beta_rel"])  # a kind that is absent is NaN
    r = probe_along_gradient(model, mse0, x, y, [0.1])
    assert r["eta"].shape == (1,) and torch.isnan(r["eta_rel"]).all() and torch.isnan(r["beta_rel"])
    assert torch.isfinite(r["base_loss"])
    # a base gradient passed in: no reference forward here, so no base loss
    base = {"weight": model.weight.grad.clone()}
    assert torch.isnan(probe_along_gradient(model, mse0, x, y, [0.1], base_grad=base)["base_loss"])
    # an explicit direction is used instead of .grad
    g = {"weight": torch.ones_like(model.weight)}
    r = probe_along_gradient(model, mse0, x, y, [0.5], grad=g)
    assert r["grad_norm"].item() == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ConfigError, match="^no gradients to probe: call backward"):
        probe_along_gradient(model, mse0, x, y, [0.1], grad={})


def test_check_etas_wants_positive_finite_numbers():
    from cifarlab.batchnorm.probes import check_etas

    assert check_etas((0.2, 1)) == [0.2, 1.0]
    assert check_etas([], allow_empty=True) == []
    with pytest.raises(ConfigError, match="^probe step sizes must not be empty$"):
        check_etas([])
    with pytest.raises(ConfigError, match="^probe step sizes must be numbers"):
        check_etas(["a"])
    for bad in (0.0, -0.1, float("inf")):
        with pytest.raises(ConfigError, match="^relative probe step sizes must be positive and finite"):
            check_etas([0.1, bad], what="relative probe step sizes")


def test_probes_run_in_fp32_even_under_bf16_autocast():
    torch.manual_seed(0)
    model = Tiny()
    x, y = tiny_batch()
    with_grad(model, F.cross_entropy, x, y)
    ref = probe_along_gradient(model, F.cross_entropy, x, y, [0.1, 1e-3], rel_etas=[0.2], step_length=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = probe_along_gradient(model, F.cross_entropy, x, y, [0.1, 1e-3], rel_etas=[0.2], step_length=0.1)
        _, g = gradient_at(model, F.cross_entropy, x, y)
    for k in ("loss", "grad_diff", "ratio", "base_loss"):
        assert torch.equal(ref[k], under[k]), k
    assert all(v.dtype == torch.float32 for v in g.values())
    # and through the callback, whose trainer trains under bf16 autocast
    cb = BNProbeCallback(1, [0.1, 1e-3], [0.2])
    t = SimpleNamespace(model=model, loss_fn=F.cross_entropy, device=torch.device("cpu"), run_dir=None, epoch=1,
                        global_step=0, is_main=True, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    cb.on_fit_start(t)
    cb.on_batch_start(t, x, y)
    with t.autocast():
        cb.on_after_backward(t)
    res = cb._pending[-1][2]
    expect = probe_along_gradient(model, F.cross_entropy, x, y, [0.1, 1e-3], rel_etas=[0.2],
                                  step_length=0.1 * math.sqrt(sum(p.numel() for p in model.parameters())))
    assert torch.equal(res["loss"], expect["loss"]) and torch.equal(res["grad_diff"], expect["grad_diff"])


def test_a_probed_step_does_no_host_sync(tmp_path):
    from cifarlab.train.host_sync import count_host_syncs

    torch.manual_seed(0)
    model = nn.Sequential(Tiny(), nn.Dropout(0.2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = SimpleNamespace(model=model, loss_fn=F.cross_entropy, device=torch.device("cpu"), run_dir=tmp_path,
                        epoch=1, global_step=0, is_main=True, optimizer=opt, autocast=contextlib.nullcontext)
    cb = BNProbeCallback(1)
    cb.on_fit_start(t)
    cb.on_epoch_start(t, 1)
    for step in range(2):
        x, y = tiny_batch(seed=step)
        cb.on_batch_start(t, x, y)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        with count_host_syncs(device="cpu") as probe_step:
            cb.on_after_backward(t)
            t.global_step += 1
            cb.on_batch_end(t, loss.detach())
        assert probe_step.syncs == 0, probe_step.where
        opt.step()
    assert len(cb._pending) == 2  # results wait on the device until the epoch's end
    cb.on_epoch_end(t, 1, {"epoch": 1, "epoch_time_s": 1.0})  # the one read (.tolist(), invisible on a CPU)
    assert len(pd.read_csv(tmp_path / "probes.csv")) == 2 * 9 and not cb._pending


def test_vgg_a_light_bn_has_a_bn_after_every_conv_and_the_light_widths():
    from cifarlab.models import build_model

    light, bn = build_model("vgg_a_light"), build_model("vgg_a_light_bn")
    assert [type(m) for m in bn.features] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 2
    convs = [(m.in_channels, m.out_channels) for m in bn.features if isinstance(m, nn.Conv2d)]
    assert convs == [(m.in_channels, m.out_channels) for m in light.features if isinstance(m, nn.Conv2d)]
    assert [m.num_features for m in bn.features if isinstance(m, nn.BatchNorm2d)] == [16, 32]
    assert str(light.classifier) == str(bn.classifier)


# -- the callback: probing does not change training ---------------------------------------------
def hand_loop(callbacks, steps=6, run_dir=None, bf16=False):
    """The Trainer's hook order on a few Adam steps of the tiny BN net (bf16: the forward under
    bf16 autocast, as a Trainer with --amp bf16 runs it)."""
    torch.manual_seed(0)
    model = nn.Sequential(Tiny(), nn.Dropout(0.2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = SimpleNamespace(model=model, loss_fn=F.cross_entropy, device=torch.device("cpu"), run_dir=run_dir,
                        epoch=1, global_step=0, is_main=True, optimizer=opt,
                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
    for cb in callbacks:
        cb.on_fit_start(t)
        cb.on_epoch_start(t, 1)
    for step in range(steps):
        x, y = tiny_batch(seed=step)
        for cb in callbacks:
            cb.on_batch_start(t, x, y)
        with t.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for cb in callbacks:
            cb.on_after_backward(t)
        opt.step()
        t.global_step += 1
        for cb in callbacks:
            cb.on_batch_end(t, loss.detach())
    row = {"epoch": 1, "epoch_time_s": 1.0}
    for cb in callbacks:
        cb.on_epoch_end(t, 1, row)
    return model, opt, row


def test_callback_leaves_a_hand_loop_unchanged_and_writes_probes_csv(tmp_path):
    ref, ref_opt, _ = hand_loop([])
    probed, opt, row = hand_loop([BNProbeCallback(2, [0.1, 0.01], [0.4, 0.1])], run_dir=tmp_path)
    for (k, a), b in zip(ref.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    df = pd.read_csv(tmp_path / "probes.csv")
    assert list(df.columns) == ["step", "epoch", "kind", "eta", "eta_rel", "distance", "loss", "grad_diff", "ratio",
                                "beta", "grad_norm", "step_length", "train_loss", "base_loss"]
    assert df["step"].tolist() == [0] * 4 + [2] * 4 + [4] * 4
    assert df["kind"].tolist() == ["abs", "abs", "rel", "rel"] * 3
    ab, rel = df[df["kind"] == "abs"], df[df["kind"] == "rel"]
    assert ab["eta"].tolist() == [0.1, 0.01] * 3 and rel["eta_rel"].tolist() == pytest.approx([0.4, 0.1] * 3)
    # the gradient step: lr * sqrt(P), P = 4*1*9 + 4 (conv) + 4 + 4 (BN) + 16*3 + 3 (fc) = 99
    assert df["step_length"].tolist() == pytest.approx([1e-2 * math.sqrt(99)] * 12)
    # relative rows move eta_rel times that distance, whatever ||g|| is; absolute rows eta ||g||
    assert rel["distance"].to_numpy() == pytest.approx(rel["eta_rel"] * rel["step_length"], rel=1e-5)
    assert np.allclose(df["distance"], df["eta"] * df["grad_norm"], rtol=1e-5)
    assert np.allclose(ab["eta_rel"], ab["distance"] / ab["step_length"], rtol=1e-5)
    assert np.allclose(df["ratio"], df["grad_diff"] / df["distance"], rtol=1e-5)
    assert (df.groupby(["step", "kind"])["ratio"].max() == df.groupby(["step", "kind"])["beta"].first()).all()
    assert df["train_loss"].notna().all() and df["base_loss"].notna().all() and row["probe_beta_median"] > 0


def test_trainer_runs_with_and_without_probes_end_with_identical_weights(tmp_path, monkeypatch):
    from cifarlab.train import Trainer

    register_tiny_pair(monkeypatch)
    base = dict(model="bntest_bn", dataset="synthetic:1x8x8:4", train_subset=96, test_subset=32, batch_size=16,
                optimizer="adam", lr=1e-3, scheduler="none", device="cpu", progress="off", epochs=2,
                val_fraction=0.0)
    plain = Trainer(make_config(base, run_dir=str(tmp_path / "plain"))).fit()
    probed = Trainer(make_config(base, run_dir=str(tmp_path / "probed"), probe_interval=4,
                                 probe_steps=[0.1, 0.01])).fit()
    a = torch.load(tmp_path / "plain/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "probed/checkpoints/last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k  # weights and BN running statistics
    assert plain["test_acc"] == probed["test_acc"]
    df = pd.read_csv(tmp_path / "probed/probes.csv")
    assert sorted(set(df["step"])) == [0, 4, 8] and sorted(set(df["epoch"])) == [1, 2]  # 6 steps per epoch
    assert probed["probe_count"] == 3 and probed["probe_overhead_pct"] > 0
    assert probed["probe_rel_etas"] == [0.4, 0.2, 0.1, 0.05] and probed["probe_beta_rel_median"] > 0
    metrics = pd.read_csv(tmp_path / "probed/metrics.csv")
    assert "probe_beta_median" in metrics.columns and "probe_overhead_pct" in metrics.columns


# -- the loss landscape -----------------------------------------------------------------------------
def landscape_data(n=40, bs=16):
    x, y = tiny_batch(n, seed=1)

    def batches(epoch):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        return [(x[perm[i:i + bs]], y[perm[i:i + bs]]) for i in range(0, n, bs)]

    return batches


def test_concurrent_vmap_training_equals_sequential():
    batches = landscape_data()
    lrs = [1e-2, 3e-3, 1e-3]
    conc = L.train_landscape("tiny", Tiny, lrs, batches, 3, concurrent=True, seed=0, check_every=4)
    seq = L.train_landscape("tiny", Tiny, lrs, batches, 3, concurrent=False, seed=0, check_every=4)
    assert conc.losses.shape == seq.losses.shape == (9, 3)  # 3 epochs x 3 batches, 3 rates
    assert conc.epochs.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    np.testing.assert_allclose(conc.losses, seq.losses, rtol=1e-4, atol=1e-6)
    # the course's measures too: gradient change between steps and the distance moved
    np.testing.assert_allclose(conc.grad_change, seq.grad_change, rtol=1e-3, atol=1e-6)
    # (looser: the conv bias before BN has a gradient of pure rounding noise, which Adam divides by
    # its own size, so its few coordinates move by up to lr differently in the two computations)
    np.testing.assert_allclose(conc.weight_change, seq.weight_change, rtol=3e-2)
    assert np.isfinite(conc.grad_change[1:]).all() and (conc.weight_change[1:] > 0).all()
    assert conc.diverged_step == seq.diverged_step == [None, None, None]
    # same initial weights for every rate: identical loss at step 0, different ones after
    assert np.ptp(conc.losses[0]) == 0 and np.ptp(conc.losses[-1]) > 0


def test_a_huge_rate_diverges_and_the_band_covers_the_rest(tmp_path):
    batches = landscape_data()
    lrs = [1e-2, 1e-3, 1e30]
    for concurrent in (True, False):
        run = L.train_landscape("tiny", lambda: Tiny(bn=False), lrs, batches, 2, concurrent=concurrent,
                                seed=0, check_every=2)
        d = run.diverged_step[2]
        assert run.diverged_step[:2] == [None, None] and d is not None and 0 < d < 6
        assert not np.isfinite(run.losses[d, 2]) and np.isnan(run.losses[d + 1:, 2]).all()
        band = L.loss_band(run.losses, run.diverged_step)
        np.testing.assert_array_equal(band["n_alive"], [3] * d + [2] * (6 - d))
        np.testing.assert_allclose(band["min"][d:], run.losses[d:, :2].min(1))
        np.testing.assert_allclose(band["max"][d:], run.losses[d:, :2].max(1))
    L.save_landscape(tmp_path, [run])
    runs = pd.read_csv(tmp_path / L.RUNS_CSV)
    assert runs["diverged"].tolist() == [False, False, True] and runs["diverged_step"].iloc[2] == d
    losses = pd.read_csv(tmp_path / L.LOSSES_CSV)
    assert len(losses[losses["lr"] == 1e30]) == d + 1  # recorded up to and including the diverged step


def test_loss_band_by_hand():
    losses = np.array([[1.0, 2.0, 3.0], [1.5, 0.5, np.inf], [1.0, 2.0, 0.1]])
    band = L.loss_band(losses, [None, None, 1])  # model 2 diverged at step 1: out from there on
    assert band["min"].tolist() == [1.0, 0.5, 1.0] and band["max"].tolist() == [3.0, 1.5, 2.0]
    assert band["n_alive"].tolist() == [3, 2, 2]
    assert L.band_width(band) == pytest.approx((2.0 + 1.0 + 1.0) / 3)
    everyone = L.loss_band(np.array([[np.nan, np.nan]]), [0, 0])
    assert np.isnan(everyone["min"][0]) and everyone["n_alive"][0] == 0


def test_rates_without_progress_are_named():
    from cifarlab.batchnorm.figures import no_progress

    steps = np.arange(20)
    rows = [{"model": "m", "lr": 1e-3, "step": i, "loss": 2.30 + 0.01 * (i % 2)} for i in steps]  # flat
    rows += [{"model": "m", "lr": 1e-4, "step": i, "loss": 2.30 - 0.05 * i} for i in steps]  # learns
    rows += [{"model": "other", "lr": 1e-3, "step": i, "loss": 2.30} for i in steps]
    assert no_progress(pd.DataFrame(rows), "m") == [1e-3]


def test_course_measures_match_a_hand_adam_loop():
    """grad_change[t] = ||g_t - g_(t-1)||, weight_change[t] = ||w_t - w_(t-1)||, NaN at step 0."""
    batches = landscape_data()
    run = L.train_landscape("tiny", Tiny, [1e-2], batches, 2, concurrent=False, seed=0, check_every=4)
    with L.cpu_seeded(0):
        model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grads, weights = [], [torch.cat([p.detach().flatten().clone() for p in model.parameters()])]
    for epoch in (1, 2):
        for x, y in batches(epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
            opt.step()
            weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    change = [math.nan] + [float((grads[t] - grads[t - 1]).norm()) for t in range(1, len(grads))]
    moved = [math.nan] + [float((weights[t] - weights[t - 1]).norm()) for t in range(1, len(grads))]
    np.testing.assert_allclose(run.grad_change[:, 0], change, rtol=1e-4)
    np.testing.assert_allclose(run.weight_change[:, 0], moved, rtol=1e-4)
    assert np.isnan(run.grad_change[0, 0]) and np.isnan(run.weight_change[0, 0])


def test_course_band_by_hand():
    change = np.array([[np.nan, np.nan], [2.0, 6.0], [3.0, 1.0], [4.0, np.inf]])
    moved = np.array([[np.nan, np.nan], [1.0, 2.0], [0.5, 0.1], [1.0, 1.0]])
    band = L.course_band(change, moved, [None, 3])  # model 1 diverged at step 3
    np.testing.assert_array_equal(band["change_min"][1:], [2.0, 1.0, 4.0])
    np.testing.assert_array_equal(band["change_max"][1:], [6.0, 3.0, 4.0])
    np.testing.assert_array_equal(band["beta"][1:], [3.0, 10.0, 4.0])  # max of 2/1, 6/2; 6, 10; 4
    assert np.isnan(band["change_min"][0]) and np.isnan(band["beta"][0])


def test_models_are_built_from_the_cpu_generator_alone(monkeypatch):
    """Same init for every rate; the CPU stream is restored; no CUDA generator is reseeded."""
    def refuse(*a, **k):
        raise AssertionError("the CUDA generators were reseeded")

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with monkeypatch.context() as mp:
        mp.setattr(torch.cuda, "manual_seed_all", refuse)
        mp.setattr(torch.cuda, "manual_seed", refuse)
        a, b = L.build_same_init(Tiny, 2, seed=3, device="cpu")
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(3)
    assert torch.equal(Tiny().conv.weight, a.conv.weight)  # the same numbers as a global seed


def test_saved_landscapes_load_back_for_a_resume(tmp_path):
    batches = landscape_data()
    runs = [L.train_landscape(name, Tiny, [1e-2, 1e30], batches, 2, concurrent=False, seed=seed, check_every=2)
            for name, seed in (("a", 0), ("a", 1), ("b", 0))]
    for r, name in zip(runs, ("a", "a", "b")):
        r.name = name
    L.save_landscape(tmp_path, runs)
    files = {f: (tmp_path / f).read_bytes() for f in (L.LOSSES_CSV, L.RUNS_CSV, L.BAND_CSV)}
    back = L.load_landscape_runs(tmp_path)
    assert [(r.name, r.seed) for r in back] == [("a", 0), ("a", 1), ("b", 0)]
    for r, b in zip(runs, back):
        assert r.diverged_step == b.diverged_step and r.lrs == b.lrs and r.epochs.tolist() == b.epochs.tolist()
        np.testing.assert_allclose(b.losses, r.losses, rtol=1e-7)
        np.testing.assert_allclose(b.grad_change, r.grad_change, rtol=1e-7)
    band = pd.read_csv(tmp_path / L.BAND_CSV)
    L.save_landscape(tmp_path, back)  # written again from what was read: the same values
    assert all((tmp_path / f).read_bytes() == files[f] for f in (L.LOSSES_CSV, L.RUNS_CSV))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / L.BAND_CSV), band, rtol=1e-6)  # ratios of rounded values
    assert L.load_landscape_runs(tmp_path / "nothing") == []


def test_speedup_measurement_reports_both_timings():
    batches = landscape_data()(1)
    sp = L.measure_speedup(Tiny, [1e-2, 1e-3], batches, seed=0, warmup=1)
    # the record's structure and its own arithmetic, not a timing: two rates, every batch timed,
    # the speed-up is the ratio of the two recorded times
    assert set(sp) == {"models", "steps", "sequential_s", "concurrent_s", "speedup", "device"}
    assert sp["models"] == 2 and sp["steps"] == len(batches) == 3 and sp["device"] == "cpu"
    assert sp["speedup"] == sp["sequential_s"] / sp["concurrent_s"]
    with pytest.raises(ConfigError):
        L.train_landscape("tiny", Tiny, [], landscape_data(), 1)
    with pytest.raises(ConfigError):
        L.train_landscape("tiny", Tiny, [0.1, -1.0], landscape_data(), 1)


# -- the study: run_study, the command, resume, figures and report section ---------------------
STUDY_ARGS: list[str] = []


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """One small study through the CLI, on the tiny plain / BN pair, two seeds, 8x8 synthetic images."""
    from cifarlab.cli import main

    out = tmp_path_factory.mktemp("bn") / "study"
    STUDY_ARGS[:] = args = [
        "bn", "--models", "bntest,bntest_bn", "--dataset", "synthetic:1x8x8:4", "--train-subset", "48",
        "--test-subset", "16", "--batch-size", "16", "--epochs", "2", "--seeds", "0,1", "--lrs", "1e-3,1e-2,1e30",
        "--probe-count", "3", "--probe-steps", "0.1,0.01", "--probe-rel-steps", "0.4,0.1", "--device", "cpu",
        "--progress", "off", "--speedup-steps", "1", "--run-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        register_tiny_pair(mp)
        assert main(args) == 0
    return out


def test_bn_command_writes_the_study(study_dir):
    from cifarlab.batchnorm.study import load_study

    s = json.loads((study_dir / "summary.json").read_text())
    assert s["finished"] is True and s["study"] == "bn" and s["models"] == ["bntest", "bntest_bn"]
    assert s["seeds"] == [0, 1]
    for name in ("config.yaml", "study.yaml", "log.txt", L.LOSSES_CSV, "landscape_band.csv"):
        assert (study_dir / name).is_file(), name
    for seed in (0, 1):
        for fig in ("landscape", "course_predictiveness", "course_beta", "probe_loss", "probe_grad_diff", "probe_beta"):
            assert (study_dir / f"{fig}_seed{seed}.png").is_file(), (fig, seed)
        for m in ("bntest", "bntest_bn"):
            assert (study_dir / "probes" / m / f"seed{seed}" / "probes.csv").is_file()
    runs = pd.read_csv(study_dir / L.RUNS_CSV)
    assert runs.groupby(["model", "seed"])["diverged"].apply(list).to_dict() == {
        (m, seed): [False, False, True] for m in ("bntest", "bntest_bn") for seed in (0, 1)}
    band = pd.read_csv(study_dir / L.BAND_CSV)
    assert {"change_min", "change_max", "beta"} <= set(band.columns) and len(band) == 4 * 6  # 4 units x 6 steps
    # two seeds give two initialisations and data orders
    losses = pd.read_csv(study_dir / L.LOSSES_CSV)
    first = losses[(losses["step"] == 0) & (losses["lr"] == 1e-3) & (losses["model"] == "bntest")]
    assert first["loss"].nunique() == 2
    # 2 epochs x 3 batches = 6 steps; probe_count 3 -> every 2 steps: steps 0, 2, 4
    assert s["probe_interval"] == 2 and s["probes"]["bntest_bn/seed1"]["probes"] == 3
    assert s["probes"]["bntest_bn/seed1"]["kind"] == "rel"
    assert s["speedup"]["steps"] == 1 and s["speedup"]["speedup"] > 0
    assert set(s["probe_overhead_pct"]) == {f"{m}/seed{k}" for m in ("bntest", "bntest_bn") for k in (0, 1)}
    assert [(a["plain"], a["bn"], a["seed"]) for a in s["answers"]] == [("bntest", "bntest_bn", 0),
                                                                       ("bntest", "bntest_bn", 1)]
    for a in s["answers"]:
        assert [q["key"] for q in a["questions"]] == ["band", "predictive", "predictive_rel", "predictive_course",
                                                       "beta", "beta_course"]
        for q in a["questions"]:
            assert q["answer"] == ("yes" if q["bn"] < q["plain"] else "no")
    assert len(s["comparison"]) == 2 and "seed 1" in s["comparison"][1]
    assert s["command"].startswith("python -m cifarlab bn --models bntest,bntest_bn --dataset synthetic:1x8x8:4")
    assert "--seeds 0,1" in s["command"] and "--probe-count 3" in s["command"]
    assert s["params_by_model"]["bntest_bn"] == s["params_by_model"]["bntest"] + 8  # 2 per BN channel
    result = load_study(study_dir)
    assert result.finished and result.answers == s["answers"] and result.figures["probe_beta_seed0"].is_file()
    assert "| Is BN's beta smaller? |" in result.tables()


def test_bn_command_refuses_bad_input_and_finished_runs(study_dir, tmp_path, capsys):
    from cifarlab.cli import main

    common = ["--dataset", "synthetic:1x8x8:4", "--run-dir", str(tmp_path / "x")]
    assert main(["bn", "--models", "nope"] + common) == 2
    assert "unknown model" in capsys.readouterr().err
    for bad in (["--lrs", "1e-3,abc"], ["--lrs", "0"], ["--seeds", "0,x"], ["--seeds", "1,1"],
                ["--no-probes", "--no-landscape"], ["--probe-count", "0"], ["--model", "vgg_a"],
                ["--overhead-interval", "0", "--overhead"], ["--smooth", "0"]):
        assert main(["bn"] + bad + common) == 2, bad
        assert capsys.readouterr().err.startswith("error: "), bad
    assert not (tmp_path / "x").exists()  # refused before anything was written
    assert main(["bn", "--models", "vgg_a_light", "--run-dir", str(study_dir)]) == 2
    assert "finished" in capsys.readouterr().err


def test_resume_trains_only_what_is_missing(study_dir, tmp_path):
    """An interrupted study (no summary.json; one landscape and one probe run unfinished) resumed:
    finished parts are kept, the missing ones trained again give the same numbers (CPU)."""
    import shutil

    from cifarlab.cli import main

    run = tmp_path / "study"
    shutil.copytree(study_dir, run)
    (run / "summary.json").unlink()
    losses = pd.read_csv(run / L.LOSSES_CSV)
    for f in (L.LOSSES_CSV, L.RUNS_CSV, L.BAND_CSV):  # drop the landscape of (bntest_bn, seed 1)
        df = pd.read_csv(run / f)
        df[~((df["model"] == "bntest_bn") & (df["seed"] == 1))].to_csv(run / f, index=False)
    probe_run = run / "probes" / "bntest" / "seed1"
    (probe_run / "summary.json").unlink()  # a probe run killed after its last checkpoint
    args = [a if a != str(study_dir) else str(run) for a in STUDY_ARGS]
    assert main(args) == 2  # without --resume the folder is refused
    assert main([a if a != "0,1" else "0" for a in args] + ["--resume"]) == 2  # other seeds: refused
    with pytest.MonkeyPatch.context() as mp:
        register_tiny_pair(mp)
        assert main(args + ["--resume"]) == 0
    log = (run / "log.txt").read_text().split("# bn study")[-1]
    assert log.count("finished earlier, kept") == 3 + 3  # 3 landscapes, 3 probe runs
    assert "landscape bntest_bn seed 1: 3 rates" in log  # trained again
    again = pd.read_csv(run / L.LOSSES_CSV)
    key = ["model", "seed", "lr", "step"]
    pd.testing.assert_frame_equal(again.sort_values(key).reset_index(drop=True),
                                  losses.sort_values(key).reset_index(drop=True), rtol=1e-6)
    assert json.loads((run / "summary.json").read_text())["finished"] is True


def test_run_study_measures_the_probe_overhead(tmp_path, monkeypatch):
    """The overhead stage alone: per model a probed run and the same run without probes, which
    end with the same weights; the report tables them with the command."""
    from cifarlab.batchnorm import run_study
    from cifarlab.batchnorm.report_section import bn_section

    register_tiny_pair(monkeypatch)
    lines = []
    result = run_study(models=["bntest_bn"], dataset="synthetic:1x8x8:4", train_subset=64, test_subset=16,
                       batch_size=16, epochs=2, seeds=[0], landscape=False, probes=False, overhead=True,
                       overhead_interval=3, device="cpu", progress="off", run_dir=tmp_path / "log" / "bn" / "ov",
                       log=lines.append)
    (row,) = result.summary["overhead"]
    assert row["model"] == "bntest_bn" and row["interval"] == 3 and row["same_weights"] is True
    assert row["probes"] == 3 and row["epochs_compared"] == "2-2" and row["plain_s"] > 0 and row["probed_s"] > 0
    assert any(line.startswith("overhead bntest_bn:") for line in lines)  # log= gets the progress lines
    assert pd.read_csv(tmp_path / "log/bn/ov/overhead/bntest_bn/probed/probes.csv")["step"].nunique() == 3
    assert not (tmp_path / "log/bn/ov/overhead/bntest_bn/plain/probes.csv").exists()
    md = bn_section(tmp_path / "log", tmp_path / "img")
    assert "| bntest_bn | 3 | 2-2 | 3 |" in md and "--overhead --overhead-interval 3" in md


def test_report_section_states_the_answers(study_dir, tmp_path):
    import shutil

    from cifarlab.batchnorm.report_section import bn_section

    assert bn_section(tmp_path / "nothing", tmp_path / "img") is None
    log_root = tmp_path / "log"
    shutil.copytree(study_dir, log_root / "bn" / "tiny", ignore=shutil.ignore_patterns("checkpoints"))
    md = bn_section(log_root, tmp_path / "img")
    for seed in (0, 1):
        assert f"**bntest_bn (BN) vs bntest, seed {seed}**" in md
        for fig in ("landscape", "course_predictiveness", "course_beta", "probe_beta"):
            name = f"bn_tiny_{fig}_seed{seed}.png"
            assert f"img/{name}" in md and (tmp_path / "img" / name).is_file()
    for question in ("Is BN's loss band narrower?", "Are BN's gradients more predictive? (course)",
                     "Is BN's beta smaller?", "Which definition each figure uses"):
        assert question in md
    assert "1e+30 (step" in md  # the diverged rate is named in the table
    assert f"Hardware: {hardware_label('cpu')}" in md and "python -m cifarlab bn --models bntest,bntest_bn" in md
    assert md == bn_section(log_root, tmp_path / "img")  # deterministic


def test_figures_show_every_step_smoothed_over_the_raw_band(tmp_path):
    from cifarlab.batchnorm import figures as F

    steps = 400
    rng = np.random.default_rng(0)
    rows = [{"model": m, "seed": 0, "step": i, "epoch": 1, "min": 1 + rng.random(), "max": 3 + rng.random(),
             "n_alive": 2, "change_min": 0.1, "change_max": 0.2 + rng.random(), "beta": 5 + rng.random()}
            for m in ("a", "a_bn") for i in range(steps)]
    band = pd.DataFrame(rows)
    runs = pd.DataFrame([{"model": m, "seed": 0, "lr": lr, "diverged": False, "diverged_step": None}
                         for m in ("a", "a_bn") for lr in (1e-3, 1e-4)])
    assert F.auto_window(steps) == 4 and F.auto_window(50) == 1
    import matplotlib.figure

    drawn = []
    real = matplotlib.figure.Figure.savefig
    monkey = pytest.MonkeyPatch()
    monkey.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (drawn.append(self), real(self, *a, **k)))
    try:
        F.plot_landscape(band, runs, tmp_path / "l.png", seed=0)
    finally:
        monkey.undo()
    ax = drawn[0].axes[0]
    fills = ax.collections  # per model: the raw band (faint) and the smoothed band
    assert len(fills) == 4 and fills[0].get_alpha() < fills[1].get_alpha()
    assert "moving average over 4 steps" in ax.get_title()
    # every step is drawn: the smoothed edge lines have one point per step
    assert all(len(line.get_xdata()) == steps for line in ax.lines)


def test_report_section_tables_the_probe_overhead_of_training_runs(tmp_path):
    """Training runs with probes are listed with the timer's overhead and the epoch time of their twin."""
    import yaml

    from cifarlab.batchnorm.report_section import bn_section

    for name, k, t in (("k50", 50, 110.0), ("k0", 0, 100.0)):
        d = tmp_path / "log" / "bn" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"model": "m", "dataset": "fashion", "probe_interval": k,
                                                       "run_dir": str(d)}))
        summary = {"model": "m", "finished": True, "train_images": 640}
        if k:
            summary.update(probe_overhead_pct=7.25, probe_count=3)
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "metrics.csv").write_text(f"epoch,epoch_time_s\n1,{t}\n")
    md = bn_section(tmp_path / "log", tmp_path / "img")
    assert "| bn/k50 | m | fashion | 640 | 50 | 3 | 7.25% | 110.0s vs 100.0s (+10.0%, k0) |" in md


def test_relative_predictiveness_divides_each_steps_largest_change_by_its_gradient_length():
    # hand-computed: a (no BN) |g| 1, changes 0.5 and 0.8 -> 0.8; a_bn |g| 4, changes 1.0 and 2.0 -> 0.5.
    # Absolute: BN's change (2.0) is larger ("no"); relative to |g| it is smaller ("yes"), and the
    # note says why the absolute answer is no.
    from cifarlab.batchnorm import figures as F

    rows = []
    for model, g, diffs in (("a", 1.0, (0.5, 0.8)), ("a_bn", 4.0, (1.0, 2.0))):
        for eta, d in zip((0.1, 0.2), diffs):
            rows.append({"model": model, "seed": 0, "step": 0, "epoch": 1, "kind": "rel", "eta": eta,
                         "eta_rel": eta, "distance": eta, "loss": 1.0, "grad_diff": d, "ratio": d / eta,
                         "beta": 0.0, "grad_norm": g, "step_length": 1.0, "train_loss": 1.0, "base_loss": 1.0})
    probe = F.probe_stats(pd.DataFrame(rows))
    assert probe["a/seed0"]["grad_diff_rel_median"] == pytest.approx(0.8)
    assert probe["a_bn/seed0"]["grad_diff_rel_median"] == pytest.approx(0.5)
    land = {F.unit(m, 0): {"band_width_median": w, "diverged": [], "no_progress": [],
                           "course_change_max_median": 1.0, "course_beta_median": 1.0}
            for m, w in (("a", 0.3), ("a_bn", 0.1))}
    (rec,) = F.answers(land, probe, ["a", "a_bn"], [0])
    q = {r["key"]: r for r in rec["questions"]}
    assert (q["predictive"]["answer"], q["predictive_rel"]["answer"], q["band"]["answer"]) == ("no", "yes", "yes")
    notes = " ".join(rec["notes"])
    assert "median ||g|| 4 vs 1" in notes and "change less with BN (0.5 vs 0.8)" in notes
    assert "without BN every rate trained" in notes
    assert "relative to their length yes (0.5 vs 0.8)" in F.comparison_lines([rec])[0]


def test_load_study_recomputes_the_answers_of_an_older_summary(study_dir, tmp_path):
    import json
    import shutil

    from cifarlab.batchnorm import load_study

    old = tmp_path / "old"
    shutil.copytree(study_dir, old, ignore=shutil.ignore_patterns("checkpoints"))
    summary = json.loads((old / "summary.json").read_text())
    fresh = load_study(study_dir).answers
    summary["answers"], summary["comparison"] = [{"stale": True}], ["stale"]  # as an older version wrote it
    (old / "summary.json").write_text(json.dumps(summary))
    result = load_study(old)
    assert result.answers == fresh and "predictive_rel" in [q["key"] for q in result.answers[0]["questions"]]
    assert result.comparison[0].startswith("bntest_bn vs bntest, seed 0: band narrower?")


def test_notes_name_the_final_losses_and_the_course_measures_batch_noise():
    # hand-made numbers: BN ends lower at both rates but its band is wider; Santurkar's probes say
    # yes, the course's measures no: both facts are stated as evidence
    from cifarlab.batchnorm import figures as F

    land = {F.unit("a", 0): {"band_width_median": 0.2, "diverged": [], "no_progress": [], "lrs": [1e-3, 1e-4],
                             "final_losses": [0.30, 0.36], "course_change_max_median": 4.0, "course_beta_median": 80.0},
            F.unit("a_bn", 0): {"band_width_median": 0.3, "diverged": [], "no_progress": [], "lrs": [1e-3, 1e-4],
                                "final_losses": [0.21, 0.26], "course_change_max_median": 7.0, "course_beta_median": 130.0}}
    probe = {F.unit("a", 0): {"kind": "rel", "probes": 60, "grad_diff_max_median": 30.0, "beta_median": 40.0,
                              "grad_diff_rel_median": 20.0, "grad_norm_median": 1.7},
             F.unit("a_bn", 0): {"kind": "rel", "probes": 60, "grad_diff_max_median": 12.0, "beta_median": 16.0,
                                 "grad_diff_rel_median": 7.0, "grad_norm_median": 1.7}}
    (rec,) = F.answers(land, probe, ["a", "a_bn"], [0])
    assert [r["answer"] for r in rec["questions"]] == ["no", "yes", "yes", "no", "yes", "no"]
    notes = " ".join(rec["notes"])
    assert "final training loss per rate (lr: no BN / BN) 0.001: 0.3 / 0.21, 0.0001: 0.36 / 0.26" in notes
    assert "BN ends lower at every rate" in notes
    assert "Are BN's gradients more predictive: yes by Santurkar's probes, no by the course's measure" in notes
    assert "Is BN's beta smaller: yes by Santurkar's probes" in notes
