"""DessiLBI: the SLBI update on hand-computed tensors, the toolbox, physical pruning, resume,
and the run through the Trainer and the `slbi` command (tiny synthetic data)."""
from __future__ import annotations

import io
import json
import shutil
import warnings

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarlab.dessilbi import toolbox as tb
from cifarlab.dessilbi.physical_prune import compare_models, export_pruned
from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.optim.slbi import (SLBI, SLBIAdam, group_soft_threshold, slbi_param_groups, slbi_step_ratio,
                                 soft_threshold)

T = torch.tensor


def close(a, b, tol=1e-6):
    assert torch.allclose(a, T(b, dtype=a.dtype) if not isinstance(b, torch.Tensor) else b, atol=tol, rtol=0), (a, b)


# -- the proximal maps ---------------------------------------------------------------------------

def test_elementwise_soft_threshold_by_hand():
    z = T([1.5, -0.2, -3.0, 0.5, 1.0, -1.25])
    close(soft_threshold(z, 1.0), [0.5, 0.0, -2.0, 0.0, 0.0, -0.25])
    close(soft_threshold(z, 0.0), z)


def test_group_soft_threshold_by_hand():
    # filter 0: ||(3,4)|| = 5 -> scale 1 - 1/5 = 0.8; filter 1: ||(0.3,0.4)|| = 0.5 < 1 -> 0; filter 2: zero
    z = T([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]).view(3, 1, 1, 2)
    close(group_soft_threshold(z, 1.0).view(3, 2), [[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]])
    close(group_soft_threshold(z, 0.25).view(3, 2), [[2.85, 3.8], [0.15, 0.2], [0.0, 0.0]])


# -- the update, by hand (REFERENCE §2) -----------------------------------------------------------

def _elementwise_problem(momentum, weight_decay=0.0):
    """W = [[1, -2]] (linear weight, element-wise), b = [1] (plain); fixed gradients each step.
    a = 0.1, kappa = 2, mu = 10, lam = 0.015."""
    w = nn.Parameter(T([[1.0, -2.0]]))
    b = nn.Parameter(T([1.0]))
    opt = SLBI([{"params": [w], "penalty": "elementwise"}, {"params": [b], "penalty": None}],
               lr=0.1, kappa=2.0, mu=10.0, lam=0.015, momentum=momentum, weight_decay=weight_decay)

    def step():
        w.grad = T([[0.5, 1.0]])
        b.grad = T([0.5])
        opt.step()
    return w, b, opt, step


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_one_step_by_hand(momentum):
    w, b, opt, step = _elementwise_problem(momentum)
    close(opt.state[w]["z"], [[0.0, 0.0]])
    close(opt.state[w]["gamma"], [[0.0, 0.0]])
    step()
    # W1 = W - a k g - a k (W - 0)/mu = [1 - .1 - .02, -2 - .2 + .04]
    close(w.detach(), [[0.88, -2.16]])
    # z1 = (a/mu) W0 = [0.01, -0.02]; Gamma1 = 2 * soft(z1, 0.015) = [0, -0.01]
    close(opt.state[w]["z"], [[0.01, -0.02]])
    close(opt.state[w]["gamma"], [[0.0, -0.01]])
    # plain parameter: b - a k g = 1 - 0.1
    close(b.detach(), [0.9])
    assert "z" not in opt.state[b] and "gamma" not in opt.state[b]


def test_two_steps_without_momentum_by_hand():
    w, b, opt, step = _elementwise_problem(0.0)
    step()
    step()
    # W2 = W1 - a k g - a k (W1 - G1)/mu = [0.88 - 0.1 - 0.0176, -2.16 - 0.2 + 0.02*2.15]
    close(w.detach(), [[0.7624, -2.317]])
    # z2 = z1 + 0.01 (W1 - G1) = [0.0188, -0.0415]; Gamma2 = 2 soft(z2, .015) = [0.0076, -0.053]
    close(opt.state[w]["z"], [[0.0188, -0.0415]])
    close(opt.state[w]["gamma"], [[0.0076, -0.053]])
    close(b.detach(), [0.8])


