"""Grad-CAM on pytorch-grad-cam, ROAD scores, the insight tools and the cam/insight commands."""
from __future__ import annotations

import inspect
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from cifarlab.interpret.gradcam import (DEFAULT_METHODS, LayerInfo, cam_figure, cam_study, compute_cams,
                                       default_layer, resolve_layer, road_scores, spatial_layers)
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


def test_layer_maps_are_c_h_w_and_at_least_2x2(tiny):
    infos = {i.name: i for i in spatial_layers(tiny, (3, 8, 8))}
    # (C, H, W) of the output and of the input, and who made the input
    assert infos["stage2"] == LayerInfo("stage2", (8, 4, 4), (8, 8, 8), "stage1")
    assert infos["stage1"] == LayerInfo("stage1", (8, 8, 8), (3, 8, 8), None)  # the model's input
    assert default_layer(tiny, (3, 4, 4)) == "stage2"  # a 2x2 map still counts
    assert default_layer(tiny, (3, 2, 8)) == "stage1"  # stage2 is 1x4: not a map, however wide
    assert resolve_layer(tiny, "", (3, 8, 8)) == "stage2"  # empty = the default
    with pytest.raises(ConfigError, match=r"^TinyNet has no layer with a spatial output of at least 2x2 "
                                          r"for inputs of shape \(3, 1, 1\)$"):
        default_layer(tiny, (3, 1, 1))


@pytest.mark.parametrize("stride", [(1, 2), (2, 1)])
def test_previous_layer_on_non_square_maps(tiny, stride):
    # stage2 halves one side only: 8x8 -> 8x4 or 4x8, area 64 -> 32: still a step down from stage1
    tiny.stage2[0] = nn.Conv2d(8, 8, 3, stride=stride, padding=1)
    assert default_layer(tiny, (3, 8, 8)) == "stage2"
    assert default_layer(tiny, (3, 8, 8), "previous") == "stage1"
    tiny.stage2[0] = nn.Conv2d(8, 8, 3, padding=1)  # no step down at all
    with pytest.raises(ConfigError, match="^TinyNet: no layer before 'stage2' has a larger feature map$"):
        default_layer(tiny, (3, 8, 8), "previous")


class LateName(nn.Module):
    """The stage before is named 'b'; the step-down stage 'a' makes an 8x8 map of its own (a.0)
    before its strided conv, so the step-down modules' inputs come from 'a.0' (made later) and 'b'."""

    def __init__(self):
        super().__init__()
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.a(self.b(x)).mean(dim=(2, 3)))


class KeywordNet(TinyNet):
    """stage2 is called with a keyword argument: its forward hook sees no positional input."""

    def forward(self, x):
        return self.fc(self.pool(self.stage2(input=self.stage1(x))).flatten(1))


def test_previous_layer_by_finish_order_and_keyword_calls():
    late = LateName()
    assert default_layer(late, (3, 8, 8)) == "a"
    assert default_layer(late, (3, 8, 8), "previous") == "b"  # finished first, though named last
    torch.manual_seed(0)
    kw = KeywordNet()
    assert spatial_layers(kw, (3, 8, 8))[-2] == LayerInfo("stage2", (8, 4, 4), None, None)
    assert default_layer(kw, (3, 8, 8)) == "stage2"
    assert default_layer(kw, (3, 8, 8), "previous") == "stage1"  # from stage2.0, which got it positionally
    assert no_hooks(kw)


def test_one_cam_per_image_with_its_own_target(tiny):
    torch.manual_seed(1)
    image = torch.randn(1, 3, 8, 8)
    batch = image.repeat(3, 1, 1, 1)  # the same image three times, three different classes
    cams = compute_cams(tiny, batch, [0, 1, 2], "gradcam")
    assert cams.shape == (3, 8, 8)
    assert not np.allclose(cams[1], cams[0]) and not np.allclose(cams[2], cams[0])
    for i, cls in enumerate([0, 1, 2]):  # each row is exactly that image's CAM for its class
        # (the default method is Grad-CAM)
        np.testing.assert_allclose(cams[i], compute_cams(tiny, image, [cls])[0], atol=1e-5)
    with pytest.raises(ConfigError, match="^need one target per image: 1 targets for 2 images$"):
        compute_cams(tiny, batch[:2], [0], "gradcam")
    with pytest.raises(ConfigError, match=r"^images must be a batch \(N, C, H, W\), got shape \(3, 8, 8\)$"):
        compute_cams(tiny, image[0], [0], "gradcam")


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


