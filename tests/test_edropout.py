"""EDropout (issues 8, 12, 18, 19): the search rules on hand-worked examples, the masks in forward
and gradient, dropped weights surviving and reviving, the training state being the population's
best, no host sync per search step, F with BatchNorm recalibrated (and restored bit for bit),
R (paper) and the export counted by hand, state round trip, DDP with --compile, and runs through
the Trainer whose summary numbers are recomputed independently."""
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


def fake_trainer(model, opt=None, epoch=1, callbacks=(), data=None):
    """What the callback reads of a Trainer; ``evaluate`` is the Trainer's own."""
    from functools import partial

    from cifarlab.train import Trainer
    from cifarlab.train.distributed import DistInfo

    t = SimpleNamespace(model=model, train_model=model, optimizer=opt, device=torch.device("cpu"), epoch=epoch,
                        cfg=SimpleNamespace(compile=False), autocast=lambda: torch.autocast("cpu", enabled=False),
                        loss_fn=lambda z, t: F.cross_entropy(z, t), rundir=None, run_dir=None,
                        callbacks=list(callbacks), channels_last=False, dist=DistInfo(), global_step=0, data=data)
    t.evaluate = partial(Trainer.evaluate, t)
    return t


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
    before = [b.clone() for b in net.buffers()]
    scores = {}
    for probe, chunk in ((False, None), (False, 1), (True, None)):  # stacked, stacked 1 by 1, probe
        cb.probe, cb.chunk = probe, chunk
        # scored first, while the masks are still all on (as on a run's first step)
        scores[probe, chunk] = cb.score(net, pop, x, y)
    # scoring leaves the BN statistics alone
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
    ref = []
    for s in pop:  # a separate masked forward per candidate (in train mode it updates BN stats)
        cb.masks.set_state(s)
        with torch.no_grad():
            ref.append(S.margin_energy(net(x), y))
    ref = torch.stack(ref)
    for key, costs in scores.items():
        assert torch.allclose(costs, ref, atol=1e-5), key


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


# --- the state a step trains with; host syncs ----------------------------------------------------

def masked_step(cb, trainer, x, y):
    from cifarlab.train.trainer import train_step

    train_step(trainer, x, y)
    cb.on_batch_end(trainer, None)


@pytest.mark.parametrize("probe", [False, True])
def test_the_training_step_uses_the_best_state_of_the_population(probe):
    """Issue 19: before the freeze every masked training step uses the population's best state
    by cost, not (say) its first candidate; the costs are real margin energies."""
    import copy

    net = tiny().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    cb = EDropout(states=6, freeze_epoch=100, seed=3, export=False, probe=probe)
    cb.setup(net, "cpu")
    seen = []

    class Spy(nn.Module):  # the module the masked training step runs: records the mask it runs with
        def forward(self, x):
            seen.append(cb.masks.mask.clone())
            return net(x)

    trainer = fake_trainer(net, opt, callbacks=[cb])
    trainer.train_model = Spy()
    data = batches(8, seed=4)
    pop0 = cb.pop.clone()
    from cifarlab.edropout.unit_masks import strip_overrides

    shadow = strip_overrides(copy.deepcopy(net))  # independent scoring of the first step: one masked forward per state
    ref = []
    for s in pop0:
        with torch.no_grad():
            m = UnitMasks(shadow).install()
            m.set_state(s)
            ref.append(S.margin_energy(shadow(data[0][0]), data[0][1]))
            m.remove()
    not_first = 0
    for i, (x, y) in enumerate(data):
        masked_step(cb, trainer, x, y)
        best = cb.pop[cb.costs.argmin()]
        if i == 0:
            assert torch.allclose(cb.costs, torch.stack(ref), atol=1e-5)
        assert torch.equal(seen[-1], best.float()), i
        assert torch.equal(cb.state, best), i
        not_first += not torch.equal(best, cb.pop[0])
    assert not_first > 0  # the check above can tell the best from the first candidate
    assert cb.search_steps.item() == len(data) and int(cb.kept_steps.max()) <= len(data)