def test_two_steps_with_momentum_by_hand():
    w, b, opt, step = _elementwise_problem(0.5)
    step()
    step()
    # buf2 = 0.5 g + g = 1.5 g = [0.75, 1.5]: W2 = [0.88 - 0.15 - 0.0176, -2.16 - 0.3 + 0.043]
    close(w.detach(), [[0.7124, -2.417]])
    close(opt.state[w]["momentum_buffer"], [[0.75, 1.5]])
    close(opt.state[w]["z"], [[0.0188, -0.0415]])  # z uses W1, which momentum has not touched yet
    close(opt.state[w]["gamma"], [[0.0076, -0.053]])
    close(b.detach(), [0.9 - 0.2 * 0.75])


def test_group_penalty_two_steps_by_hand():
    # conv weight with 2 filters of 2 entries; zero loss gradient, a = 1, mu = 10, kappa = 1, lam = 1
    w = nn.Parameter(T([[30.0, 40.0], [3.0, 4.0]]).view(2, 1, 1, 2))
    opt = SLBI([w], lr=1.0, kappa=1.0, mu=10.0, lam=1.0, momentum=0.9)  # "auto": 4-D -> group
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        opt.step()
        if _ == 0:
            close(w.detach().view(2, 2), [[27.0, 36.0], [2.7, 3.6]], 1e-5)
            close(opt.state[w]["z"].view(2, 2), [[3.0, 4.0], [0.3, 0.4]], 1e-6)
            close(opt.state[w]["gamma"].view(2, 2), [[2.4, 3.2], [0.0, 0.0]], 1e-6)
    # W2 = W1 - (W1 - G1)/10; z2 = z1 + (W1 - G1)/10: filter 0 norm 9.1 -> scale 8.1/9.1; filter 1 norm .95 -> 0
    close(w.detach().view(2, 2), [[24.54, 32.72], [2.43, 3.24]], 1e-5)
    close(opt.state[w]["z"].view(2, 2), [[5.46, 7.28], [0.57, 0.76]], 1e-5)
    close(opt.state[w]["gamma"].view(2, 2), [[4.86, 6.48], [0.0, 0.0]], 1e-5)


def test_weight_decay_is_pytorch_style_and_skips_1d_params():
    w, b, opt, step = _elementwise_problem(0.5, weight_decay=0.1)
    step()
    # d = g + 0.1 W = [0.6, 0.8]: W1 = [1 - 0.2*0.6 - 0.02, -2 - 0.2*0.8 + 0.04]; b has no decay
    close(w.detach(), [[0.86, -2.12]])
    close(b.detach(), [0.9])
    step()
    # buf2 = 0.5*[0.6, 0.8] + g + 0.1*W1 = [0.886, 1.188] (decay enters before momentum)
    close(opt.state[w]["momentum_buffer"], [[0.886, 1.188]])
    close(b.detach(), [0.9 - 0.2 * 0.75])


def test_slbi_adam_first_step_moves_by_sign():
    w = nn.Parameter(T([[1.0, -2.0]]))
    opt = SLBIAdam([w], lr=0.1, kappa=2.0, mu=10.0, lam=0.015)
    w.grad = T([[0.5, -3.0]])
    opt.step()
    # step 1: m_hat = g, v_hat = g^2 -> d = g/(|g| + eps) = sign(g); W1 = W - a k d - a k W/mu
    close(w.detach(), [[1.0 - 0.2 - 0.02, -2.0 + 0.2 + 0.04]], 1e-5)
    close(opt.state[w]["z"], [[0.01, -0.02]])


def test_slbi_adam_plain_parameters_step_exactly_as_torch_adam_with_lr_times_kappa():
    """A parameter without penalty takes W <- W - a*kappa*d with Adam's d: torch.optim.Adam at lr
    a*kappa is the reference (betas, eps and weight decay all away from their defaults, 4 steps)."""
    torch.manual_seed(0)
    w0 = torch.randn(3, 4, dtype=torch.float64)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    w, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = SLBIAdam([w], lr=0.05, kappa=2.0, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, penalty=None)
    adam = torch.optim.Adam([ref], lr=0.1, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)
    for g in grads:
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        adam.step()
        assert torch.allclose(w, ref, atol=1e-12, rtol=0)
    assert "z" not in opt.state[w]


