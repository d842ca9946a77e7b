"""Grad-CAM on pytorch-grad-cam, ROAD scores, the insight tools and the cam/insight commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from cifarlab.interpret.gradcam import (DEFAULT_METHODS, cam_figure, cam_study, compute_cams,
                                       default_layer, road_scores)
from cifarlab.interpret.insight import confusion_matrix, most_confident_mistakes, per_class_accuracy
from cifarlab.cli import main
from cifarlab.errors import ConfigError


class TinyNet(nn.Module):
    """stage1 keeps 8x8, stage2 halves it to 4x4, then pool + linear (3 classes)."""

    def __init__(self, in_channels=3, classes=3):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.stage2(self.stage1(x))).flatten(1))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode outputs depend on them
        model.stage1[1].running_mean.uniform_(-0.5, 0.5)
        model.stage2[1].running_var.uniform_(0.5, 2.0)
    return model


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def test_default_layer_is_last_map_and_previous_stage(tiny):
    assert default_layer(tiny, (3, 8, 8)) == "stage2"
    assert default_layer(tiny, (3, 8, 8), "previous") == "stage1"
    assert no_hooks(tiny)
    with pytest.raises(ConfigError, match="last', 'previous'"):
        default_layer(tiny, (3, 8, 8), "first")


def test_default_layers_of_cifar_resnets():
    from cifarlab.models import build_model

    r18 = build_model("resnet18")  # REFERENCE.md: on 32x32, layer4 is 4x4, layer3 8x8
    assert default_layer(r18, (3, 32, 32)) == "layer4"
    assert default_layer(r18, (3, 32, 32), "previous") == "layer3"
    # bottleneck blocks stride inside layer4's first block: still layer3, not a conv in layer4.0
    r50 = build_model("resnet50", in_channels=1)
    assert default_layer(r50, (1, 28, 28), "previous") == "layer3"


def test_one_cam_per_image_with_its_own_target(tiny):
    torch.manual_seed(1)
    image = torch.randn(1, 3, 8, 8)
    batch = image.repeat(3, 1, 1, 1)  # the same image three times, three different classes
    cams = compute_cams(tiny, batch, [0, 1, 2], "gradcam")
    assert cams.shape == (3, 8, 8)
    assert not np.allclose(cams[1], cams[0]) and not np.allclose(cams[2], cams[0])
    for i, cls in enumerate([0, 1, 2]):  # each row is exactly that image's CAM for its class
        np.testing.assert_allclose(cams[i], compute_cams(tiny, image, [cls], "gradcam")[0], atol=1e-5)
    with pytest.raises(ConfigError, match="one target per image"):
        compute_cams(tiny, batch, [0], "gradcam")


@pytest.mark.parametrize("start_training", [True, False])
def test_mode_grads_and_hooks_left_as_found(tiny, start_training):
    tiny.train(start_training)
    tiny.stage1[1].eval()  # a mixed state must come back exactly, module by module
    modes = [m.training for m in tiny.modules()]
    stats = tiny.stage2[1].running_mean.clone()
    x = torch.randn(2, 3, 8, 8)
    for method in DEFAULT_METHODS:
        cams = compute_cams(tiny, x, [0, 2], method, layer="previous")
        assert cams.shape == (2, 8, 8) and np.isfinite(cams).all()
    assert [m.training for m in tiny.modules()] == modes
    assert no_hooks(tiny)
    assert all(p.grad is None for p in tiny.parameters())
    torch.testing.assert_close(tiny.stage2[1].running_mean, stats)  # CAMs ran in eval mode


class HalfSum(nn.Module):
    """logit 0 = sum of the left half of the image; logit 1 = 0."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].sum(dim=(1, 2, 3))
        return torch.stack([left, torch.zeros_like(left)], 1)


def test_road_rewards_the_map_that_points_at_the_evidence():
    # Image: left half 1, right half 0; the class score is the left half's sum (32). A CAM
    # ranking the left half first: removing its top 50% (the left half, imputed from the
    # right's zeros) drops the score by 32, removing its bottom 50% changes nothing, so
    # ROAD-combined = (0 - (-32)) / 2 = +16; the mirrored CAM scores -16.
    x = torch.zeros(1, 1, 8, 8)
    x[..., :4] = 1.0
    ramp = np.tile(np.linspace(1.0, 0.0, 8, dtype=np.float32), (8, 1))[None]
    model = HalfSum()
    good = road_scores(model, x, ramp, [0], percentiles=(50,))
    bad = road_scores(model, x, ramp[..., ::-1].copy(), [0], percentiles=(50,))
    assert good.shape == (1,)
    assert good[0] == pytest.approx(16.0, abs=0.5)
    assert bad[0] == pytest.approx(-16.0, abs=0.5)
    # seeded imputation noise: the same call gives the same number
    assert road_scores(model, x, ramp, [0], percentiles=(50,))[0] == good[0]


