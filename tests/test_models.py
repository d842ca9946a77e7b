"""The model zoo: exact parameter counts, shapes on 3x32x32 and 1x28x28, options, errors.

Parameter counts and module types are checked on the meta device (no memory, no init cost);
forward passes use real tensors at batch 2 in eval mode.
"""
from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torchvision

from cifarlab.config import ACTIVATIONS
from cifarlab.errors import ConfigError
from cifarlab.models import available_models, build_model
from cifarlab.models.layers import activation_names, make_activation
from cifarlab.models.registry import _MODELS


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, **kw)


# --- exact counts (10 classes, 3x32x32) ------------------------------------------------------
# REFERENCE.md section 1 (the seed's table and the course starter's VGG-A figures).
REFERENCE_COUNTS = {
    "resnet18": 11_173_962,
    "preact_resnet18": 11_171_146,
    "wrn28_10": 36_489_290,
    "resnext29_32x4d": 4_774_218,
    "densenet121": 6_956_298,
    "dpn26": 11_574_842,
    "dla": 16_291_386,
    "resnet50": 23_520_842,
    "resnext29_2x32d": 2_297_418,
    "resnext29_2x64d": 9_128_778,
    "resnext29_8x64d": 89_598_282,
    "resnext50_2x40d": 17_296_650,
    "resnext50_8x14d": 20_864_362,
    "resnext50_32x4d": 22_991_178,
    "vgg_a": 9_750_922,
    "vgg_a_bn": 9_756_426,
    "vgg_a_bn_full": 9_758_474,
    "vgg_a_light": 285_162,
    "vgg_a_light_bn": 285_258,  # vgg_a_light + 2 per BN channel: 285,162 + 2 * (16 + 32)
}


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_reference_parameter_counts(name):
    assert n_params(meta_model(name)) == REFERENCE_COUNTS[name]


def test_wrn28_10_without_conv_biases():
    assert n_params(meta_model("wrn28_10", bias=False)) == 36_479_194


# Published torchvision ImageNet counts (1000 classes). The small-input ResNets differ only in
# the stem (3x3 instead of 7x7 kernels: 3*64*(49-9) fewer weights) and the classifier width.
TORCHVISION_1000 = {"resnet18": (11_689_512, 512), "resnet34": (21_797_672, 512),
                    "resnet50": (25_557_032, 2048), "resnet101": (44_549_160, 2048),
                    "resnet152": (60_192_808, 2048)}


@pytest.mark.parametrize("name", sorted(TORCHVISION_1000))
def test_small_input_resnets_derive_from_torchvision_counts(name):
    tv, feat = TORCHVISION_1000[name]
    expected = tv - 3 * 64 * (7 * 7 - 3 * 3) - (feat * 1000 + 1000) + (feat * 10 + 10)
    assert n_params(meta_model(name)) == expected
    if name in REFERENCE_COUNTS:  # the derivation agrees with the seed's figures
        assert expected == REFERENCE_COUNTS[name]
    # stronger: every parameter tensor has torchvision's shape except the stem conv
    with torch.device("meta"):
        ref = getattr(torchvision.models, name)(num_classes=10)
    ours = Counter(tuple(p.shape) for p in meta_model(name).parameters())
    theirs = Counter(tuple(p.shape) for p in ref.parameters())
    assert ours - theirs == Counter({(64, 3, 3, 3): 1})
    assert theirs - ours == Counter({(64, 3, 7, 7): 1})


def he_resnet_params(depth, classes=10, in_ch=3):
    """Hand count of He et al.'s CIFAR ResNet with option-B (1x1 conv + BN) projections."""
    n = (depth - 2) // 6
    total, c_in = in_ch * 16 * 9 + 2 * 16, 16  # stem conv + BN
    for c in (16, 32, 64):
        for _ in range(n):
            total += c_in * c * 9 + c * c * 9 + 2 * (2 * c)  # two 3x3 convs, two BNs
            if c_in != c:
                total += c_in * c + 2 * c  # projection conv + BN
            c_in = c
    return total + 64 * classes + classes


def test_he_resnet_formula_matches_the_paper_figure():
    # ResNet-20 with option A is the well-known 269,722 (0.27M); B adds 16*32+64 + 32*64+128.
    assert he_resnet_params(20) - (16 * 32 + 64 + 32 * 64 + 128) == 269_722


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_counts(depth):
    assert n_params(meta_model(f"resnet{depth}")) == he_resnet_params(depth)
    assert n_params(meta_model("cifar_resnet", depth=depth)) == he_resnet_params(depth)