def test_slbi_adam_sparse_parameters_follow_the_slbi_equations_with_the_adam_direction():
    """Hand-written reference over 3 steps: d = m_hat/(sqrt(v_hat)+eps) of g + wd*W, then
    W <- W - a k d - (a k/mu)(W - Gamma), z <- z + (a/mu)(W - Gamma), Gamma <- k soft(z, lam)."""
    torch.manual_seed(1)
    a, k, mu, lam, b1, b2, eps, wd = 0.3, 2.0, 5.0, 0.05, 0.8, 0.95, 1e-3, 0.1
    w0 = torch.randn(2, 3, dtype=torch.float64)
    grads = [torch.randn(2, 3, dtype=torch.float64) for _ in range(3)]
    w = nn.Parameter(w0.clone())
    opt = SLBIAdam([w], lr=a, kappa=k, mu=mu, lam=lam, betas=(b1, b2), eps=eps, weight_decay=wd,
                   penalty="elementwise")
    W, z, gam = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    m, v = torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        gg = g + wd * W
        m, v = b1 * m + (1 - b1) * gg, b2 * v + (1 - b2) * gg * gg
        d = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        W, z = W - a * k * d - (a * k / mu) * (W - gam), z + (a / mu) * (W - gam)
        gam = k * torch.sign(z) * (z.abs() - lam).clamp_min(0)
        assert torch.allclose(w, W, atol=1e-12, rtol=0), t
        assert torch.allclose(opt.state[w]["z"], z, atol=1e-12, rtol=0)
        assert torch.allclose(opt.state[w]["gamma"], gam, atol=1e-12, rtol=0)
    assert (gam == 0).any() and (gam != 0).any()  # lam 0.05 thresholds some entries, not all


def test_slbi_adam_defaults_and_argument_checks():
    w = nn.Parameter(torch.zeros(2, 2))
    group = SLBIAdam([w]).param_groups[0]
    assert (group["lr"], group["kappa"], group["mu"], group["lam"], group["betas"], group["eps"]) == \
        (1e-3, 1.0, 100.0, 1.0, (0.9, 0.999), 1e-8)
    assert group["momentum"] == 0.0 and group["weight_decay"] == 0.0
    SLBIAdam([w], betas=(0.0, 0.0))  # 0 is a valid beta (no averaging)
    for betas in ((1.0, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9, -0.1)):
        with pytest.raises(ConfigError, match="betas"):
            SLBIAdam([w], betas=betas)
    for eps in (0.0, -1e-8, float("nan")):
        with pytest.raises(ConfigError, match="SLBI eps must be positive"):
            SLBIAdam([w], eps=eps)


def test_param_groups_and_overrides():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    groups = slbi_param_groups(model, lam=0.5, fc_lam=0.1)
    kinds = {g["penalty"]: g for g in groups}
    assert kinds["group"]["params"] == [model[0].weight] and kinds["group"]["lam"] == 0.5
    assert kinds["elementwise"]["params"] == [model[3].weight] and kinds["elementwise"]["lam"] == 0.1
    assert len(kinds[None]["params"]) == 4  # conv bias, BN weight and bias, linear bias
    opt = SLBI(groups, lr=0.1)
    assert set(opt.state) == {model[0].weight, model[3].weight}
    only = slbi_param_groups(model, layers=["3"])
    assert [g["penalty"] for g in only] == ["elementwise", None]
    with pytest.raises(ConfigError, match="slbi layers not in the model: nope, other"):
        slbi_param_groups(model, layers=["other", "nope", "3"])
    # a frozen parameter is left out, and the module's other parameters still come in
    model[3].weight.requires_grad_(False)
    groups = {g["penalty"]: g["params"] for g in slbi_param_groups(model)}
    assert any(p is model[3].bias for p in groups[None])
    assert all(model[3].weight is not p for ps in groups.values() for p in ps)
    assert groups.get("elementwise", []) == []  # its only linear weight is frozen


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0.0), "SLBI lr must be positive"), (dict(lr=-1.0), "SLBI lr must be positive"),
    (dict(kappa=0.0), "SLBI kappa must be positive"), (dict(mu=0.0), "SLBI mu must be positive"),
    (dict(lam=-0.1), "SLBI lam must be non-negative"), (dict(lr=float("nan")), "SLBI lr must be positive"),
    (dict(weight_decay=-1e-4), "SLBI weight_decay must be non-negative"),
    (dict(momentum=1.0), "momentum must be in"), (dict(momentum=-0.1), "momentum must be in"),
    (dict(penalty="l1"), "penalty must be"), (dict(compiled="yes"), "compiled must be True, False or 'auto'")])
