"""Structural dropout (issue 7): the four levels, conv_block, the networks, variance shift."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from cifarlab.config import make_config
from cifarlab.dropout import (DropChannel, DropLayer, DropNeuron, DropPath, TrackedNorm, conv_block,
                              parse_drop_type, track_norms_after_dropout, tracked_norms)
from cifarlab.dropout.variance_shift import VarianceShift, callbacks_from_config, columns
from cifarlab.errors import ConfigError
from cifarlab.models import build_model
from cifarlab.dropout.networks import model_from_config
from cifarlab.utils import count_params

P = 0.3
SCALE = 1.0 / (1.0 - P)


# ---------------------------------------------------------------- the four levels, statistically

def _units(level: str, mode: str, out: torch.Tensor, groups: int) -> torch.Tensor:
    """Rearrange outputs (calls, N, C, H, W) so that each row is what one Bernoulli draw covers."""
    calls, n, c = out.shape[:3]
    if level == "neuron":
        return out.reshape(-1, 1)
    if level == "channel":
        return out.reshape(calls * n * c, -1)
    if level == "path":
        out = out.reshape(calls, n, groups, -1)
        if mode == "row":
            return out.reshape(calls * n * groups, -1)
        return out.transpose(1, 2).reshape(calls * groups, -1)  # one draw covers every sample
    if mode == "row":  # layer
        return out.reshape(calls * n, -1)
    return out.reshape(calls, -1)


CASES = [  # (level, mode, module, calls, x shape)
    ("neuron", "row", DropNeuron(P), 1, (64, 8, 8, 8)),
    ("channel", "row", DropChannel(P), 4, (256, 8, 2, 2)),
    ("path", "row", DropPath(P, "row", groups=4), 4, (512, 8, 2, 2)),
    ("path", "batch", DropPath(P, "batch", groups=4), 1500, (4, 8, 1, 1)),
    ("layer", "row", DropLayer(P, "row"), 4, (1024, 2, 2, 2)),
    ("layer", "batch", DropLayer(P, "batch"), 4000, (4, 2, 1, 1)),
]


@pytest.mark.parametrize("level,mode,module,calls,shape", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_level_drops_whole_units_at_rate_p_and_keeps_the_expectation(level, mode, module, calls, shape):
    torch.manual_seed(0)
    module.train()
    x = torch.ones(shape)
    out = torch.stack([module(x) for _ in range(calls)])
    units = _units(level, mode, out, groups=4)
    # mask structure: every unit is dropped or kept as a whole, kept values scaled by 1/(1-p)
    assert torch.equal(units.amin(1), units.amax(1)), "a unit was partly dropped"
    first = units[:, 0]
    assert bool(((first == 0) | torch.isclose(first, torch.tensor(SCALE))).all())
    # fraction dropped ~ p: binomial std over the number of independent draws
    draws = units.shape[0]
    frac = (first == 0).float().mean().item()
    assert abs(frac - P) < 5 * math.sqrt(P * (1 - P) / draws), (frac, draws)
    # expectation preserved: E[out] = x = 1; std of the mean of `draws` scaled Bernoullis
    assert abs(out.mean().item() - 1.0) < 5 * math.sqrt(P / ((1 - P) * draws))


@pytest.mark.parametrize("module", [DropChannel(P), DropPath(P, "row", groups=2), DropLayer(P, "row")],
                         ids=["channel", "path", "layer"])
def test_row_modes_draw_per_sample(module):
    torch.manual_seed(1)
    out = module.train()(torch.ones(64, 4, 2, 2))
    masks = out.reshape(64, -1)
    assert not torch.equal(masks, masks[:1].expand_as(masks)), "all samples got the same mask"


def test_masks_are_not_coarser_than_their_level():
    torch.manual_seed(6)
    x = torch.ones(32, 8, 3, 3)
    neuron = DropNeuron(P).train()(x).flatten(2)       # elements of one feature map differ
    assert bool((neuron.amin(2) != neuron.amax(2)).any())
    channel = DropChannel(P).train()(x).flatten(1)     # channels of one sample differ
    assert bool((channel.amin(1) != channel.amax(1)).any())


@pytest.mark.parametrize("module", [DropPath(P, "batch", groups=2), DropLayer(P, "batch")], ids=["path", "layer"])
def test_batch_mode_shares_one_draw_across_the_mini_batch(module):
    torch.manual_seed(2)
    module.train()
    for _ in range(20):
        masks = module(torch.ones(16, 4, 2, 2)).reshape(16, -1)
        assert torch.equal(masks, masks[:1].expand_as(masks))


def test_drop_path_masks_consecutive_channel_groups():
    # 6 channels in 3 paths: channels (0,1), (2,3), (4,5) share one draw per sample
    torch.manual_seed(3)
    out = DropPath(0.5, "row", groups=3).train()(torch.ones(200, 6, 1, 1))[..., 0, 0]
    pairs = out.reshape(200, 3, 2)
    assert torch.equal(pairs[..., 0], pairs[..., 1])
    assert not torch.equal(out[:, 0], out[:, 2])  # different paths draw independently


ALL = [DropNeuron(P), DropChannel(P), DropPath(P, "row", groups=2), DropPath(P, "batch", groups=2),
       DropLayer(P, "row"), DropLayer(P, "batch")]
IDS = ["neuron", "channel", "path-row", "path-batch", "layer-row", "layer-batch"]


@pytest.mark.parametrize("module", ALL, ids=IDS)
def test_eval_mode_and_rate_zero_are_the_identity(module):
    x = torch.randn(8, 4, 3, 3)
    assert torch.equal(module.eval()(x), x)
    zero = type(module)(0.0) if not isinstance(module, (DropPath, DropLayer)) else type(module)(0.0, module.mode)
    assert torch.equal(zero.train()(x), x)


@pytest.mark.parametrize("module", ALL, ids=IDS)
def test_gradient_flows_only_through_kept_units(module):
    torch.manual_seed(4)
    seen_kept = seen_dropped = False
    for _ in range(10):  # batch mode keeps or drops a whole call: look at several
        x = torch.ones(32, 4, 2, 2, requires_grad=True)
        out = module.train()(x)
        out.sum().backward()
        # d out / d x = mask / (1-p): zero where dropped, 1/(1-p) where kept
        assert torch.equal(x.grad, out.detach())
        kept = out.detach() != 0
        assert torch.allclose(x.grad[kept], torch.tensor(SCALE))
        seen_kept |= bool(kept.any())
        seen_dropped |= bool((~kept).any())
    assert seen_kept and seen_dropped


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_rate_is_a_config_error(bad):
    for cls in (DropNeuron, DropChannel, DropPath, DropLayer):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            cls(bad)


def test_bad_mode_groups_and_names_are_config_errors():
    with pytest.raises(ConfigError, match="row"):
        DropLayer(0.1, mode="sample")
    with pytest.raises(ConfigError, match="groups"):
        DropPath(0.1, groups=0)
    with pytest.raises(ConfigError, match="drop_type"):
        parse_drop_type("block")
    with pytest.raises(ConfigError, match="drop rate"):
        build_model("preresnet_drop", depth=11, drop_type="neuron", drop_rate=1.0)
    for kwargs in (dict(drop_type="neuron", drop_rate=1.0), dict(drop_type="spatial"),
                   dict(drop_rate=0.1), dict(report_ratio=True)):
        with pytest.raises(ConfigError):
            make_config(**kwargs)


def test_drop_type_names_and_the_original_codes():
    assert [parse_drop_type(v) for v in (0, 1, 2, 3)] == ["neuron", "channel", "path", "layer"]
    assert [parse_drop_type(v) for v in ("1", "Channel", "none", None)] == ["channel", "channel", None, None]
    assert make_config(drop_type="2", drop_rate=0.1).drop_type == "2"


# ---------------------------------------------------------------- what mutation testing found unpinned

def test_defaults_are_half_rate_per_sample_one_path():
    assert [cls().p for cls in (DropNeuron, DropChannel, DropPath, DropLayer)] == [0.5] * 4
    assert (DropPath().mode, DropPath().groups, DropLayer().mode) == ("row", 1, "row")


@pytest.mark.parametrize("groups", [1, 2])
def test_drop_path_drops_whole_paths_and_one_path_is_stochastic_depth(groups):
    # groups=1: the conv is one path, some samples are zeroed whole and the rest doubled (p=0.5);
    # groups=2: each half of the channels draws for itself, so some samples lose exactly one half
    torch.manual_seed(5)
    out = DropPath(0.5, "row", groups=groups).train()(torch.ones(64, 4, 1, 1))[..., 0, 0]
    paths = out.reshape(64, groups, -1)
    assert torch.equal(paths.amin(2), paths.amax(2))  # a path is kept or dropped as a unit
    kept = paths[..., 0] != 0
    assert bool(kept.any()) and bool((~kept).any())
    assert bool((out[out != 0] == 2.0).all())
    if groups == 2:
        assert bool((kept[:, 0] != kept[:, 1]).any())


@pytest.mark.parametrize("module", ALL, ids=IDS)
def test_masks_keep_the_activation_dtype(module):
    # bf16 activations (autocast) stay bf16: a float32 mask would promote every later layer
    torch.manual_seed(7)
    assert module.train()(torch.ones(16, 4, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("module", ALL, ids=IDS)
def test_rate_zero_draws_no_random_numbers(module):
    # a rate-0 network trains exactly as the network without dropout: the RNG stream is untouched
    if isinstance(module, DropPath):
        zero = DropPath(0.0, module.mode, groups=module.groups)
    elif isinstance(module, DropLayer):
        zero = DropLayer(0.0, module.mode)
    else:
        zero = type(module)(0.0)
    x = torch.randn(8, 4, 3, 3)
    state = torch.get_rng_state()
    zero.train()(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_drop_type_and_path_errors_say_what_is_allowed():
    for bad in (True, "block"):
        with pytest.raises(ConfigError, match=r"one of none, neuron, channel, path, layer \(or .*0-3\), got"):
            parse_drop_type(bad)
    assert parse_drop_type("") is None and parse_drop_type(" None ") is None
    with pytest.raises(ConfigError, match="6 channels cannot be split into 4 paths"):
        DropPath(0.1, groups=4).train()(torch.ones(2, 6, 1, 1))


# ---------------------------------------------------------------- conv_block

@pytest.mark.parametrize("block_type,order,norm_ch", [
    (0, ["norm", "relu", "drop", "conv"], 4),
    (1, ["norm", "relu", "conv", "drop"], 4),
    (2, ["drop", "conv", "norm", "relu"], 8),
    (3, ["conv", "drop", "norm", "relu"], 8),
])
def test_conv_block_orders(block_type, order, norm_ch):
    block = conv_block(4, 8, 3, 1, block_type, "channel", 0.1, "bn")
    assert [name for name, _ in block.named_children()] == order
    assert block.norm.num_features == norm_ch  # pre-activation types normalise the input
    assert block(torch.randn(2, 4, 5, 5)).shape == (2, 8, 5, 5)
    assert [n for n, _ in conv_block(4, 8, block_type=block_type).named_children()] == \
        [n for n in order if n != "drop"]


def test_conv_block_group_norm_drop_path_groups_and_errors():
    block = conv_block(16, 16, 3, 2, 0, "path", 0.2, "gn", groups=4, drop_mode="batch")
    assert isinstance(block.norm, nn.GroupNorm) and block.norm.num_groups == 8
    assert block.drop.groups == 4 and block.drop.mode == "batch"
    assert block.conv.groups == 4 and block(torch.randn(2, 16, 6, 6)).shape == (2, 16, 3, 3)
    assert conv_block(12, 12, norm="gn").norm.num_groups == 4  # 12 channels do not split into 8
    with pytest.raises(ConfigError, match="residual function"):
        conv_block(4, 4, drop_type="layer", drop_rate=0.1)
    with pytest.raises(ConfigError, match="groups"):
        conv_block(6, 8, groups=4)
    with pytest.raises(ConfigError, match="block_type"):
        conv_block(4, 4, block_type=4)
    with pytest.raises(ConfigError, match="norm"):
        conv_block(4, 4, norm="ln")


# ---------------------------------------------------------------- networks

def tiny(name: str, **kw) -> nn.Module:
    sizes = {"preresnet_drop": dict(depth=11, base_width=4), "wrn_drop": dict(depth=10, arg1=1, base_width=4),
             "densenet_drop": dict(depth=10, arg1=4),
             "resnext_drop": dict(depth=11, arg1=2, base_width=2, widen_factor=1)}
    return build_model(name, **{**sizes[name], **kw})


def _train_step(model: nn.Module, in_channels: int = 3, size: int = 12) -> float:
    torch.manual_seed(0)
    x, y = torch.randn(4, in_channels, size, size), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    assert model(x).shape == (4, 10)
    return loss.item()


@pytest.mark.parametrize("block_type", [0, 1, 2, 3])
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_every_block_type_and_norm_trains_a_step(block_type, norm):
    _train_step(tiny("preresnet_drop", block_type=block_type, norm=norm, drop_type="channel",
                     drop_rate=0.2, report_ratio=True))


@pytest.mark.parametrize("name", ["preresnet_drop", "wrn_drop", "densenet_drop", "resnext_drop"])
@pytest.mark.parametrize("drop_type", ["neuron", "channel", "path", "layer"])
def test_every_network_and_level_trains_a_step(name, drop_type):
    mode = "batch" if drop_type == "layer" else "row"
    _train_step(tiny(name, drop_type=drop_type, drop_rate=0.3, drop_mode=mode, in_channels=1), in_channels=1)


def test_parameter_counts():
    # hand count, preresnet depth 11 (one bottleneck per stage, widths 16/32/64, expansion 4):
    # stem 3*16*9=432; stage 1: bn 32+32+32, convs 256+2304+1024, shortcut 1024 -> 4704;
    # stage 2: bn 128+64+64, convs 2048+9216+4096, shortcut 8192 -> 23808;
    # stage 3: bn 256+128+128, convs 8192+36864+16384, shortcut 32768 -> 94720; head bn 512, fc 2570
    assert count_params(build_model("preresnet_drop", depth=11)) == 126746
    # published sizes: WRN-28-10 36.5M (Zagoruyko & Komodakis), DenseNet-BC-100 k=12 0.8M
    assert count_params(build_model("wrn_drop", depth=28, arg1=10)) == 36479194
    assert count_params(build_model("densenet_drop", depth=100, arg1=12)) == 769162
    with pytest.raises(ConfigError, match=r"9n\+2"):
        build_model("preresnet_drop", depth=12)
    with pytest.raises(ConfigError, match=r"6n\+4"):
        build_model("wrn_drop", depth=12)
    with pytest.raises(ConfigError, match="cardinality"):
        build_model("resnext_drop", depth=11, arg1=2.5)


def test_resnext_paths_are_its_groups_and_drop_layer_leaves_the_shortcut():
    net = tiny("resnext_drop", drop_type="path", drop_rate=0.2)
    paths = [m for m in net.modules() if isinstance(m, DropPath)]
    assert len(paths) == 3 and all(m.groups == 2 for m in paths)
    # drop-layer: a dropped sample's block output is exactly its shortcut
    torch.manual_seed(5)
    block = tiny("preresnet_drop", drop_type="layer", drop_rate=0.5).stages[0].train()
    x = torch.randn(64, 4, 6, 6)
    out, short = block(x), block.shortcut(x)
    dropped = (out == short).flatten(1).all(1)
    assert 10 < int(dropped.sum()) < 54
    assert not bool((out[~dropped] == short[~dropped]).flatten(1).all(1).any())


def test_model_from_config():
    assert model_from_config(make_config(), 10, 3) is None
    cfg = make_config(net_type="resnet", depth=11, arg1=0.25, drop_type="1", drop_rate=0.1, block_type=2,
                      norm="gn", model_kwargs={"base_width": 8})
    net = model_from_config(cfg, num_classes=7, in_channels=1)
    assert net.fc.out_features == 7 and net.stem.in_channels == 1 and net.stem.out_channels == 8
    assert sum(isinstance(m, DropChannel) for m in net.modules()) == 3
    assert isinstance(net.head_norm, nn.GroupNorm)
    via_model = model_from_config(make_config(model="wrn_drop", depth=10, arg1=1, drop_type="layer",
                                              drop_rate=0.1, model_kwargs={"drop_mode": "batch"}), 10, 3)
    assert {m.mode for m in via_model.modules() if isinstance(m, DropLayer)} == {"batch"}
    with pytest.raises(ConfigError, match="net_type"):
        model_from_config(make_config(net_type="vgg"), 10, 3)
    with pytest.raises(ConfigError, match="contradicts"):
        model_from_config(make_config(net_type="wrn", model="densenet_drop"), 10, 3)


# ---------------------------------------------------------------- variance shift

def test_tracked_norm_hand_computed_ratios():
    tn = TrackedNorm(nn.BatchNorm2d(1))
    tn.train()(torch.tensor([0.0, 4.0]).view(2, 1, 1, 1))   # mean 2, var 4
    tn.eval()(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))    # mean 2, var 1
    assert tn.ratios() == (1.0, 0.25)
    tn.eval()(torch.tensor([5.0, 5.0, 5.0, 5.0]).view(4, 1, 1, 1))  # mean 5, var 0; weighted by batch size:
    assert tn.ratios() == pytest.approx(((2 * 2 + 4 * 5) / 6 / 2, (2 * 1 + 4 * 0) / 6 / 4))  # (2, 1/12)
    tn.reset()
    assert all(math.isnan(r) for r in tn.ratios())
    # the output is the wrapped norm's, and the statistics are not saved with the model
    x = torch.randn(4, 1, 3, 3)
    assert torch.equal(tn.eval()(x), tn.norm(x))
    assert set(tn.state_dict()) == {"norm." + k for k in nn.BatchNorm2d(1).state_dict()}


@pytest.mark.parametrize("block_type,where", [(0, "stages.0.body.2.norm"), (2, "stages.0.body.1.norm")])
def test_tracking_wraps_the_norm_after_each_dropout(block_type, where):
    net = tiny("preresnet_drop", depth=20, block_type=block_type, drop_type="neuron", report_ratio=True)
    names = [n for n, m in net.named_modules() if isinstance(m, TrackedNorm)]
    assert len(names) == 6 and names[0] == where
    # drop-layer: the norm after block i's dropped residual is block i+1's first norm, then the head's
    net = tiny("preresnet_drop", drop_type="layer", report_ratio=True)
    assert [n for n, m in net.named_modules() if isinstance(m, TrackedNorm)] == \
        ["stages.1.body.0.norm", "stages.2.body.0.norm", "head_norm"]
    with pytest.raises(ConfigError, match="already tracked"):
        track_norms_after_dropout(net)
    with pytest.raises(ConfigError, match="drop_type"):
        tiny("preresnet_drop", report_ratio=True)


def test_variance_shift_ratio_is_exactly_one_at_rate_zero():
    x = torch.randn(8, 4, 6, 6)
    block = conv_block(4, 8, 3, 1, 2, "neuron", 0.0, "bn")
    track_norms_after_dropout(block)
    block.train()(x)
    block.eval()(x)
    assert block.norm.ratios() == (1.0, 1.0)
    # a whole network with GroupNorm (same computation in train and eval), every tracked layer
    net = tiny("preresnet_drop", depth=20, norm="gn", drop_type="channel", drop_rate=0.0, report_ratio=True)
    net.train()(x[:, :3])
    net.eval()(x[:, :3])
    assert all(layer.ratios() == pytest.approx((1.0, 1.0), rel=1e-5) for layer in tracked_norms(net))


def test_variance_shift_callback_logs_first_middle_last():
    x = torch.randn(16, 3, 8, 8)
    for rate in (0.0, 0.5):
        torch.manual_seed(0)
        net = tiny("preresnet_drop", depth=20, norm="gn", drop_type="neuron", drop_rate=rate, report_ratio=True)
        trainer = SimpleNamespace(model=net)
        cb = VarianceShift()
        cb.on_fit_start(trainer)
        cb.on_epoch_start(trainer, 1)
        with torch.no_grad():
            net.train()(x)
            net.eval()(x)
        row = {"epoch": 1}
        cb.on_epoch_end(trainer, 1, row)
        assert set(columns()) <= set(row)
        if rate == 0.0:
            assert all(row[k] == pytest.approx(1.0, rel=1e-5) for k in columns())
        else:  # dropout inflates the training-time variance: eval/train < 1
            assert row["ratio_var_first"] < 0.9
        summary = {}
        cb.on_fit_end(trainer, summary)
        assert summary["ratio_var_last"] == row["ratio_var_last"]
    with pytest.raises(ConfigError, match="tracked"):
        VarianceShift().on_fit_start(SimpleNamespace(model=tiny("preresnet_drop")))


def test_callback_plugin_registration():
    assert callbacks_from_config(make_config()) == []
    cbs = callbacks_from_config(make_config(net_type="wrn", drop_type="neuron", report_ratio=True))
    assert len(cbs) == 1 and isinstance(cbs[0], VarianceShift)
    from cifarlab.train.plugins import PLUGINS
    assert "cifarlab.dropout.variance_shift" in PLUGINS


# ---------------------------------------------------------------- through the Trainer and the CLI

def test_train_command_with_dropout_network_and_variance_shift(tmp_path):
    import json

    import pandas as pd

    from cifarlab.cli import main

    run = tmp_path / "run"
    args = ["train", "--recipe", "dropout", "--model", "preresnet_drop", "--net-type", "preresnet",
            "--depth", "11", "--arg1", "0.25", "--block-type", "2", "--drop-type", "1", "--drop-rate", "0.2",
            "--report-ratio", "--dataset", "synthetic:1x8x8", "--train-subset", "128", "--test-subset", "64",
            "--batch-size", "32", "--epochs", "4", "--device", "cpu", "--progress", "off",
            "--run-dir", str(run)]
    assert main(args) == 0
    metrics = pd.read_csv(run / "metrics.csv")
    # the dropout recipe: x0.1 at 50% and 75% of the epochs
    assert metrics["lr"].tolist() == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert set(columns()) <= set(metrics.columns)
    assert metrics[columns()].notna().all().all() and (metrics[columns()] > 0).all().all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "preresnet_drop" and summary["finished"] is True
    assert summary["ratio_var_last"] == pytest.approx(metrics["ratio_var_last"].iloc[-1])
    # killed after epoch 2 and resumed: the same run, dropout draws and ratios included
    from cifarlab.cli import build_parser, config_from_args
    from cifarlab.train import Callback, Trainer

    class Kill(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 3:
                raise RuntimeError("killed")

    resumed = tmp_path / "resumed"
    cfg = config_from_args(build_parser().parse_args(args[:-1] + [str(resumed)]))
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg, callbacks=[Kill()]).fit()
    assert main(args[:-1] + [str(resumed), "--resume"]) == 0
    again = pd.read_csv(resumed / "metrics.csv")
    same = ["lr", "train_loss", "train_acc", "val_loss", "val_acc"] + columns()
    pd.testing.assert_frame_equal(again[same], metrics[same])
    assert main(["train", "--net-type", "preresnet", "--drop-type", "spatial", "--drop-rate", "0.1",
                 "--run-dir", str(tmp_path / "bad")]) == 2


# ---------------------------------------------------------------- the report section

def _fake_run(root, name, block_type, drop_type, rate, error, ratios, seed=0, group="dropout"):
    import json

    import yaml

    run = root / group / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(dict(
        model="preresnet_drop", net_type="preresnet", depth=11, arg1=1.0, block_type=block_type,
        drop_type=drop_type, drop_rate=rate, norm="bn", model_kwargs={"base_width": 8}, dataset="fashion",
        epochs=2, seed=seed)))
    (run / "summary.json").write_text(json.dumps(dict(model="preresnet_drop", dataset="fashion", epochs=2,
                                                      epochs_completed=2, test_error=error, finished=True)))
    head = "epoch,val_acc," + ",".join(columns())
    rows = [f"{e},0.5," + ",".join(str(r) for r in ratios[e - 1] for _ in range(2)) for e in (1, 2)]
    (run / "metrics.csv").write_text("\n".join([head] + rows) + "\n")


def test_report_section_tables_and_figure(tmp_path):
    from cifarlab.dropout.report_section import FIGURE, dropout_section

    log, img = tmp_path / "log", tmp_path / "img"
    assert dropout_section(log, img) is None
    _fake_run(log, "b0-none", 0, "neuron", 0.0, 12.5, [(1.0, 0.98, 0.97), (1.0, 0.99, 0.96)])
    _fake_run(log, "b0-channel-0.1", 0, "1", 0.1, 11.25, [(0.9, 0.8, 0.7), (0.91, 0.81, 0.71)])
    _fake_run(log, "b2-layer-0.1", 2, "layer", 0.1, 13.0, [(0.95, 0.9, 0.85), (0.96, 0.92, 0.875)])
    md = dropout_section(log, img)
    # pivot: one row per (level, rate), one column per block type; 'none' first
    assert "| level | rate | mode | block type 0 | block type 2 |" in md
    assert "| none | 0.00 | — | 12.50 | — |" in md
    assert "| channel | 0.10 | — | 11.25 | — |" in md
    assert "| layer | 0.10 | row | — | 13.00 |" in md
    # per run: the last epoch's variance ratios (first, middle, last)
    assert ("| b0-channel-0.1 | preresnet-11 arg1=1 base_width=8 | bn | 0 | channel | 0.10 | — | 0 | — | 11.25 | "
            "0.910 | 0.810 | 0.710 | 2 |") in md
    # last epoch, mean of first/middle/last: (1 + 0.99 + 0.96) / 3, (0.91 + 0.81 + 0.71) / 3, (0.96 + 0.92 + 0.875) / 3
    assert "- block type 0: none 0.983, channel 0.1 0.810" in md
    assert "- block type 2: layer 0.1 0.918" in md
    assert f"img/{FIGURE}" in md and (img / FIGURE).is_file()
    first = (img / FIGURE).read_bytes()
    assert dropout_section(log, img) == md and (img / FIGURE).read_bytes() == first  # deterministic
    assert "gain +1.25 points, one seed: spread not measured" in md  # no verdict from a single seed


def test_report_section_aggregates_seeds_and_judges_the_gain_against_their_spread(tmp_path):
    """Hand-computed: no dropout 12, 13, 14 (mean 13, std 1); channel 0.1 at 10.5, 11, 11.5
    (mean 11, std 0.5): gain 2 > 1 + 0.5, it helps (channel 0.3 at one seed, 9, is not the repeated
    setting, so not the verdict's); layer 0.1 at 12, 12.5 (mean 12.25, std 0.3536):
    gain 0.75 < 1.35, within the spread; path 0.1 at 14, 15: no gain. Another group is its own study."""
    from cifarlab.dropout.report_section import dropout_section

    log, img = tmp_path / "log", tmp_path / "img"
    r = [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0)]
    for seed, err in enumerate((12.0, 13.0, 14.0)):
        _fake_run(log, f"b0-none-s{seed}", 0, "neuron", 0.0, err, r, seed=seed, group="dropout-fashion")
    for seed, err in enumerate((10.5, 11.0, 11.5)):
        _fake_run(log, f"b0-channel-0.1-s{seed}", 0, "channel", 0.1, err, [(0.9, 0.9, 0.9), (0.8, 0.7, 0.6)],
                  seed=seed, group="dropout-fashion")
    # a lower error at one seed does not displace the setting repeated over three
    _fake_run(log, "b0-channel-0.3", 0, "channel", 0.3, 9.0, r, group="dropout-fashion")
    for seed, err in enumerate((12.0, 12.5)):
        _fake_run(log, f"b0-layer-0.1-s{seed}", 0, "layer", 0.1, err, r, seed=seed, group="dropout-fashion")
    for seed, err in enumerate((14.0, 15.0)):
        _fake_run(log, f"b0-path-0.1-s{seed}", 0, "path", 0.1, err, r, seed=seed, group="dropout-fashion")
    _fake_run(log, "b0-none", 0, "neuron", 0.0, 30.0, r)  # another group: its own study
    # a *_drop network trained at rate 0 for a course table (no --net-type, no ratios) is no study
    course = log / "cpu-fashion" / "preresnet20"
    course.mkdir(parents=True)
    (course / "config.yaml").write_text("model: preresnet_drop\nnet_type: null\ndrop_rate: 0.0\nreport_ratio: false\n")
    (course / "summary.json").write_text('{"model": "preresnet_drop", "test_error": 7.0, "finished": true}')
    md = dropout_section(log, img)
    assert "### cpu-fashion" not in md
    own = md[md.index("### dropout-fashion"):]
    assert md.index("### dropout\n") < md.index("### dropout-fashion")
    assert "| none | 0.00 | — | 13.00 ± 1.00 (n=3) |" in own
    assert "| channel | 0.10 | — | 11.00 ± 0.50 (n=3) |" in own
    assert "| layer | 0.10 | row | 12.25 ± 0.35 (n=2) |" in own
    assert "- block type 0: no dropout 13.00 ± 1.00 (n=3), variance ratio 1.000" in own
    # channel: last-epoch ratio mean (0.8 + 0.7 + 0.6) / 3 = 0.7 for every seed
    assert ("  - channel (best rate 0.1): 11.00 ± 0.50 (n=3), variance ratio 0.700; **helps**: gain 2.00 points "
            "> spread 1.50") in own
    assert "  - layer (best rate 0.1, row): 12.25 ± 0.35 (n=2), variance ratio 1.000; gain 0.75 points within the spread 1.35" in own
    assert "  - path (best rate 0.1, row): 14.50 ± 0.71 (n=2), variance ratio 1.000; no gain (-1.50 points)" in own
    assert "30.00" not in own and "| none | 0.00 | — | 30.00 |" in md
    assert (img / "dropout-variance-shift-dropout-fashion.png").is_file()