@pytest.mark.parametrize("probe", [False, True])
def test_a_search_step_does_no_host_sync(probe):
    """Issue 18: a whole training step in the search phase (scoring, evolution, bookkeeping,
    masked step, restoring dropped weights) reads nothing back to the host; probe=False is
    the stacked scoring a GPU uses."""
    from cifarlab.train.host_sync import count_host_syncs

    net = tiny().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    cb = EDropout(states=4, freeze_epoch=5, seed=0, export=False, probe=probe)
    cb.setup(net, "cpu")
    trainer = fake_trainer(net, opt, callbacks=[cb])
    for x, y in batches(3):  # the first step (scores the initial population) and later ones
        with count_host_syncs("cpu") as counter:
            masked_step(cb, trainer, x, y)
        assert counter.syncs == 0, counter.where
    assert cb.search_steps.item() == 3


# --- EDropout(F): BatchNorm statistics that belong to the all-on network --------------------------

def masked_training(seed=0, steps=4, keep=0.5):
    """A tiny net trained a few steps under a random state (so its BN statistics are those of the
    masked network), with its callback and a fake trainer whose data are lists of batches."""
    net = tiny(seed).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    cb = EDropout(states=4, seed=seed, export=False, random_keep=keep, bn_recal_batches=3)
    cb.setup(net, "cpu")
    data = SimpleNamespace(train=batches(5, seed=10), val=batches(2, seed=11), test=batches(3, seed=12))
    trainer = fake_trainer(net, opt, callbacks=[cb], data=data)
    for x, y in data.train[:steps]:
        masked_step(cb, trainer, x, y)
    return net, cb, trainer, opt, data


def bn_snapshot(net):
    return [(n, b.clone(), b.data_ptr()) for n, b in net.named_buffers()], \
        [(m.momentum, m.training) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def test_F_evaluation_restores_every_buffer_bit_for_bit_and_training_continues_identically():
    net, cb, trainer, opt, data = masked_training()
    bufs, flags = bn_snapshot(net)
    for bn in ("recalibrated", "batch"):
        cb.evaluate_full(trainer, data.test, bn)
        after, after_flags = bn_snapshot(net)
        for (n, a, pa), (_, b, pb) in zip(bufs, after):
            assert torch.equal(a, b) and pa == pb, (bn, n)  # same values, same tensors
        assert after_flags == flags and net.training
        assert cb.masks.mask.tolist() == cb.state.float().tolist()  # the training mask is back
    # a run that measured F continues exactly as one that did not
    twin, tcb, ttrainer, _, _ = masked_training()
    for x, y in data.train[4:]:
        masked_step(cb, trainer, x, y)
        masked_step(tcb, ttrainer, x, y)
    for (n, a), (_, b) in zip(list(net.state_dict().items()), list(twin.state_dict().items())):
        assert torch.equal(a, b), n


def test_F_equals_an_independently_recalibrated_copy():
    """F (recalibrated) = every unit on, BN statistics recomputed with torch's own update_bn over
    the same training batches; F (batch stats) = a train-mode forward of each test batch."""
    import copy

    from torch.optim.swa_utils import update_bn

    from cifarlab.edropout.unit_masks import strip_overrides

    net, cb, trainer, _, data = masked_training()
    loss_f, acc_f = cb.evaluate_full(trainer, data.test, "recalibrated")
    loss_b, acc_b = cb.evaluate_full(trainer, data.test, "batch")
    ref = strip_overrides(copy.deepcopy(net))  # the plain network: every unit on
    batch_ref = copy.deepcopy(ref)
    update_bn(data.train[:cb.bn_recal_batches], ref)
    ref.eval()

    def score(model):
        with torch.no_grad():
            losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in data.test]
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.test)
        n = sum(len(y) for _, y in data.test)
        return float(sum(losses)) / n, correct / n

    assert (loss_f, acc_f) == pytest.approx(score(ref), abs=1e-6)
    batch_ref.train()
    assert (loss_b, acc_b) == pytest.approx(score(batch_ref), abs=1e-6)
    # the statistics of the masked training do not give the same network
    stale = strip_overrides(copy.deepcopy(net)).eval()
    assert abs(score(stale)[0] - loss_f) > 1e-3


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
    assert info["r_params"] == pytest.approx(359 / 561)  # what the export holds, zero filters included
    # FLOPs of one 8x8 image (2 per multiply-add; BN, ReLU, the mean not counted):
    #   dense : conv1 2*4*27*64 = 13824, conv2 2*4*36*64 = 18432, down 2*6*4*16 = 768,
    #           conv3 2*6*36*16 = 6912, fc 2*6*5 = 60                            -> 39996
    #   export: conv1 2*3*27*64 = 10368, conv2 2*3*27*64 = 10368, down 2*5*3*16 = 480,
    #           conv3 2*5*27*16 = 4320, fc 2*3*5 = 30                            -> 25566
    assert (info["flops"], info["pruned_flops"]) == (39996, 25566)
    assert info["flops_kept"] == pytest.approx(25566 / 39996)
    assert info["r_paper"] == pytest.approx(96 / 162)  # see test_r_paper_by_hand
    assert "forward" not in net.bn1.__dict__ or net.bn1.forward._edropout  # the original is untouched
    assert net.conv1.out_channels == 4