def test_bad_hyperparameters_raise_config_error_naming_the_argument(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SLBI([nn.Parameter(torch.zeros(2, 2))], **{"lr": 0.1, **kwargs})


def test_a_group_lambda_is_checked_too_and_zero_is_valid():
    w = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ConfigError, match="SLBI lam must be non-negative"):
        SLBI([{"params": [w], "lam": -1.0}], lr=0.1)
    SLBI([w], lr=0.1, lam=0.0, weight_decay=0.0, momentum=0.0)  # the boundaries are allowed


def test_group_penalty_on_a_matrix_thresholds_whole_rows():
    """A 2-D weight under the group penalty: one group per row (output unit). One step from
    W = [[3, 4], [0.3, 0.4]] with momentum 0, no gradient: z = (a/mu) W = [[0.3, 0.4], [0.03, 0.04]],
    row norms 0.5 and 0.05; lam 0.1 keeps row 0 scaled by 1 - 0.1/0.5 = 0.8 and zeroes row 1."""
    w = nn.Parameter(T([[3.0, 4.0], [0.3, 0.4]]))
    opt = SLBI([{"params": [w], "penalty": "group"}], lr=1.0, kappa=1.0, mu=10.0, lam=0.1, momentum=0.0)
    w.grad = torch.zeros_like(w)
    opt.step()
    close(opt.state[w]["z"], [[0.3, 0.4], [0.03, 0.04]])
    close(opt.state[w]["gamma"], [[0.24, 0.32], [0.0, 0.0]])


# -- resume and the compiled step -----------------------------------------------------------------

def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_resumed_slbi_matches_uninterrupted_run_exactly():
    batches = _batches(6)
    ref = _tiny_net()
    opt = SLBI(slbi_param_groups(ref, lam=0.01), lr=0.5, mu=5.0, weight_decay=1e-3)
    _train(ref, opt, batches)
    assert any(bool((opt.state[p]["gamma"] != 0).any()) for p in (ref[0].weight, ref[4].weight))

    first = _tiny_net()
    opt1 = SLBI(slbi_param_groups(first, lam=0.01), lr=0.5, mu=5.0, weight_decay=1e-3)
    _train(first, opt1, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _tiny_net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = SLBI(slbi_param_groups(resumed, lam=0.01), lr=0.5, mu=5.0, weight_decay=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, batches[3:])
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
                    reason="no C++ compiler for inductor")
def test_compiled_step_matches_eager():
    # training's default (--slbi-fused auto) is the compiled step: pin it to the eager one with
    # every term of the update switched on - kappa != 1 (a/mu vs a*kappa/mu in z), weight decay,
    # a conv (group prox) and a linear (element-wise prox) layer, momentum over several steps
    batches = _batches(4)
    nets, opts = [], []
    for compiled in (False, True):
        net = _tiny_net()
        opt = SLBI(slbi_param_groups(net, lam=0.01), lr=0.1, kappa=2.0, mu=5.0, weight_decay=0.05,
                   compiled=compiled)
        _train(net, opt, batches)
        nets.append(net)
        opts.append(opt)
    assert opts[1].compiled is True  # steps 2-4 ran compiled (True never falls back)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
        assert set(opts[1].state[q]) == set(opts[0].state[p])
        for key, value in opts[0].state[p].items():
            torch.testing.assert_close(opts[1].state[q][key], value, atol=1e-6, rtol=1e-5, msg=key)
    # both proximal maps were active, so Gamma's agreement means something
    for layer in (nets[0][0], nets[0][4]):
        assert bool((opts[0].state[layer.weight]["gamma"] != 0).any())


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
                    reason="no C++ compiler for inductor")
