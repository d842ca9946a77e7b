"""Grad-CAM on pytorch-grad-cam, ROAD scores, the insight tools and the cam/insight commands."""
from __future__ import annotations

import json
import math

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


class Planted(nn.Module):
    """Class c's logit is the mean of input channel c, passed through an identity 1x1 conv + ReLU
    (the CAM layer): Grad-CAM's weights are 1/HW on channel c only, so the CAM for class c is
    channel c of the image, normalised - it lights up exactly where that class's evidence is."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def planted_batch():
    """Two 8x8 images, each with a weak blob of its labelled class and a strong blob of the other
    class, so the model predicts the other class: predictions differ from labels everywhere."""
    x = torch.zeros(2, 2, 8, 8)
    x[0, 0, 0:2, 0:2] = 1.0  # label 0: weak class-0 evidence top-left
    x[0, 1, 6:8, 6:8] = 3.0  # strong class-1 evidence bottom-right -> predicted 1
    x[1, 1, 0:2, 6:8] = 1.0  # label 1: weak class-1 evidence top-right
    x[1, 0, 6:8, 0:2] = 3.0  # strong class-0 evidence bottom-left -> predicted 0
    return x, [0, 1]


def blob_of(cam: np.ndarray) -> tuple[int, int]:
    """(row, col) quadrant of the CAM's mass: 0 = top / left, 1 = bottom / right."""
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(r >= cam.shape[0] // 2), int(c >= cam.shape[1] // 2)


def test_cam_study_explains_the_label_or_the_prediction(tmp_path):
    model = Planted()
    x, labels = planted_batch()
    methods = ["gradcam", "Grad-CAM++", "eigencam"]
    by_label = cam_study(model, x, labels, methods, road_percentiles=(30, 70))
    by_pred = cam_study(model, x, labels, methods, target="pred", road_percentiles=(30, 70))
    for study in (by_label, by_pred):
        assert study.layer == "features" and study.labels == [0, 1] and study.preds == [1, 0]
        assert list(study.cams) == ["gradcam", "gradcam++", "eigencam"]
    where = {"label": [(0, 0), (0, 1)], "pred": [(1, 1), (1, 0)]}  # quadrants of each image's evidence
    for target, study in (("label", by_label), ("pred", by_pred)):
        for m in ("gradcam", "gradcam++"):  # class-specific methods follow the target
            assert [blob_of(c) for c in study.cams[m]] == where[target], (target, m)
            # the whole map is that class's blob: inside ~1, everywhere else 0
            for cam, (r, c) in zip(study.cams[m], where[target]):
                inside = cam[6 * r:6 * r + 2, 6 * c:6 * c + 2]
                assert inside.min() > 0.9 and cam.sum() == pytest.approx(inside.sum(), abs=1e-4)
        # ROAD scored each map against the same class it explains
        expected = road_scores(model, x, study.cams["gradcam"], study.labels if target == "label" else study.preds,
                               percentiles=(30, 70))
        np.testing.assert_array_equal(study.road["gradcam"], expected)
        assert set(study.road_table()) == {"gradcam", "gradcam++", "eigencam"}
    # Eigen-CAM ignores the target: the same map both ways
    np.testing.assert_array_equal(by_label.cams["eigencam"], by_pred.cams["eigencam"])
    path = cam_figure(by_pred, tmp_path / "cam.png", mean=(0.5,), std=(0.2,), class_names=["a", "b"], title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert no_hooks(model)


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


def test_run_cam_defaults_are_the_documented_ones(finished_run, tmp_path):
    """run_cam(run_dir) alone: the last spatial layer, true-class targets, 8 images from seed 0,
    the best checkpoint, ROAD scored; written next to the run unless out= is given."""
    from cifarlab.interpret.gradcam import run_cam

    _, out = run_cam(finished_run, methods=["gradcam"], out=tmp_path / "g.png")
    meta = json.loads((tmp_path / "g.json").read_text())
    assert {k: meta[k] for k in ("layer", "target", "n", "seed", "checkpoint")} == \
        {"layer": "conv2", "target": "label", "n": 8, "seed": 0, "checkpoint": "best"}
    assert list(meta["road_combined"]) == ["gradcam"] and math.isfinite(meta["road_combined"]["gradcam"])
    assert out == tmp_path / "g.png" and out.is_file()


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