def test_r_paper_by_hand():
    """R as the released code's kept_counter counts it: kept filters x k_h x k_w per conv layer,
    kept classifier inputs x classes; input channels do not enter."""
    from cifarlab.edropout.export import paper_r, r_paper

    layers = find_units(tiny())
    # weights per unit: conv1 3x3 -> 9, conv2 3x3 -> 9, down 1x1 -> 1, conv3 3x3 -> 9, fc -> 5 classes
    # all units: 4*9 + 4*9 + 6*1 + 6*9 + 6*5 = 36 + 36 + 6 + 54 + 30 = 162
    state = drop_state(26, [0, 2, 4, 5, 9, 11, 15, 18, 22, 25])
    # kept: conv1 2 -> 18, conv2 2 -> 18, down 4 -> 4, conv3 4 -> 36, fc 4 -> 20 = 96
    assert paper_r(layers, state) == (96, 162)
    assert r_paper(layers, state) == pytest.approx(96 / 162)
    # dropping only fc inputs weighs 5 each; only 1x1 downsample filters, 1 each
    assert paper_r(layers, drop_state(26, [20, 21])) == (162 - 10, 162)
    assert paper_r(layers, drop_state(26, [8, 9, 10])) == (162 - 3, 162)
    assert paper_r(layers, torch.ones(26, dtype=B)) == (162, 162)


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
    for k in ("pop", "costs", "state", "history", "converged", "frozen_state", "search_steps", "state_changes",
              "kept_steps"):
        ta, tb = getattr(a, k), getattr(b, k)
        assert torch.equal(ta.nan_to_num(), tb.nan_to_num()) if ta.is_floating_point() else torch.equal(ta, tb), k
    # epoch 1's two steps always search; from the freeze epoch on, only the steps up to the repeat
    assert 2 <= a.search_steps.item() <= 6 and int(a.kept_steps.max()) <= a.search_steps.item()


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
                recipe="edropout", epochs=2, edropout_states=4, edropout_freeze_epoch=2, amp="off",
                run_dir=str(tmp_path / name))
    base.update(kw)
    return make_config(base)


def hand_r_paper(model: nn.Module, state: torch.Tensor) -> float:
    """kept_counter written out again: the units are the conv filters in module order, then the
    classifier's inputs; a filter weighs k_h*k_w, a classifier input weighs the classes."""
    kept = total = off = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.kernel_size[0] * m.kernel_size[1]
            kept += int(state[off:off + m.out_channels].sum()) * w
            total += m.out_channels * w
            off += m.out_channels
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    kept += int(state[off:off + fc.in_features].sum()) * fc.out_features
    total += fc.in_features * fc.out_features
    assert off + fc.in_features == state.numel()
    return kept / total