def wrn_params(depth, k, classes=10, in_ch=3, bias=True):
    """Hand count of WRN-depth-k with conv biases (pre-activation blocks, 1x1 projections)."""
    n, b = (depth - 4) // 6, int(bias)
    total, c_in = in_ch * 16 * 9 + 16 * b, 16
    for c in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c_in + (c_in * c * 9 + c * b) + 2 * c + (c * c * 9 + c * b)
            if c_in != c:
                total += c_in * c + c * b
            c_in = c
    return total + 2 * c_in + c_in * classes + classes


def test_wrn_formula_reproduces_the_reference_figures():
    assert wrn_params(28, 10) == 36_489_290
    assert wrn_params(28, 10, bias=False) == 36_479_194


@pytest.mark.parametrize("name,depth,k", [("wrn16_4", 16, 4), ("wrn16_2", 16, 2), ("wrn40_2", 40, 2)])
def test_other_wrn_counts(name, depth, k):
    assert n_params(meta_model(name)) == wrn_params(depth, k)
    assert n_params(meta_model("wide_resnet", depth=depth, widen=k)) == wrn_params(depth, k)
    assert n_params(meta_model(name, bias=False)) == wrn_params(depth, k, bias=False)


def test_lenet5_counts():
    # conv1 (c*6*25+6) + conv2 2,416 + conv3 48,120 + fc1 10,164 + fc2 850
    assert n_params(meta_model("lenet5", in_channels=1)) == 156 + 2_416 + 48_120 + 10_164 + 850 == 61_706
    assert n_params(meta_model("lenet5")) == 62_006


def test_squeezenet_keeps_torchvision_kernels():
    with torch.device("meta"):
        ref = torchvision.models.squeezenet1_1(num_classes=10)
    assert n_params(meta_model("squeezenet1_1")) == n_params(ref) == 727_626
    assert [p.shape for p in meta_model("squeezenet1_1").parameters()] == [p.shape for p in ref.parameters()]


def test_alexnet_count_and_shapes():
    convs = (3 * 64 * 9 + 64) + (64 * 192 * 25 + 192) + (192 * 384 * 9 + 384) \
        + (384 * 256 * 9 + 256) + (256 * 256 * 9 + 256)
    fcs = (1024 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    model = meta_model("alexnet")
    assert n_params(model) == convs + fcs == 23_468_874
    with torch.device("meta"):
        ref = torchvision.models.alexnet(num_classes=10)
    ours = Counter(tuple(p.shape) for p in model.parameters())
    theirs = Counter(tuple(p.shape) for p in ref.parameters())
    assert ours - theirs == Counter({(64, 3, 3, 3): 1, (4096, 1024): 1})  # small stem, 2x2 pool


def test_dpn92_regression_pin():
    # Not derived independently: the count this code gives for DPN-92 (same block code as the
    # reference-pinned DPN-26, blocks 3-4-20-3). A change here means the definition changed.
    assert n_params(meta_model("dpn92")) == 34_236_634


# --- every registered model ------------------------------------------------------------------
REQUIRED = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "preact_resnet18",
    "wrn28_10", "wrn16_4", "wrn16_2", "wrn40_2", "wide_resnet",
    "resnext29_32x4d", "resnext29_2x32d", "resnext29_2x64d", "resnext29_8x64d",
    "resnext50_2x40d", "resnext50_8x14d", "resnext50_32x4d",
    "densenet121", "dpn26", "dpn92", "dla",
    "vgg_a", "vgg_a_bn", "vgg_a_bn_full", "vgg_a_light", "lenet5",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "alexnet", "squeezenet1_1",
]


def test_available_models_lists_every_required_name():
    names = available_models()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("name", available_models())