class Recorder(TinyNet):
    """TinyNet that notes the batch size of every forward pass."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return super().forward(x)


def test_score_cam_is_quiet_and_batched_as_asked(capsys):
    torch.manual_seed(0)
    model = Recorder()
    x = torch.randn(2, 3, 8, 8)
    capsys.readouterr()
    cams = compute_cams(model, x, [0, 1], "scorecam", layer="stage2", score_batch=3)  # named: no dry run
    assert cams.shape == (2, 8, 8)
    assert capsys.readouterr().err == ""  # no progress bar on stderr
    # one pass on the batch, then per image its 8 stage2 channels as masks, at most 3 at a time
    assert model.batches == [2] + [3, 3, 2] * 2


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
    # seeded imputation noise: the same call gives the same number; the default seed is 0
    assert road_scores(model, x, ramp, [0], percentiles=(50,))[0] == good[0]
    assert road_scores(model, x, ramp, [0], percentiles=(50,), seed=0)[0] == good[0]
    assert road_scores(model, x, ramp, [0], percentiles=(50,), seed=1)[0] != good[0]


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


def test_cam_study_on_the_layer_asked_and_without_road(tiny):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8)
    study = cam_study(tiny, x, [0, 2], ["gradcam"], layer="previous", road=False)
    assert study.layer == "stage1" and study.road == {} and study.road_table() == {}
    np.testing.assert_array_equal(study.cams["gradcam"], compute_cams(tiny, x, [0, 2], "gradcam", "stage1"))
    assert not np.allclose(study.cams["gradcam"], compute_cams(tiny, x, [0, 2], "gradcam", "stage2"), atol=1e-3)
    with pytest.raises(ConfigError, match="^target must be 'label' or 'pred', got 'both'$"):
        cam_study(tiny, x, [0, 2], ["gradcam"], target="both")


def test_bad_method_and_layer_are_clear(tiny):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"unknown CAM method 'gradkam'; choose from: gradcam, gradcam\+\+, "
                                          r"scorecam, eigencam, layercam, hirescam, xgradcam, eigengradcam$"):
        compute_cams(tiny, x, [0], "gradkam")
    with pytest.raises(ConfigError, match="^no layer 'layer9' in TinyNet; top-level modules: stage1, stage2, pool, fc "):
        compute_cams(tiny, x, [0], "gradcam", layer="layer9")
    # a class the model does not have: the package swallows its IndexError; ours names method and layer
    with pytest.raises(RuntimeError, match="^Grad-CAM failed on layer 'stage2': index 5 is out of bounds"):
        compute_cams(tiny, x, [5], "gradcam")
    assert no_hooks(tiny)


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


def spy(monkeypatch, module, name) -> list[dict]:
    """Replace module.name by a pass-through that records each call's arguments by name."""
    real = getattr(module, name)
    sig, calls = inspect.signature(real), []

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_run_cam_defaults_are_the_documented_ones(finished_run, tmp_path, monkeypatch):
    """run_cam(run_dir) alone: the last spatial layer, true-class targets, 8 images from seed 0,
    the best checkpoint, ROAD scored; the sidecar says which run, model and data, with the ROAD
    means to 6 decimals, as indented JSON."""
    from cifarlab.interpret import gradcam

    figures = spy(monkeypatch, gradcam, "cam_figure")
    study, out = gradcam.run_cam(finished_run, methods=["gradcam"], out=tmp_path / "g.png")
    text = (tmp_path / "g.json").read_text()
    meta = json.loads(text)
    assert {k: meta[k] for k in ("layer", "target", "n", "seed", "checkpoint")} == \
        {"layer": "conv2", "target": "label", "n": 8, "seed": 0, "checkpoint": "best"}
    assert {k: meta[k] for k in ("run_dir", "model", "dataset", "methods")} == \
        {"run_dir": str(finished_run), "model": "lenet5", "dataset": "synthetic:1x28x28", "methods": ["gradcam"]}
    road = study.road_table()
    assert list(road) == ["gradcam"] and math.isfinite(road["gradcam"])
    assert meta["road_combined"] == {"gradcam": round(road["gradcam"], 6)}
    assert text.startswith('{\n  "run_dir": ') and text.endswith("\n}\n")
    assert out == tmp_path / "g.png" and out.is_file()
    (fig,) = figures
    assert fig["study"] is study and fig["path"] == out
    assert fig["title"] == "lenet5 on synthetic:1x28x28, layer conv2, true class explained"