def test_trainer_run_records_F_P_R_and_the_export(tmp_path):
    """Every number of an EDropout run's summary recomputed independently from its files."""
    from torch.optim.swa_utils import update_bn

    from cifarlab.data import build_loaders
    from cifarlab.train import Trainer
    from cifarlab.train.build import model_from_config
    from cifarlab.train.checkpoint import load_checkpoint

    cfg = edropout_config(tmp_path)
    summary = Trainer(cfg).fit()
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["edropout_mode"] == "search" == summary["edropout_mode"]
    for key in ("test_acc", "f_acc", "f_acc_batch_stats", "test_acc_pruned", "val_acc_F"):
        assert 0.0 <= s[key] <= 1.0, key
    for key in ("r_paper", "r_params", "flops_kept", "units_never_trained"):
        assert 0.0 <= s[key] < 1.0, key
    assert s["r_paper"] > 0 and s["r_params"] > 0 and s["flops_kept"] > 0
    assert s["test_acc_P"] == s["test_acc"]
    # ResNet-8: stem 16, stage filters 2*16 + 3*32 + 3*64 (with the shortcut convs), 64 inputs
    assert s["edropout_units"] == 16 + 32 + 96 + 192 + 64
    st = torch.load(run / "edropout_state.pt", weights_only=True)
    state = st["state"]
    assert state.dtype == B and state.numel() == s["edropout_units"] and int(state.sum()) == s["units_kept"]

    data = build_loaders(cfg, "cpu")
    data.train.set_epoch(cfg.epochs)  # the loader's epoch when the Trainer measured F
    best = load_checkpoint(run / "checkpoints" / "best.pt")["model"]

    def fresh():
        m = model_from_config(cfg, data.info.num_classes, data.info.in_channels).to(memory_format=torch.channels_last)
        m.load_state_dict(best)
        return m

    def cl(x):
        return x.contiguous(memory_format=torch.channels_last)

    def acc(model, train_mode=False):
        model.train(train_mode)
        with torch.no_grad():
            return sum(int((model(cl(x)).argmax(1) == y).sum()) for x, y in data.test) / data.test.num_samples

    assert s["r_paper"] == pytest.approx(hand_r_paper(fresh(), state))
    # P: the best checkpoint under the saved state, running statistics as trained
    net = fresh()
    UnitMasks(net).install().set_state(state)
    assert acc(net) == s["test_acc"]
    # F: the best checkpoint with every unit on, BN recalibrated by torch's update_bn on the same batches
    net = fresh()
    update_bn([cl(x) for x, _ in list(data.train)[:s["f_bn_recal_batches"]]], net)
    assert acc(net) == s["f_acc"]
    assert acc(fresh(), train_mode=True) == s["f_acc_batch_stats"]  # each test batch's own statistics
    # the physically pruned network scores what the masked one does (64 test images)
    assert abs(s["test_acc_pruned"] - s["test_acc_P"]) <= 1 / 64 + 1e-9
    # search bookkeeping: 2 steps per epoch; epoch 1 searches, epoch 2 freezes after its first step
    kept_steps = st["kept_steps"]
    assert 2 < s["search_steps"] <= 4 and st["search_steps"] == s["search_steps"]
    assert 0 <= s["state_changes"] <= s["search_steps"] - 1
    assert int(kept_steps.max()) <= s["search_steps"]
    assert s["units_never_trained"] == pytest.approx((kept_steps == 0).float().mean().item())
    assert s["edropout_frozen_epoch"] == 2 and bool((kept_steps[state] > 0).all())  # the frozen state was trained
    m = pd.read_csv(run / "metrics.csv")
    for col in ("val_acc_F", "val_acc_P", "units_kept_pct", "r_paper", "params_kept_pct", "best_cost",
                "edropout_frozen", "search_steps", "state_changes", "units_never_trained"):
        assert col in m.columns, col
    assert m["search_steps"].tolist()[0] == 2 and m["search_steps"].tolist()[-1] == s["search_steps"]
    layers = pd.read_csv(run / "edropout_layers.csv")
    assert layers["never_trained"].sum() == int((kept_steps == 0).sum())
    assert s["hardware"]