def test_forward_shapes_cifar_and_fashion(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    gray = build_model(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        out = gray(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", available_models())
def test_in_channels_only_changes_the_stem(name):
    # 3 -> 1 input channels removes exactly two input planes of the first conv's kernel.
    rgb, gray = meta_model(name), meta_model(name, in_channels=1)
    stem = next(m for m in rgb.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 3
    per_plane = stem.out_channels * stem.kernel_size[0] * stem.kernel_size[1] // stem.groups
    assert n_params(rgb) - n_params(gray) == 2 * per_plane


# --- activation choice -----------------------------------------------------------------------
def test_activation_names_match_the_config():
    assert tuple(activation_names()) == tuple(ACTIVATIONS)


def _takes_activation(name):
    return "activation" in inspect.signature(_MODELS[name]).parameters


ACT_MODELS = [n for n in available_models() if _takes_activation(n)]
EXPECTED_TYPE = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU}


def test_required_families_take_an_activation():
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "vgg_a", "vgg_a_bn", "vgg_a_bn_full", "vgg_a_light"]:
        assert name in ACT_MODELS, name


@pytest.mark.parametrize("name", ACT_MODELS)
def test_activation_replaces_every_relu(name):
    n_relu = sum(isinstance(m, nn.ReLU) for m in meta_model(name).modules())
    assert n_relu > 0
    gelu = meta_model(name, activation="gelu")
    assert not any(isinstance(m, nn.ReLU) for m in gelu.modules())
    assert sum(isinstance(m, nn.GELU) for m in gelu.modules()) == n_relu


@pytest.mark.parametrize("name", ["resnet18", "vgg_a", "vgg_a_bn", "vgg_a_bn_full", "vgg_a_light"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_each_activation_builds_its_module_type(name, act):
    types = {type(m) for m in meta_model(name, activation=act).modules()}
    others = set(EXPECTED_TYPE.values()) - {EXPECTED_TYPE[act]}
    assert EXPECTED_TYPE[act] in types and not (types & others)


@pytest.mark.parametrize("name", ["resnet18", "vgg_a_light"])
def test_activation_is_used_in_the_forward_pass(name):
    # Same seed -> same weights (activations draw no random numbers) -> outputs differ only
    # because the nonlinearity differs.
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for act in ("relu", "elu"):
        torch.manual_seed(0)
        model = build_model(name, activation=act).eval()
        with torch.no_grad():
            outs[act] = model(x)
    torch.manual_seed(0)
    with torch.no_grad():
        again = build_model(name, activation="relu").eval()(x)
    assert torch.equal(outs["relu"], again)
    assert not torch.allclose(outs["relu"], outs["elu"])


def test_make_activation():
    assert isinstance(make_activation(None), nn.ReLU)
    assert isinstance(make_activation("SiLU"), nn.SiLU)
    with pytest.raises(ConfigError, match="unknown activation 'swish'.*relu, leaky_relu, elu, gelu, silu"):
        make_activation("swish")
    with pytest.raises(ConfigError, match="unknown activation"):
        build_model("resnet18", activation="tanh")


# --- errors ----------------------------------------------------------------------------------
def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_model("resnet19")
    msg = str(err.value)
    assert "'resnet19'" in msg and "\n" not in msg
    for name in ("resnet18", "wrn28_10", "vgg_a_bn", "lenet5"):
        assert name in msg


@pytest.mark.parametrize("name,kw,pattern", [
    ("resnet18", {"widen": 2}, "unexpected keyword"),
    ("wide_resnet", {"depth": 27}, "depth must be 6n\\+4"),
    ("wide_resnet", {"widen": 0}, "widen must be a positive integer"),
    ("wrn16_4", {"dropout": 1.5}, "dropout must be in"),
    ("cifar_resnet", {"depth": 21}, "depth must be 6n\\+2"),
    ("resnext", {"depth": 38}, "depth must be 29 or 50"),
    ("resnext", {"cardinality": 0}, "cardinality must be a positive integer"),
    ("densenet121", {"reduction": 0.0}, "reduction must be in"),
    ("alexnet", {"dropout": -0.1}, "dropout must be in"),
])
def test_bad_options_are_config_errors(name, kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        meta_model(name, **kw)


def test_family_options_are_exposed():
    wrn = meta_model("wrn16_4", dropout=0.3)
    assert [m.p for m in wrn.modules() if isinstance(m, nn.Dropout)] == [0.3] * 6  # 2 blocks x 3 stages
    assert n_params(meta_model("densenet121", growth_rate=12)) < n_params(meta_model("densenet121"))
    assert n_params(meta_model("resnext", depth=29, cardinality=32, bottleneck_width=4)) == 4_774_218
    assert n_params(meta_model("resnext", depth=50, cardinality=2, bottleneck_width=40)) == 17_296_650


# --- structure other code relies on ----------------------------------------------------------
def _spatial_sizes(model, names, x):
    sizes, mods = {}, dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[2:])))
             for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


def test_resnet18_names_and_feature_map_sizes():
    model = build_model("resnet18")
    names = dict(model.named_children())
    for attr in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"):
        assert attr in names, attr
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # no ImageNet max-pool
    layers = ["layer1", "layer2", "layer3", "layer4"]
    assert list(_spatial_sizes(model, layers, torch.randn(2, 3, 32, 32)).values()) == \
        [(32, 32), (16, 16), (8, 8), (4, 4)]
    gray = build_model("resnet18", in_channels=1)
    assert _spatial_sizes(gray, ["layer4"], torch.randn(2, 1, 28, 28))["layer4"] == (4, 4)


def test_vgg_layout_init_and_ceil_mode_pools():
    model = build_model("vgg_a_bn")
    assert set(dict(model.named_children())) >= {"features", "classifier"}
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)  # zero bias (course starter)
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8 and all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    # BN sits between each conv and its activation
    kinds = [type(m) for m in model.features]
    assert all(kinds[i + 1] is nn.BatchNorm2d and kinds[i + 2] is nn.ReLU
               for i, k in enumerate(kinds) if k is nn.Conv2d)
    # 28x28 survives all five pools (28-14-7-4-2-1); 32x32 is unchanged (32-16-8-4-2-1)
    for shape in [(2, 3, 32, 32), (2, 3, 28, 28)]:
        assert _spatial_sizes(model, ["features"], torch.randn(shape))["features"] == (1, 1)


def test_vgg_xavier_normal_init_has_the_right_spread():
    torch.manual_seed(0)
    fc = build_model("vgg_a").classifier[0]  # Linear(512, 512): std = sqrt(2 / (512 + 512))
    assert isinstance(fc, nn.Linear) and fc.weight.shape == (512, 512)
    assert abs(fc.weight.std().item() - (2 / 1024) ** 0.5) < 0.002


def test_vgg_a_light_layout():
    model = build_model("vgg_a_light")
    assert [type(m) for m in model.features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [16, 32]
    assert [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, nn.Linear)] == \
        [(32 * 8 * 8, 128), (128, 128), (128, 10)]


def test_lenet5_names_and_conv3_sizes():
    model = build_model("lenet5", in_channels=1)
    assert list(dict(model.named_children()))[:5] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert model.conv3.weight.shape == (120, 16, 5, 5) and model.fc1.weight.shape == (84, 120)
    assert _spatial_sizes(model, ["conv3"], torch.randn(2, 1, 28, 28))["conv3"] == (1, 1)
    rgb = build_model("lenet5")
    assert _spatial_sizes(rgb, ["conv3"], torch.randn(2, 3, 32, 32))["conv3"] == (2, 2)


def test_cifar_resnet_uses_option_b_projections():
    model = build_model("resnet20")
    shortcuts = [b.shortcut for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    projections = [s for s in shortcuts if len(s) > 0]
    assert len(projections) == 2  # only where 16->32 and 32->64 channels change
    assert [type(m) for m in projections[0]] == [nn.Conv2d, nn.BatchNorm2d]
    assert model.linear.in_features == 64


def test_small_input_adaptations_keep_resolution():
    alex = build_model("alexnet")
    sq = build_model("squeezenet1_1")
    for shape, alex_size, sq_size in [((2, 3, 32, 32), (4, 4), (8, 8)), ((2, 3, 28, 28), (4, 4), (7, 7))]:
        assert _spatial_sizes(alex, ["features"], torch.randn(shape))["features"] == alex_size
        assert _spatial_sizes(sq, ["features"], torch.randn(shape))["features"] == sq_size
    assert isinstance(sq.features[2], nn.Identity)  # torchvision's first max-pool, dropped


# --- through the Trainer ---------------------------------------------------------------------
def test_trains_through_the_trainer(tmp_path):
    from cifarlab.config import make_config
    from cifarlab.train import Trainer

    cfg = make_config(dict(model="resnet20", activation="gelu", dataset="synthetic:1x28x28:10",
                           train_subset=64, test_subset=32, batch_size=32, epochs=1, lr=0.05,
                           device="cpu", progress="off", run_dir=str(tmp_path / "run")))
    summary = Trainer(cfg).fit()
    assert summary["finished"] is True and summary["epochs_completed"] == 1
    assert summary["params"] == he_resnet_params(20, in_ch=1)
    assert (tmp_path / "run" / "summary.json").is_file()