def test_cam_study_figure_and_road(tiny, tmp_path):
    x = torch.randn(3, 3, 8, 8)
    study = cam_study(tiny, x, [0, 1, 2], ["gradcam", "Grad-CAM++", "eigencam"], road_percentiles=(30, 70))
    assert study.layer == "stage2"
    assert list(study.cams) == ["gradcam", "gradcam++", "eigencam"]
    assert all(s.shape == (3,) and np.isfinite(s).all() for s in study.road.values())
    assert set(study.road_table()) == {"gradcam", "gradcam++", "eigencam"}
    assert len(study.preds) == 3
    path = cam_figure(study, tmp_path / "cam.png", mean=(0.5,), std=(0.2,), class_names=["a", "b", "c"], title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert no_hooks(tiny)


def test_bad_method_and_layer_are_clear(tiny):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="unknown CAM method 'gradkam'"):
        compute_cams(tiny, x, [0], "gradkam")
    with pytest.raises(ConfigError, match="no layer 'layer9'.*stage1, stage2"):
        compute_cams(tiny, x, [0], "gradcam", layer="layer9")


# -- insight: the pure functions on hand cases ----------------------------------------------
def test_confusion_matrix_and_per_class_accuracy_by_hand():
    y_true = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 2, 0, 2]
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    acc = per_class_accuracy(cm)
    assert acc[:3].tolist() == pytest.approx([0.5, 1.0, 2 / 3])
    assert np.isnan(acc[3])  # no examples of class 3
    with pytest.raises(ConfigError):
        confusion_matrix([0, 5], [0, 1], 4)


def test_most_confident_mistakes_by_hand():
    probs = np.array([[0.9, 0.1],   # right
                      [0.2, 0.8],   # wrong, 0.8
                      [0.05, 0.95],  # wrong, 0.95
                      [0.6, 0.4],   # wrong, 0.6
                      [0.2, 0.8]])  # wrong, 0.8 (tie with 1: lower index first)
    y = [0, 0, 0, 1, 0]
    assert most_confident_mistakes(probs, y, k=3).tolist() == [2, 1, 4]
    assert most_confident_mistakes(probs, y, k=10).tolist() == [2, 1, 4, 3]


# -- the commands on a real (tiny) run made by the Trainer ----------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from cifarlab.config import make_config
    from cifarlab.train import Trainer

    run_dir = tmp_path_factory.mktemp("runs") / "lenet"
    cfg = make_config(model="lenet5", dataset="synthetic:1x28x28", epochs=1, train_subset=128,
                      test_subset=32, batch_size=32, lr=0.05, run_dir=str(run_dir), progress="off")
    Trainer(cfg).fit()
    return run_dir


def test_cam_command_on_a_trained_run(finished_run, tmp_path, capsys):
    out = tmp_path / "cam.png"
    rc = main(["cam", "--run-dir", str(finished_run), "--methods", "gradcam,scorecam", "--n", "3",
               "--layer", "previous", "--out", str(out)])
    assert rc == 0
    assert out.is_file()
    meta = json.loads((tmp_path / "cam.json").read_text())
    assert meta["layer"] == "conv1" and meta["methods"] == ["gradcam", "scorecam"]
    assert list(meta["road_combined"]) == ["gradcam", "scorecam"]
    assert "layer conv1" in capsys.readouterr().out  # lenet5: conv2 is last, conv1 before it


def test_insight_command_on_a_trained_run(finished_run, tmp_path):
    assert main(["insight", "--run-dir", str(finished_run), "--out", str(tmp_path / "ins"), "--mistakes", "4"]) == 0
    for name in ("filters.png", "feature_maps.png", "confusion.png", "mistakes.png"):
        assert (tmp_path / "ins" / name).read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "ins" / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,examples,correct,accuracy_pct" and len(rows) == 11
    assert sum(int(r.split(",")[1]) for r in rows[1:]) == 32  # the run's test subset


def test_cam_command_without_checkpoint_is_one_error_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "lenet5", "dataset": "fashion"}))
    assert main(["cam", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no checkpoint in") and "best.pt" in err[0]
    assert main(["cam", "--run-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run directory")
