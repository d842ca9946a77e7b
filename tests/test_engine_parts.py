"""Small pieces of the engine pinned by hand: losses, schedules, optimizers, config, atomic writes."""
from __future__ import annotations

import math

import pytest
import torch

from cifarlab.config import RECIPES, make_config
from cifarlab.errors import ConfigError
from cifarlab.optim import build_optimizer, build_scheduler
from cifarlab.train.checkpoint import capture_rng, restore_rng
from cifarlab.train.losses import build_loss
from cifarlab.utils import atomic_write_text


def loss_of(name, logits, y, **kw):
    return build_loss(make_config(loss=name, **kw))(torch.tensor(logits), torch.tensor(y)).item()


def test_cross_entropy_by_hand():
    # logits (0, ln 3): p(class 1) = 3/4 -> loss = -ln(3/4)
    assert loss_of("ce", [[0.0, math.log(3)]], [1]) == pytest.approx(-math.log(0.75))


def test_label_smoothing_by_hand():
    # eps 0.1, 2 classes: target (0.05, 0.95); p = (1/4, 3/4)
    want = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    assert loss_of("label_smoothing", [[0.0, math.log(3)]], [1], label_smoothing=0.1) == pytest.approx(want)


def test_mse_on_one_hot_by_hand():
    # logits (0.5, 2), target (0, 1): ((0.5)^2 + 1^2) / 2
    assert loss_of("mse", [[0.5, 2.0]], [1]) == pytest.approx((0.25 + 1.0) / 2)


def test_margin_loss_by_hand():
    # 3 classes, true class 0 with logit 1; others 0.5 and -1: max(0, 1-0.5) + max(0, 1-2) = 0.5, / 3 classes
    assert loss_of("margin", [[1.0, 0.5, -1.0]], [0]) == pytest.approx(0.5 / 3)


def _opt(**kw):
    model = torch.nn.Linear(3, 2)
    cfg = make_config(**kw)
    return cfg, build_optimizer(cfg, model)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("nesterov", torch.optim.SGD),
                                      ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("adadelta", torch.optim.Adadelta), ("rmsprop", torch.optim.RMSprop)])
def test_optimizer_factory(name, cls):
    cfg, opt = _opt(optimizer=name, lr=0.01)
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay
    if name == "nesterov":
        assert opt.param_groups[0]["nesterov"] is True


def test_seed_recipe_is_the_default():
    cfg = make_config()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.epochs) == \
        ("sgd", 0.1, 0.9, 5e-4, 128, 200)
    assert (cfg.scheduler, cfg.plateau_factor) == ("plateau", 0.5)


def test_plateau_halves_on_validation_error():
    cfg, opt = _opt(scheduler="plateau", plateau_patience=1, lr=0.1)
    sched = build_scheduler(cfg, opt)
    for err in (0.5, 0.5, 0.5):
        sched.step(err)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_multistep_defaults_to_half_and_three_quarters():
    cfg, opt = _opt(scheduler="multistep", epochs=8, lr=1.0, gamma=0.1)
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_and_step_schedules():
    cfg, opt = _opt(scheduler="cosine", epochs=4, lr=1.0)
    sched = build_scheduler(cfg, opt)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    cfg, opt = _opt(scheduler="step", step_size=2, gamma=0.5, lr=1.0)
    sched = build_scheduler(cfg, opt)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_edropout_recipe_and_flag_override():
    cfg = make_config(recipe="edropout", epochs=7)
    assert (cfg.optimizer, cfg.lr, cfg.rho, cfg.eps, cfg.weight_decay) == ("adadelta", 1.0, 0.9, 1e-6, 1e-5)
    assert (cfg.scheduler, cfg.step_size, cfg.gamma, cfg.edropout, cfg.epochs) == ("step", 50, 0.1, True, 7)
    assert set(RECIPES) >= {"edropout", "dropout", "bn", "slbi_lenet"}


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe"):
        make_config(recipe="fast")


def test_rng_capture_and_restore_round_trip():
    import random

    import numpy as np

    state = capture_rng()
    a = (torch.rand(3), np.random.rand(), random.random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    f = tmp_path / "x.txt"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "slbi", "slbi_adam"])
def test_best_checkpoint_keeps_optimizer_state_only_for_slbi(optimizer):
    # best.pt drops optimizer and scheduler state (only resuming needs them, last.pt has them),
    # except for SLBI, whose Gamma lives in the optimizer state and pruning needs it
    from cifarlab.train.trainer import best_payload

    payload = {"model": {"w": 1}, "optimizer": {"state": {0: "gamma"}}, "scheduler": {"last_epoch": 3},
               "epoch": 7}
    kept = best_payload(payload, make_config({"optimizer": optimizer}))
    if optimizer.startswith("slbi"):
        assert kept == payload
    else:
        assert kept == {"model": {"w": 1}, "optimizer": None, "scheduler": None, "epoch": 7}
    assert payload["optimizer"] == {"state": {0: "gamma"}}  # the caller's payload (last.pt) is untouched