def test_run_cam_options_are_used_not_just_recorded(finished_run, tmp_path, monkeypatch):
    """checkpoint, target, n, seed, road, data_root and device reach the model, the images, the
    CAMs and the figure; without out= the figure and its sidecar go into the run directory."""
    from cifarlab.interpret import gradcam, insight

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "checkpoints" / "best.pt").unlink()  # only last.pt: checkpoint='last' must be what is loaded
    loads = spy(monkeypatch, insight, "load_test_images")
    figures = spy(monkeypatch, gradcam, "cam_figure")
    study, out = gradcam.run_cam(run_dir, methods=["gradcam"], n=3, seed=3, target="pred", checkpoint="last",
                                 road=False, data_root="elsewhere", device="cpu")
    assert out == run_dir / "gradcam.png" and out.is_file()
    meta = json.loads((run_dir / "gradcam.json").read_text())
    assert {k: meta[k] for k in ("checkpoint", "target", "n", "seed", "road_combined")} == \
        {"checkpoint": "last", "target": "pred", "n": 3, "seed": 3, "road_combined": {}}
    assert [c["data_root"] for c in loads] == ["elsewhere"]  # synthetic data reads no files: the value is passed on
    (fig,) = figures
    assert fig["title"] == "lenet5 on synthetic:1x28x28, layer conv2, predicted class explained"

    run = insight.load_run_model(run_dir, "last")
    assert fig["class_names"] == run.info.classes
    x, y = insight.load_test_images(run.cfg, run.info, n=3, seed=3)
    torch.testing.assert_close(study.images, x)
    assert study.labels == y.tolist() and study.road == {}
    assert study.preds != study.labels  # so explaining the prediction is not explaining the label
    np.testing.assert_allclose(study.cams["gradcam"], compute_cams(run.model, x, study.preds, "gradcam", "conv2"),
                               atol=1e-5)
    one, _ = gradcam.run_cam(run_dir, methods=["gradcam"], n=1, checkpoint="last", road=False,
                             out=tmp_path / "one.png")
    assert len(one.labels) == 1 and one.cams["gradcam"].shape == (1, 28, 28)


def test_run_cam_arguments_are_checked_before_loading(tmp_path):
    from cifarlab.interpret.gradcam import run_cam

    missing = tmp_path / "no-run"  # never reached: each argument error comes first
    with pytest.raises(ConfigError, match=r"^device must be auto, cpu, cuda or cuda:N, got 'tpu'$"):
        run_cam(missing, device="tpu")
    with pytest.raises(ConfigError, match="^the number of images must be positive, got 0$"):
        run_cam(missing, n=0)
    with pytest.raises(ConfigError, match="^give at least one CAM method$"):
        run_cam(missing, methods=[" ", ""])
    if not torch.cuda.is_available():  # cuda and cuda:N pass the check, then the machine has none
        for dev in ("cuda", "cuda:0"):
            with pytest.raises(ConfigError, match=f"^device '{dev}': CUDA is not available"):
                run_cam(missing, device=dev)


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