def test_compiled_step_follows_a_changing_lr_in_float64_with_penalty_auto():
    """What a scheduled run does: the lr changes between steps (the fused step's hyper-parameter
    tensor must be rebuilt, not served stale from its cache), parameters in float64 (the
    hyper-parameters in the parameters' dtype), one group with penalty "auto" (resolved per
    parameter inside the fused step). compiled=True never falls back to the eager step."""
    batches = _batches(4)
    nets, opts = [], []
    for compiled in (False, True):
        net = _tiny_net().double()
        opt = SLBI(net.parameters(), lr=0.2, kappa=2.0, mu=5.0, lam=0.01, weight_decay=0.05, compiled=compiled)
        for i, (x, y) in enumerate(batches):
            opt.param_groups[0]["lr"] = 0.2 / (1 + i)  # 0.2, 0.1, 0.0667, 0.05
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x.double()), y).backward()
            opt.step()
        nets.append(net)
        opts.append(opt)
    assert opts[1].compiled is True
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(q, p, atol=1e-12, rtol=1e-10)
        for key, value in opts[0].state[p].items():
            torch.testing.assert_close(opts[1].state[q][key], value, atol=1e-12, rtol=1e-10, msg=key)


def test_step_ratio_reports_both_timings():
    # timings are not asserted (no timing assertions in tests): the record's structure, its
    # settings, the ratio being that of the two recorded figures, and the caller's model untouched
    model = _tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = slbi_step_ratio(model=model, model_name="tiny", repeats=2, momentum=0.8, weight_decay=1e-3)
    assert set(r) == {"model", "device", "params", "repeats", "momentum", "weight_decay", "threads",
                      "sgd_ms", "slbi_ms", "ratio"}
    assert (r["model"], r["device"], r["repeats"], r["momentum"], r["weight_decay"]) == ("tiny", "cpu", 2, 0.8, 1e-3)
    assert r["params"] == 36 + 4 + 4 + 4 + 64 * 3 + 3  # conv 4x1x3x3+4, BN 4+4, linear 64x3+3
    assert r["ratio"] == r["slbi_ms"] / r["sgd_ms"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# -- the toolbox ----------------------------------------------------------------------------------

def _opt_with_gamma(model, gammas: dict):
    opt = SLBI(slbi_param_groups(model), lr=0.1)
    for name, g in gammas.items():
        opt.state[model.get_submodule(name).weight]["gamma"] = g
    return opt


def test_w_star_swap_and_restore_round_trip_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.Flatten(), nn.Linear(3, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gconv = torch.zeros(3, 1, 2, 2)
    gconv[1] = 0.5
    glin = T([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    opt = _opt_with_gamma(model, {"0": gconv, "2": glin})
    with tb.use_w_star(model, opt):
        assert torch.equal(model[0].weight[[0, 2]], torch.zeros(2, 1, 2, 2))
        assert torch.equal(model[0].weight[1], before["0.weight"][1])
        assert torch.equal(model[2].weight, before["2.weight"] * (glin != 0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError):
        with tb.use_w_star(model, opt):
            raise RuntimeError("boom")
    assert torch.equal(model[0].weight, before["0.weight"])
    sel = {r["layer"]: r for r in tb.selection(model, opt)}
    assert (sel["0"]["selected"], sel["0"]["total"]) == (1, 3)
    assert (sel["2"]["selected"], sel["2"]["total"], sel["2"]["units_selected"]) == (2, 6, 2)


def test_first_activation_record():
    model = nn.Sequential(nn.Linear(2, 2))
    opt = _opt_with_gamma(model, {"0": T([[0.0, 1.0], [0.0, 0.0]])})
    rec = tb.new_first_epoch_record(model, opt)
    tb.update_first_epoch(rec, model, opt, 3)
    opt.state[model[0].weight]["gamma"] = T([[1.0, 1.0], [0.0, 0.0]])
    tb.update_first_epoch(rec, model, opt, 5)
    assert rec["0"].tolist() == [[5, 3], [tb.NEVER, tb.NEVER]]


def test_prune_order_and_percentiles_on_a_hand_made_layer():
    conv = nn.Conv2d(1, 5, (1, 2))
    with torch.no_grad():  # filter norms 5, 1, 2, 10, 3
        conv.weight.copy_(T([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0], [3.0, 0.0]]).view(5, 1, 1, 2))
        conv.bias.copy_(T([1.0, 2.0, 3.0, 4.0, 5.0]))
    first = torch.full((5, 1, 1, 2), tb.NEVER, dtype=torch.int32)
    first[1, 0, 0, 0] = 2  # filter 1 activated in epoch 2, filter 2 in epoch 7
    first[2, 0, 0, 1] = 7
    order = tb.prune_order(conv.weight, first)
    close(order, [5.0 - 2000, 1.0 - 2, 2.0 - 7, 10.0 - 2000, 3.0 - 2000])
    # sorted orders: -1997, -1995, -1990, -5, -1; 40th percentile (linear) = -1995 + 0.6*5 = -1992
    keep = tb.percentile_keep(order, 40)
    assert keep.tolist() == [False, True, True, True, False]
    assert tb.percentile_keep(order, 0).all()
    assert tb.percentile_keep(order, 80).tolist() == [False, True, False, False, False]
    # linear: |W| - epoch, element-wise
    assert tb.prune_order(T([[-3.0, 1.0]]), torch.tensor([[1, 2000]], dtype=torch.int32)).tolist() == [[2.0, -1999.0]]
    with pytest.raises(ConfigError):
        tb.percentile_keep(order, 120)


def test_prune_layers_zeroes_filters_and_bias_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 5, (1, 2)), nn.Flatten(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight.copy_(T([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0], [3.0, 0.0]]).view(5, 1, 1, 2))
        model[2].weight.copy_(T([[0.1, -0.2, 0.3, -0.4, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tb.prune_layers(model, ["0", "2.weight"], 40) as h:
        # magnitude order without a record: norms 5,1,2,10,3 -> 40th pct = 2.6: filters 1, 2 go
        assert h.keep["0"].tolist() == [True, False, False, True, True]
        assert torch.equal(model[0].weight[[1, 2]], torch.zeros(2, 1, 1, 2))
        assert model[0].bias[[1, 2]].abs().sum() == 0 and model[0].bias[[0, 3, 4]].ne(0).all()
        # linear: 40th percentile of |W| (10 entries) = 0.46: the four smallest entries go
        assert int((model[2].weight == 0).sum()) == 4
        assert model[2].bias.ne(0).all()  # no unit lost every weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ConfigError, match="not in the model"):
        tb.prune_layers(model, ["conv9"], 10)
    with pytest.raises(ConfigError, match="not a conv or linear"):
        tb.prune_layers(model, ["1"], 10)


def test_kernel_tile_layout():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    tile = tb.kernel_tile(w, rows=2, cols=3)
    assert tile.shape == (4, 6)
    assert tile[2:4, 4:6].tolist() == w[1, 2].tolist()  # kernel (out 1, in 2) at block row 1, col 2


# -- physical pruning -----------------------------------------------------------------------------

class _TinyLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv3 = nn.Conv2d(4, 6, 3)
        self.fc1 = nn.Linear(6 * 2 * 2, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.conv3(F.max_pool2d(F.relu(self.conv1(x)), 2)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)


class _TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.block = _Block(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


def test_physically_pruned_lenet_computes_the_masked_model():
    torch.manual_seed(0)
    model = _TinyLeNet().eval()
    x = torch.randn(16, 1, 10, 10)
    reference = model(x)
    keep = {"conv3": T([1, 0, 1, 0, 0, 1]).bool(), "fc1": T([1, 1, 0, 1, 1]).bool()}
    masked, pruned, plan = export_pruned(model, keep, x[:2])
    assert {p.layer: p.idxs for p in plan} == {"conv3": [1, 3, 4], "fc1": [2]}
    assert torch.equal(model(x), reference)  # the input model is untouched
    assert (pruned.conv3.out_channels, pruned.fc1.in_features, pruned.fc1.out_features) == (3, 12, 4)
    assert not torch.allclose(masked(x), reference)  # masking changed the function ...
    info = compare_models(masked, pruned, x, repeats=2)
    assert info["max_abs_diff"] < 1e-5  # ... and the smaller model computes exactly that
    assert info["params_after"] < info["params_before"] and info["flops_after"] < info["flops_before"]


def test_physically_pruned_resnet_block_computes_the_masked_model():
    torch.manual_seed(0)
    model = _randomise_bn(_TinyResNet())
    x = torch.randn(8, 1, 6, 6)
    # the residual stream (stem, block.c2) is shared: only channel 1, wanted gone by both, can go
    keep = {"stem": T([1, 0, 1, 0]).bool(), "block.c1": T([0, 1, 1, 1]).bool(), "block.c2": T([1, 0, 0, 1]).bool()}
    masked, pruned, plan = export_pruned(model, keep, x[:2])
    assert {p.layer: p.idxs for p in plan} == {"stem": [1], "block.c1": [0]}
    assert pruned.stem.out_channels == 3 and pruned.block.c2.out_channels == 3 and pruned.block.c1.out_channels == 3
    assert pruned.fc.in_features == 3
    info = compare_models(masked, pruned, x, repeats=2)
    assert info["max_abs_diff"] < 1e-5
    assert not torch.allclose(masked(x), model(x))


def test_a_layer_keeps_at_least_one_channel():
    model = _TinyLeNet().eval()
    x = torch.randn(4, 1, 10, 10)
    masked, pruned, plan = export_pruned(model, {"conv1": torch.zeros(4, dtype=torch.bool)}, x[:2])
    assert pruned.conv1.out_channels == 1
    assert torch.allclose(masked(x), pruned(x), atol=1e-5)


# -- through the Trainer and the CLI --------------------------------------------------------------

def _tiny_flags(run_dir, *extra):
    return ["slbi", "--model", "lenet5", "--dataset", "synthetic:1x28x28", "--train-subset", "256",
            "--test-subset", "128", "--batch-size", "64", "--epochs", "2", "--device", "cpu",
            "--progress", "off", "--no-augment", "--run-dir", str(run_dir), *extra]


def test_slbi_run_through_the_trainer_and_cli(tmp_path):
    from cifarlab.cli import main

    run = tmp_path / "slbi"
    assert main(_tiny_flags(run, "--optimizer", "slbi", "--lr", "0.1", "--slbi-mu", "20", "--weight-decay", "0",
                            "--prune-percents", "20,80")) == 0
    metrics = pd.read_csv(run / "metrics.csv")
    for col in ("val_acc_wstar", "val_loss_wstar", "slbi_filters", "slbi_filter_ratio", "slbi_weight_ratio"):
        assert col in metrics.columns, col
    path = pd.read_csv(run / "slbi_path.csv")
    assert sorted(path["layer"].unique()) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert path["epoch"].tolist().count(2) == 5
    first = torch.load(run / "slbi_first_epoch.pt", weights_only=True)
    assert first["conv3"].shape == (120, 16, 5, 5)
    table = pd.read_csv(run / "prune_table.csv")
    assert set(table["layers"]) == {"none", "w_star", "conv3", "conv3+fc1"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is True and "test_acc_wstar" in summary
    for export in json.loads((run / "physical_prune.json").read_text()):
        assert export["masked_test_acc"] == export["pruned_test_acc"]
        assert export["max_abs_diff"] < 1e-4
    assert (run / "kernels_conv3_w_star.npy").is_file()

    # fine-tuning with the mask keeps the pruned weights at zero
    ft = tmp_path / "ft"
    assert main(_tiny_flags(ft, "--optimizer", "sgd", "--lr", "0.01", "--epochs", "1", "--prune-layers", "",
                            "--finetune-from", str(run))) == 0
    ck = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    ft_ck = torch.load(ft / "checkpoints" / "last.pt", weights_only=True)
    masks = next(state["masks"] for state in ft_ck["callbacks"] if "masks" in state)
    assert set(masks) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    for name, mask in masks.items():
        assert torch.equal(ft_ck["model"][f"{name}.weight"] * ~mask, torch.zeros_like(mask, dtype=torch.float32))
    assert ck["config"]["optimizer"] == "slbi"


def test_cli_rejects_bad_slbi_input(tmp_path):
    from cifarlab.cli import main

    assert main(_tiny_flags(tmp_path / "a", "--optimizer", "slbi", "--prune-percents", "5,150")) == 2
    assert main(_tiny_flags(tmp_path / "b", "--optimizer", "slbi", "--finetune-from", str(tmp_path))) == 2
    with pytest.raises(CifarlabError):
        from cifarlab.commands.slbi import _parse_percents

        _parse_percents("a,b")


# -- the default fused step and its fallback -------------------------------------------------------

def test_auto_falls_back_to_the_exact_eager_step_when_compiling_fails(monkeypatch):
    import cifarlab.optim.slbi as slbi_module

    def broken():
        def fail(*args):
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setattr(slbi_module, "_compiled_pointwise", broken)
    monkeypatch.setattr(slbi_module, "fused_step_available", lambda device: True)
    batches = _batches(4)
    nets, opts = [], []
    for compiled in (False, "auto"):
        net = _tiny_net()
        opt = SLBI(slbi_param_groups(net, lam=0.01), lr=0.5, mu=5.0, weight_decay=1e-3, compiled=compiled)
        nets.append(net)
        opts.append(opt)
    _train(nets[0], opts[0], batches)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        _train(nets[1], opts[1], batches)
    assert opts[1].compiled is False
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)
    # asked for explicitly, a compiler failure is an error, not a silent fallback
    net = _tiny_net()
    opt = SLBI(slbi_param_groups(net, lam=0.01), lr=0.5, mu=5.0, compiled=True)
    with pytest.raises(RuntimeError, match="no compiler"):
        _train(net, opt, batches)


def test_fallback_updates_every_penalty_kind_of_one_mixed_group(monkeypatch):
    import cifarlab.optim.slbi as slbi_module

    # one parameter group, penalty "auto": the conv weight (group), the linear weight (element-wise)
    # and the rest (plain) share it; when compiling fails on the first kind, the other kinds must
    # still take their eager step
    calls = []

    def broken():
        def fail(*args):
            calls.append(len(args[0]))
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setattr(slbi_module, "_compiled_pointwise", broken)
    monkeypatch.setattr(slbi_module, "fused_step_available", lambda device: True)
    batches = _batches(3)
    nets = [_tiny_net(), _tiny_net()]
    opts = [SLBI(net.parameters(), lr=0.5, mu=5.0, lam=0.01, weight_decay=1e-3, compiled=c)
            for net, c in zip(nets, (False, "auto"))]
    _train(nets[0], opts[0], batches)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        _train(nets[1], opts[1], batches)
    # the first fused step (step 2: momentum buffers exist) tries each sparse kind once, conv then
    # linear weight; every later step is eager
    assert calls == [1, 1]
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_auto_resolves_to_the_eager_step_where_no_compiler_is_available(monkeypatch):
    import cifarlab.optim.slbi as slbi_module

    built = []
    monkeypatch.setattr(slbi_module, "_compiled_pointwise", lambda: built.append(1))
    monkeypatch.setattr(slbi_module, "fused_step_available", lambda device: False)
    net = _tiny_net()
    opt = SLBI(slbi_param_groups(net, lam=0.01), lr=0.5, compiled="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "torch.compile failed" fallback either
        _train(net, opt, _batches(3))
    assert opt.compiled is False and built == []


def test_slbi_defaults_are_the_papers():
    w = nn.Parameter(torch.ones(2, 2))
    opt = SLBI([w], lr=0.1)
    d = opt.defaults
    assert (d["kappa"], d["mu"], d["lam"], d["momentum"], d["weight_decay"], d["penalty"]) == (1.0, 100.0, 1.0, 0.9, 0.0, "auto")
    assert opt.compiled is False  # the eager step unless asked (the trainer passes --slbi-fused)


@pytest.mark.parametrize("flag, expected", [("auto", "auto"), ("on", True), ("off", False)])
def test_slbi_fused_flag_reaches_the_optimizer(flag, expected):
    from cifarlab.config import make_config
    from cifarlab.optim import build_optimizer

    opt = build_optimizer(make_config(model="lenet5", optimizer="slbi", slbi_fused=flag), _tiny_net())
    assert opt.compiled == expected
    with pytest.raises(ConfigError):
        make_config(model="lenet5", optimizer="slbi", slbi_fused="yes")


def test_param_groups_carry_lambda_only_when_given():
    """Group values override the optimizer's arguments: a default lam written into every group
    would make SLBI(slbi_param_groups(m), lam=0.5) train with lambda 1."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    opt = SLBI(slbi_param_groups(model), lr=0.1, lam=0.5)
    sparse = [g for g in opt.param_groups if g["penalty"] is not None]
    assert [g["lam"] for g in sparse] == [0.5, 0.5]
    opt = SLBI(slbi_param_groups(model, lam=2.0, fc_lam=3.0), lr=0.1, lam=0.5)
    assert {g["penalty"]: g["lam"] for g in opt.param_groups if g["penalty"]} == {"group": 2.0, "elementwise": 3.0}
    opt = SLBI(slbi_param_groups(model, fc_lam=3.0), lr=0.1, lam=0.5)
    assert {g["penalty"]: g["lam"] for g in opt.param_groups if g["penalty"]} == {"group": 0.5, "elementwise": 3.0}