def test_trainer_resume_matches_an_uninterrupted_run(tmp_path):
    from cifarlab.config import replace
    from cifarlab.train import Trainer

    # epoch 1 searches; the resumed epoch 2 continues the search from the checkpoint (population,
    # costs, generator, bookkeeping) until it freezes; F's recalibration in epoch 1 left no trace
    full = Trainer(edropout_config(tmp_path, "full")).fit()
    Trainer(edropout_config(tmp_path, "cut", epochs=1)).fit()
    (tmp_path / "cut" / "summary.json").unlink()  # as if killed after epoch 1's checkpoint
    resumed = Trainer(replace(edropout_config(tmp_path, "cut"), resume=True)).fit()
    a = pd.read_csv(tmp_path / "full" / "metrics.csv").drop(columns=["epoch_time_s", "images_per_s"])
    b = pd.read_csv(tmp_path / "cut" / "metrics.csv").drop(columns=["epoch_time_s", "images_per_s"])
    pd.testing.assert_frame_equal(a, b)
    for k in ("test_acc", "f_acc", "f_acc_batch_stats", "r_paper", "r_params", "search_steps", "state_changes",
              "units_never_trained"):
        assert full[k] == resumed[k], k
    sa = torch.load(tmp_path / "full" / "edropout_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "cut" / "edropout_state.pt", weights_only=True)
    assert torch.equal(sa["kept_steps"], sb["kept_steps"]) and torch.equal(sa["state"], sb["state"])


def test_random_mask_baseline_reports_P_R_and_the_export_only(tmp_path):
    from cifarlab.train import Trainer

    s = Trainer(edropout_config(tmp_path, epochs=1, edropout_random_keep=0.25)).fit()
    assert s["edropout_mode"] == "random" and s["edropout_frozen_epoch"] == 0
    assert s["units_kept"] == round(0.25 * s["edropout_units"])
    assert 0 < s["r_paper"] < 0.5 and 0 < s["r_params"] < 1 and s["test_acc_pruned"] is not None
    for key in ("f_acc", "f_acc_batch_stats", "val_acc_F", "search_steps", "units_never_trained"):
        assert key not in s, key
    assert "val_acc_F" not in pd.read_csv(tmp_path / "run" / "metrics.csv").columns


DDP_SCRIPT = """
import os, sys, torch
from cifarlab.config import make_config
from cifarlab.edropout.callback import EDropout
from cifarlab.train import Callback, Trainer

out = sys.argv[1]
rank = int(os.environ["RANK"])


class Record(Callback):
    first = None

    def on_batch_start(self, trainer, x, y):
        if self.first is None:
            self.first = x.detach().clone()

    def on_epoch_end(self, trainer, epoch, row):  # after the epoch's training, before any checkpoint load
        ed = next(cb for cb in trainer.callbacks if isinstance(cb, EDropout))
        torch.save({"params": [p.detach().clone() for p in trainer.model.parameters()], "first": self.first,
                    "wrapper": type(trainer.train_model).__name__,
                    "trained_with": type(ed._train_model(trainer)).__name__,
                    "pop": ed.pop.clone()}, f"{out}/rank{rank}_epoch{epoch}.pt")


cfg = make_config(model="cifar_resnet", model_kwargs={"depth": 8}, dataset="synthetic:3x16x16", train_subset=128,
                  val_fraction=0.02, test_subset=64, batch_size=32, device="cpu", progress="off", recipe="edropout",
                  epochs=1, edropout_states=4, edropout_freeze_epoch=2, amp="off", compile=True,
                  run_dir=f"{out}/run")
Trainer(cfg, callbacks=[Record()], write=False).fit()
"""


def test_ddp_with_compile_trains_edropout_through_the_ddp_wrapper(tmp_path):
    """Issue 18: with --compile the Trainer wraps DDP in torch.compile; EDropout must unwrap the
    compiled module only, so the ranks' gradients are still averaged: after steps on different
    data the two ranks hold the same parameters."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_edropout.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}_epoch1.pt", weights_only=True) for r in (0, 1))
    assert r0["wrapper"] == "OptimizedModule"  # compile was on
    assert not torch.equal(r0["first"], r1["first"])  # the ranks trained on different batches
    assert torch.equal(r0["pop"], r1["pop"])  # the search agrees (costs are averaged across ranks)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.allclose(a, b, atol=1e-6), "ranks diverged: gradients were not synchronised"
    assert r0["trained_with"] == r1["trained_with"] == "DistributedDataParallel"


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


def table_row(md: str, first_cell: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_section_builds_the_paper_table(tmp_path):
    from cifarlab.edropout.report_section import edropout_section

    log = tmp_path / "log"
    assert edropout_section(log, tmp_path / "img") is None
    fake_run(log, "original", {"test_acc": 0.80}, {"edropout": False, "recipe": "edropout"})
    fake_run(log, "edropout", {"test_acc": 0.78, "test_acc_P": 0.78, "f_acc": 0.7512, "f_acc_batch_stats": 0.7634,
                               "r_paper": 0.41234, "r_params": 0.3301, "flops_kept": 0.29, "test_acc_pruned": 0.7795,
                               "edropout_mode": "search", "units_kept_pct": 55.0, "edropout_frozen_epoch": 3,
                               "search_steps": 4642, "state_changes": 37, "units_never_trained": 0.0125,
                               "hardware": "AMD EPYC (1 thread)", "amp": "bf16", "wall_time_s": 5400},
             {"edropout": True, "recipe": "edropout", "epochs": 4, "scheduler": "step", "step_size": 6, "gamma": 0.1,
              "edropout_freeze_epoch": 3, "dataset": "fashion", "amp": "bf16"},
             [{"epoch": 1, "val_acc": 0.5, "val_acc_F": 0.4, "units_kept_pct": 50.0, "r_paper": 0.4}])
    for keep, acc in ((0.25, 0.61), (0.5, 0.70), (0.75, 0.74)):
        fake_run(log, f"random{int(keep * 100)}", {"test_acc": acc, "edropout_mode": "random",
                                                   "edropout_random_keep": keep, "r_paper": 0.3},
                 {"edropout": True, "edropout_random_keep": keep})
    # the search run's per-unit bookkeeping: dropped units kept in 2, 0, 1 of 4 steps
    torch.save({"state": torch.tensor([True, False, False, False]), "kept_steps": torch.tensor([4, 2, 0, 1]),
                "search_steps": 4}, log / "edropout" / "edropout" / "edropout_state.pt")
    md = edropout_section(log, tmp_path / "img")
    # ours: original / F recal. / F batch stats / P / R (paper), then random P (R paper)
    assert table_row(md, "resnet20") == ["resnet20", "fashion", "4", "1,200", "80.00", "75.12", "76.34", "78.00",
                                         "41.23", "61.00 (30.0)", "70.00 (30.0)", "74.00 (30.0)"]
    # the paper's row beside it: its F is a batch-statistics F (the released code never calls eval())
    assert table_row(md, "resnet18 (paper)")[:9] == ["resnet18 (paper)", "fashion", "200", "54,000", "93.87", "—",
                                                     "93.45", "93.57", "50.43"]
    # pruning and search: units, R (paper), params and FLOPs of the export, its accuracy, the search
    assert table_row(md, "edropout/edropout")[1:] == ["edropout", "78.00", "55.00", "41.23", "33.01", "29.00", "—",
                                                      "77.95", "4,642", "37", "1.25", "25.00", "33.33", "3"]
    assert table_row(md, "edropout/random50")[1:3] == ["random 0.5", "70.00"]
    assert table_row(md, "edropout/random50")[9:14] == ["—", "—", "—", "—", "—"]  # no search
    # labels: data, schedule, hardware, wall time and the command that reproduces the run
    labels = [line for line in md.splitlines() if line.startswith("| edropout/edropout |")][-1]  # the last table
    assert "StepLR every 6 ep x0.1; freeze from epoch 3 of 4" in labels and "AMD EPYC (1 thread), bf16" in labels
    assert "| 1h30m |" in labels, labels
    cmd = f"python -m cifarlab train --recipe edropout --model resnet20 --dataset fashion --epochs 4 --step-size 6 " \
          f"--amp bf16 --edropout-freeze-epoch 3 --run-dir {(log / 'edropout' / 'edropout').as_posix()}"
    assert f"`{cmd}`" in labels, labels
    orig = [line for line in md.splitlines() if line.startswith("| edropout/original |")][-1]
    assert "`python -m cifarlab train --recipe edropout --model resnet20 --epochs 4 --no-edropout --run-dir" in orig
    assert "F and P within 1.5 points" in md and "original 80.00% (>= 92%: **not met**)" in md
    assert "F 75.12% (gap -4.88: **not met**)" in md and "R (paper) 41.23% (40-60%: met)" in md
    assert (tmp_path / "img" / "edropout.png").is_file()
    png = (tmp_path / "img" / "edropout.png").read_bytes()
    assert edropout_section(log, tmp_path / "img") == md and (tmp_path / "img" / "edropout.png").read_bytes() == png


def test_dropped_units_training_is_counted_over_the_units_the_final_state_drops(tmp_path):
    """Hand count: 10 search steps; the final state drops units 1, 3, 4, kept in 0, 3 and 1
    of those steps -> fractions 0, 0.3, 0.1: median 0.1, one of three under 5%. The kept
    units (0 and 2, kept 10 and 7 times) do not enter."""
    from cifarlab.edropout.export import dropped_units_training, read_dropped_units_training

    state = torch.tensor([True, False, True, False, False])
    kept = torch.tensor([10, 0, 7, 3, 1], dtype=torch.int32)
    got = dropped_units_training(state, kept, 10)
    assert got["dropped_kept_median"] == pytest.approx(0.1)
    assert got["dropped_kept_under_5pct"] == pytest.approx(1 / 3)
    assert dropped_units_training(torch.ones(5, dtype=torch.bool), kept, 10) == {}
    assert dropped_units_training(state, kept, 0) == {}
    torch.save({"state": state, "kept_steps": kept, "search_steps": 10}, tmp_path / "edropout_state.pt")
    assert read_dropped_units_training(tmp_path) == got
    torch.save({"state": state}, tmp_path / "edropout_state.pt")  # a random-mask run: no search
    assert read_dropped_units_training(tmp_path) == {}
