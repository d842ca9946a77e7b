"""EDropout (issue 8): the search rules on hand-worked examples, the masks in forward and
gradient, dropped weights surviving and reviving, F mode, the pruned export, state round trip,
and a run through the Trainer."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarlab.edropout.export import export_pruned
from cifarlab.config import make_config
from cifarlab.edropout import search as S
from cifarlab.edropout.callback import EDropout, callbacks_from_config
from cifarlab.edropout.unit_masks import UnitMasks, find_units
from cifarlab.errors import ConfigError

B = torch.bool


def bits(*rows):
    return torch.tensor([[int(c) for c in r] for r in rows], dtype=B)


class TinyNet(nn.Module):
    """Two residual streams, a downsample conv + BN, a conv without BN, a classifier.

    Units (26): conv1 0-3, conv2 4-7, down 8-13, conv3 14-19, fc inputs 20-25.
    Params: conv1 108, bn1 8, conv2 144, bn2 8, down 24, bnd 12, conv3 222, fc 35 = 561.
    """

    def __init__(self, c_in=3, n_cls=5):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 6, 1, stride=2, bias=False)
        self.bnd = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
        self.fc = nn.Linear(6, n_cls)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(a + self.bn2(self.conv2(a)))
        c = F.relu(self.bnd(self.down(b)) + self.conv3(b))
        return self.fc(c.mean((2, 3)))


def tiny(seed=0):
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return net


def fake_trainer(model, opt=None, epoch=1):
    return SimpleNamespace(model=model, optimizer=opt, device=torch.device("cpu"), epoch=epoch,
                           cfg=SimpleNamespace(compile=False), autocast=lambda: torch.autocast("cpu", enabled=False),
                           loss_fn=lambda z, t: F.cross_entropy(z, t), rundir=None, run_dir=None)


# --- the search rules ----------------------------------------------------------------------------

def test_margin_energy_by_hand():
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    # margins: 2 - 1 = 1 ; 1 - 3 = -2 ; mean -0.5 ; cost = -10 * -0.5 = 5
    assert S.margin_energy(logits, y).item() == pytest.approx(5.0)
    stacked = torch.stack([logits, logits * 2])  # a leading candidate dimension
    assert S.margin_energy(stacked, y).tolist() == pytest.approx([5.0, 10.0])


def test_mutation_rules_on_every_case():
    # donors of candidate 0 are candidates 1, 2, 3; genes enumerate (x1, x2, x3) = all 8 cases
    pop = bits("00000000", "00001111", "00110011", "01010101")
    donors = torch.tensor([[1, 2, 3]] * 4)
    hit = torch.zeros(4, 8)  # r < 0.1 everywhere: every gene mutates
    miss = torch.ones(4, 8)
    # x1     = 0 0 0 0 1 1 1 1
    # x2==x3 = 1 0 0 1 1 0 0 1
    # original: 1-x1 where x2==x3 else 0 -> 1 0 0 1 0 0 0 0
    assert S.mutate(pop, donors, hit, "original")[0].int().tolist() == [1, 0, 0, 1, 0, 0, 0, 0]
    # textbook: 1-x1 where x2!=x3 else x1 -> 0 1 1 0 1 0 0 1
    assert S.mutate(pop, donors, hit, "textbook")[0].int().tolist() == [0, 1, 1, 0, 1, 0, 0, 1]
    for rule in ("original", "textbook"):  # untouched genes copy x1
        assert S.mutate(pop, donors, miss, rule)[0].int().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        S.mutate(pop, donors, hit, "other")


def test_crossover_and_selection_by_hand():
    parent = bits("0000", "1111")
    mutant = bits("1111", "0000")
    r = torch.tensor([[0.5, 0.95, 0.95, 0.2], [0.99, 0.99, 0.99, 0.99]])
    jrand = torch.tensor([2, 0])
    # row 0: r < 0.9 at genes 0 and 3, forced gene 2 -> 1 0 1 1; row 1: only the forced gene 0
    assert S.crossover(parent, mutant, r, jrand).int().tolist() == [[1, 0, 1, 1], [0, 1, 1, 1]]
    pop, costs = bits("00", "01", "10"), torch.tensor([1.0, 2.0, 3.0])
    trial, tcost = bits("11", "11", "11"), torch.tensor([0.5, 2.0, 4.0])
    new, ncost = S.select(pop, costs, trial, tcost)
    # strictly better replaces (0); a tie keeps the parent (1); worse keeps the parent (2)
    assert new.int().tolist() == [[1, 1], [0, 1], [1, 0]] and ncost.tolist() == [0.5, 2.0, 3.0]


def test_one_generation_on_a_fixed_seed_by_hand():
    pop = bits("101011", "001101", "110010", "011110")
    g = torch.Generator().manual_seed(0)
    donors, r_mut, r_cross, jrand = S.draw_trial_randoms(4, 6, g)
    # the seed-0 draws this example is worked from
    assert donors.tolist() == [[2, 3, 1], [0, 2, 3], [3, 0, 1], [0, 1, 2]]
    assert torch.nonzero(r_mut < 0.1).tolist() == [[1, 5], [3, 1]]  # the only mutated genes
    assert torch.nonzero(r_cross >= 0.9).tolist() == [[1, 5]]  # the only parent gene (not j_rand)
    assert jrand.tolist() == [1, 2, 4, 4]
    # row 0: x1 = P2 = 110010, no mutation, all mutant genes        -> 110010
    # row 1: x1 = P0 = 101011; gene 5 mutates: x2 = P2[5] = 0 == x3 = P3[5] = 0 -> 1 - 1 = 0,
    #        but crossover keeps the parent's gene 5 (1)             -> 101011
    # row 2: x1 = P3 = 011110                                         -> 011110
    # row 3: x1 = P0 = 101011; gene 1: x2 = P1[1] = 0 != x3 = P2[1] = 1
    #        original -> 0 (x1 already 0) -> 101011; textbook -> flip -> 111011
    g = torch.Generator().manual_seed(0)
    assert S.trial_population(pop, g, "original").int().tolist() == [
        [1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0], [1, 0, 1, 0, 1, 1]]
    g = torch.Generator().manual_seed(0)
    assert S.trial_population(pop, g, "textbook")[3].int().tolist() == [1, 1, 1, 0, 1, 1]


def test_donors_are_three_distinct_others():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        d = S.draw_donors(5, g)
        for i, row in enumerate(d.tolist()):
            assert len(set(row)) == 3 and i not in row


def test_random_state_and_initial_population():
    g = torch.Generator().manual_seed(0)
    assert int(S.random_state(40, 0.25, g).sum()) == 10
    pop = S.init_population(8, 1000, 0.5, torch.Generator().manual_seed(0))
    assert pop.dtype == B and pop.shape == (8, 1000) and 0.45 < pop.float().mean().item() < 0.55


def test_convergence_ring():
    hist = torch.full((9,), float("nan"))
    rep, hist = S.convergence_step(hist, torch.tensor(3.0))
    assert not rep  # NaN slots never match
    rep, hist = S.convergence_step(hist, torch.tensor(2.0))
    assert not rep
    rep, hist = S.convergence_step(hist, torch.tensor(3.0))
    assert rep  # 3.0 is among the previous best costs
    for v in range(10, 19):  # push 3.0 out of the last 9
        _, hist = S.convergence_step(hist, torch.tensor(float(v)))
    assert not S.convergence_step(hist, torch.tensor(3.0))[0]


# --- units and masks ------------------------------------------------------------------------------

def test_units_of_the_tiny_net_and_resnet18():
    layers = find_units(tiny())
    assert [(l.name, l.bn_name, l.offset, l.size) for l in layers] == [
        ("conv1", "bn1", 0, 4), ("conv2", "bn2", 4, 4), ("down", "bnd", 8, 6), ("conv3", None, 14, 6),
        ("fc", None, 20, 6)]
    from cifarlab.models import build_model

    # one unit per conv filter (with its BN) + 512 classifier inputs; the released code's 6208
    # counted the three downsample BNs again (+128 +256 +512)
    assert sum(l.size for l in find_units(build_model("resnet18"))) == 5312


def drop_state(d, dropped):
    s = torch.ones(d, dtype=B)
    s[list(dropped)] = False
    return s


def test_masks_zero_chosen_filters_and_neurons_in_forward_and_gradient():
    net = tiny()
    masks = UnitMasks(net).install()
    state = drop_state(26, [1, 4, 7, 9, 15, 18, 22])  # conv1 1; conv2 0, 3; down 1; conv3 1, 4; fc 2
    masks.set_state(state)
    seen = {}
    for name in ("bn1", "bn2", "bnd", "conv3"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    net.fc.register_forward_pre_hook(lambda m, i: seen.__setitem__("fc_in", i[0]))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    for mode in ("train", "eval"):
        getattr(net, mode)()
        out = net(x)
        for name, dropped in (("bn1", [1]), ("bn2", [0, 3]), ("bnd", [1]), ("conv3", [1, 4])):
            o = seen[name]
            keep = [c for c in range(o.shape[1]) if c not in dropped]
            assert torch.all(o[:, dropped] == 0), (mode, name)
            assert torch.all(o[:, keep].abs().sum((0, 2, 3)) > 0), (mode, name)
        m = torch.ones(6)
        m[2] = 0
        assert torch.allclose(out, F.linear(seen["fc_in"] * m, net.fc.weight, net.fc.bias))
    net.train()
    F.cross_entropy(net(x), y).backward()
    g = net.conv1.weight.grad.abs().sum((1, 2, 3))
    assert g[1] == 0 and torch.all(g[[0, 2, 3]] > 0)
    g = net.conv2.weight.grad.abs().sum((1, 2, 3))
    assert torch.all(g[[0, 3]] == 0) and torch.all(g[[1, 2]] > 0)
    assert torch.all(net.bn2.weight.grad[[0, 3]] == 0) and torch.all(net.bn2.bias.grad[[0, 3]] == 0)
    assert net.down.weight.grad[1].abs().sum() == 0
    assert torch.all(net.conv3.weight.grad[[1, 4]] == 0) and torch.all(net.conv3.bias.grad[[1, 4]] == 0)
    assert torch.all(net.fc.weight.grad[:, 2] == 0) and torch.all(net.fc.weight.grad[:, [0, 3]].abs().sum(0) > 0)
    assert torch.all(net.fc.weight.grad[:, 1] == 0)  # channel 1: both its writers (down, conv3) dropped


def test_full_mode_equals_the_unmasked_model():
    import copy

    net = tiny()
    plain = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    masks = UnitMasks(net).install()
    masks.set_state(drop_state(26, [0, 5, 20]))
    net.eval()
    net(x)
    masks.full()
    for mode in ("train", "eval", "train"):  # train mode also updates both models' BN stats alike
        getattr(net, mode)()
        getattr(plain, mode)()
        assert torch.equal(net(x), plain(x)), mode
    masks.remove()
    assert "forward" not in net.bn1.__dict__


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_candidate_scoring_equals_one_masked_forward_per_candidate(mode):
    net = getattr(tiny(), mode)()
    cb = EDropout(states=4, seed=1, export=False)
    cb.setup(net, "cpu")
    # conv2 reads relu(bn1(conv1)); down and conv3 read a residual sum (no single writer)
    assert [l.input_from for l in cb.masks.layers] == [None, "conv1", None, None, None]
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 5, (5,))
    pop = S.init_population(4, 26, 0.5, torch.Generator().manual_seed(2))
    pop[1, 0:4] = False  # a layer with every filter dropped (the probe falls back to masking)
    ref = []
    for s in pop:  # a separate masked forward per candidate (in train mode it updates BN stats)
        cb.masks.set_state(s)
        with torch.no_grad():
            ref.append(S.margin_energy(net(x), y))
    ref = torch.stack(ref)
    before = [b.clone() for b in net.buffers()]
    for probe, chunk in ((False, None), (False, 1), (True, None)):  # stacked, stacked 1 by 1, probe
        cb.probe, cb.chunk = probe, chunk
        assert torch.allclose(cb.score(net, pop, x, y), ref, atol=1e-5), (probe, chunk)
    # scoring leaves the BN statistics alone
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))


def test_dropped_weights_survive_masked_steps_and_revive():
    net = tiny().train()
    # momentum and weight decay would move zero-gradient weights: the callback undoes that
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    cb = EDropout(states=4, random_keep=0.5, seed=0, export=False)
    cb.setup(net, "cpu")
    cb.state = drop_state(26, [1, 4, 9, 15, 22])
    trainer = fake_trainer(net, opt)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}

    def step():
        logits, loss = cb.forward_loss(trainer, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        cb.on_after_backward(trainer)
        opt.step()
        cb.on_batch_end(trainer, loss.detach())

    for _ in range(3):
        step()
    p = dict(net.named_parameters())
    assert torch.equal(p["conv1.weight"][1], w0["conv1.weight"][1])
    assert torch.equal(p["bn1.weight"][1], w0["bn1.weight"][1]) and torch.equal(p["bn1.bias"][1], w0["bn1.bias"][1])
    assert torch.equal(p["conv2.weight"][0], w0["conv2.weight"][0])
    assert torch.equal(p["down.weight"][1], w0["down.weight"][1])
    assert torch.equal(p["conv3.weight"][1], w0["conv3.weight"][1]) and p["conv3.bias"][1] == w0["conv3.bias"][1]
    assert torch.equal(p["fc.weight"][:, 2], w0["fc.weight"][:, 2])
    assert not torch.equal(p["conv1.weight"][0], w0["conv1.weight"][0])  # kept units train
    # revive: the unit's bit returns -> its kept weights act in the forward and train again
    cb.state = torch.ones(26, dtype=B)
    net.eval()
    cb.masks.set_state(cb.state)
    on = net(x)
    cb.masks.set_state(drop_state(26, [1]))
    assert not torch.allclose(on, net(x))
    net.train()
    step()
    assert not torch.equal(p["conv1.weight"][1], w0["conv1.weight"][1])
    assert not torch.equal(p["fc.weight"][:, 2], w0["fc.weight"][:, 2])


# --- export and R --------------------------------------------------------------------------------

def test_export_of_the_tiny_net_by_hand():
    net = tiny().eval()
    layers = find_units(net)
    # stream a: conv1 drops {0,2}, conv2 drops {0,1}: channel 0 leaves, channel 2 stays (zero filter)
    # stream c: down drops {1,3}, conv3 drops {1,4}: channel 1 leaves; fc also drops inputs {2,5}
    state = drop_state(26, [0, 2, 4, 5, 9, 11, 15, 18, 22, 25])
    masks = UnitMasks(net, layers).install()
    masks.set_state(state)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        pruned, info = export_pruned(net, layers, state, x[:1])
        out = pruned(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert pruned.conv1.out_channels == 3 and pruned.conv2.in_channels == 3 and pruned.conv2.out_channels == 3
    assert pruned.down.out_channels == 5 and pruned.conv3.out_channels == 5 and pruned.down.in_channels == 3
    assert pruned.fc[1].in_features == 3  # 6 - channel 1 (with the stream) - inputs 2 and 5 (selected out)
    # kept by hand: conv1 2*27 + bn1 4 + conv2 2*27 + bn2 4 + down 4*3 + bnd 8 + conv3 4*27+4
    #               + fc 5*3+5 = 268 of 561
    assert info["params"] == 561 and info["pruned_params"] == 359 and info["params_kept"] == 268
    assert info["params_kept_pct"] == pytest.approx(100 * 268 / 561)
    assert "forward" not in net.bn1.__dict__ or net.bn1.forward._edropout  # the original is untouched
    assert net.conv1.out_channels == 4


def test_exported_resnet18_computes_what_the_masked_one_does():
    from cifarlab.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", in_channels=1).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.2)
    layers = find_units(net)
    state = S.init_population(1, 5312, 0.5, torch.Generator().manual_seed(3))[0]
    masks = UnitMasks(net, layers).install()
    masks.set_state(state)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = net(x)
        pruned, info = export_pruned(net, layers, state, x[:1])
        assert torch.allclose(pruned(x), ref, atol=1e-4, rtol=1e-4)
    assert info["pruned_params"] < info["params"] and 0 < info["params_kept_pct"] < 60


# --- the callback: convergence, state round trip, config -----------------------------------------

def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


def test_early_convergence_only_from_the_freeze_epoch():
    net = tiny().train()
    cb = EDropout(states=4, freeze_epoch=2, seed=0, export=False)
    cb.setup(net, "cpu")
    x, y = batches(1)[0]
    for _ in range(6):  # epoch 1: the same batch, so the best cost repeats, but no freezing yet
        cb.search_step(net, x, y, epoch=1)
    assert not cb.converged
    trainer = fake_trainer(net, epoch=2)
    row = {"val_acc": None, "train_acc": 0.1}
    for _ in range(3):
        cb.search_step(net, x, y, epoch=2)
    assert cb.converged
    frozen = cb.frozen_state.clone()
    assert torch.equal(cb.state, frozen)
    cb.on_epoch_end(trainer, 2, row)
    assert cb.frozen and cb.frozen_epoch == 2 and row["edropout_frozen"] == 1
    pop = cb.pop.clone()
    cb.forward_loss(trainer, x, y)  # frozen: no more search
    assert torch.equal(cb.pop, pop) and torch.equal(cb.state, frozen)


def test_state_round_trip_continues_the_search_exactly(tmp_path):
    net = tiny().train()
    data = batches(6)
    a = EDropout(states=4, freeze_epoch=2, seed=7, export=False)
    a.setup(net, "cpu")
    for i, (x, y) in enumerate(data[:3]):
        a.search_step(net, x, y, epoch=1 + i // 2)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = EDropout(states=4, freeze_epoch=2, seed=999, export=False)  # seed differs: the state rules
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    net2 = tiny().train()
    b.setup(net2, "cpu")  # the Trainer loads the state before on_fit_start
    for i, (x, y) in enumerate(data[3:]):
        a.search_step(net, x, y, epoch=2 + i)
        b.search_step(net2, x, y, epoch=2 + i)
    for k in ("pop", "costs", "state", "history", "converged", "frozen_state"):
        assert torch.equal(getattr(a, k).nan_to_num(), getattr(b, k).nan_to_num()) if getattr(a, k).is_floating_point() \
            else torch.equal(getattr(a, k), getattr(b, k)), k


def test_config_recipe_and_random_keep():
    cfg = make_config(recipe="edropout")
    assert (cfg.optimizer, cfg.lr, cfg.rho, cfg.eps, cfg.weight_decay) == ("adadelta", 1.0, 0.9, 1e-6, 1e-5)
    assert (cfg.scheduler, cfg.step_size, cfg.gamma, cfg.epochs, cfg.batch_size) == ("step", 50, 0.1, 200, 128)
    assert (cfg.edropout, cfg.edropout_states, cfg.edropout_freeze_epoch, cfg.edropout_p0) == (True, 8, 100, 0.5)
    assert cfg.val_fraction == 0.1
    assert callbacks_from_config(make_config()) == []
    cb = callbacks_from_config(make_config(recipe="edropout", edropout_random_keep=0.25))[0]
    assert cb.mode == "random" and cb.random_keep == 0.25
    with pytest.raises(ConfigError, match="edropout_random_keep"):
        make_config(edropout_random_keep=0.5)
    with pytest.raises(ConfigError, match="edropout_random_keep"):
        make_config(recipe="edropout", edropout_random_keep=1.5)
    with pytest.raises(ConfigError, match="edropout_states"):
        make_config(recipe="edropout", edropout_states=3)


# --- through the Trainer --------------------------------------------------------------------------

def edropout_config(tmp_path, name="run", **kw):
    base = dict(model="cifar_resnet", model_kwargs={"depth": 8}, dataset="synthetic:3x16x16", train_subset=64,
                val_fraction=0.02, test_subset=64, batch_size=32, eval_batch_size=128, device="cpu", progress="off",
                recipe="edropout", epochs=2, edropout_states=4, edropout_freeze_epoch=2,
                run_dir=str(tmp_path / name))
    base.update(kw)
    return make_config(base)


def test_trainer_run_records_F_P_R_and_the_export(tmp_path):
    from cifarlab.train import Trainer

    summary = Trainer(edropout_config(tmp_path)).fit()
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("test_acc_F", "test_acc_P", "val_acc_F", "params_kept_pct", "test_acc_pruned", "units_kept_pct"):
        assert on_disk[key] is not None, key
    assert on_disk["test_acc_P"] == on_disk["test_acc"]
    # the physically pruned network scores what the masked one does (64 test images)
    assert abs(on_disk["test_acc_pruned"] - on_disk["test_acc_P"]) <= 1 / 64 + 1e-9
    # ResNet-8: stem 16, stage filters 2*16 + 3*32 + 3*64 (with the shortcut convs), 64 inputs
    assert 0 < on_disk["params_kept_pct"] < 100 and on_disk["edropout_units"] == 16 + 32 + 96 + 192 + 64
    m = pd.read_csv(run / "metrics.csv")
    for col in ("val_acc_F", "val_acc_P", "units_kept_pct", "params_kept_pct", "best_cost", "edropout_frozen"):
        assert col in m.columns, col
    st = torch.load(run / "edropout_state.pt", weights_only=True)
    assert st["state"].dtype == B and st["state"].numel() == on_disk["edropout_units"]
    assert (run / "edropout_layers.csv").is_file()
    assert summary["edropout_mode"] == "search"


def test_trainer_resume_matches_an_uninterrupted_run(tmp_path):
    from cifarlab.config import replace
    from cifarlab.train import Trainer

    # epoch 1 searches; the resumed epoch 2 continues the search from the checkpoint (population,
    # costs, generator) until it freezes
    full = Trainer(edropout_config(tmp_path, "full")).fit()
    Trainer(edropout_config(tmp_path, "cut", epochs=1)).fit()
    (tmp_path / "cut" / "summary.json").unlink()  # as if killed after epoch 1's checkpoint
    resumed = Trainer(replace(edropout_config(tmp_path, "cut"), resume=True)).fit()
    a = pd.read_csv(tmp_path / "full" / "metrics.csv").drop(columns=["epoch_time_s", "images_per_s"])
    b = pd.read_csv(tmp_path / "cut" / "metrics.csv").drop(columns=["epoch_time_s", "images_per_s"])
    pd.testing.assert_frame_equal(a, b)
    for k in ("test_acc", "test_acc_F", "params_kept_pct"):
        assert full[k] == resumed[k], k


def test_random_mask_baseline_keeps_its_fraction(tmp_path):
    from cifarlab.train import Trainer

    s = Trainer(edropout_config(tmp_path, epochs=1, edropout_random_keep=0.25)).fit()
    assert s["edropout_mode"] == "random" and s["edropout_frozen_epoch"] == 0
    assert s["units_kept"] == round(0.25 * s["edropout_units"])


# --- the report section ---------------------------------------------------------------------------

def fake_run(root, name, summary, config, metrics=None):
    import yaml

    d = root / "edropout" / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"model": "resnet20", "dataset": "fashion", "epochs": 4,
                                                "train_images": 1200, "finished": True, "device": "cpu",
                                                **summary}))
    (d / "config.yaml").write_text(yaml.safe_dump({"model": "resnet20", "epochs": 4, **config}))
    rows = metrics or [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]
    pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)


def test_report_section_builds_the_paper_table(tmp_path):
    from cifarlab.edropout.report_section import edropout_section

    log = tmp_path / "log"
    assert edropout_section(log, tmp_path / "img") is None
    fake_run(log, "original", {"test_acc": 0.80}, {"edropout": False})
    fake_run(log, "edropout", {"test_acc": 0.78, "test_acc_P": 0.78, "test_acc_F": 0.7512, "params_kept_pct": 41.234,
                               "edropout_mode": "search", "units_kept_pct": 55.0, "edropout_frozen_epoch": 3},
             {"edropout": True}, [{"epoch": 1, "val_acc": 0.5, "val_acc_F": 0.4, "units_kept_pct": 50.0,
                                   "params_kept_pct": 40.0}])
    for keep, acc in ((0.25, 0.61), (0.5, 0.70), (0.75, 0.74)):
        fake_run(log, f"random{int(keep * 100)}", {"test_acc": acc, "edropout_mode": "random",
                                                   "edropout_random_keep": keep, "params_kept_pct": 30.0},
                 {"edropout": True, "edropout_random_keep": keep})
    md = edropout_section(log, tmp_path / "img")
    row = next(line for line in md.splitlines() if line.startswith("| resnet20"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["resnet20", "fashion", "4", "1,200", "80.00", "75.12", "78.00", "41.23",
                     "61.00 (30.0)", "70.00 (30.0)", "74.00 (30.0)"]
    assert (tmp_path / "img" / "edropout.png").is_file()
    png = (tmp_path / "img" / "edropout.png").read_bytes()
    assert edropout_section(log, tmp_path / "img") == md and (tmp_path / "img" / "edropout.png").read_bytes() == png
