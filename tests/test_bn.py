"""The BatchNorm study: Santurkar probes pinned by hand, probing leaves training unchanged,
concurrent (vmap) landscape training equals sequential, divergence handling, CLI, report."""
from __future__ import annotations

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
from cifarlab.batchnorm.probes import gradient_at, probe_along_gradient
from cifarlab.config import make_config
from cifarlab.errors import ConfigError

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


# -- the callback: probing does not change training ---------------------------------------------
def hand_loop(callbacks, steps=6, run_dir=None):
    """The Trainer's hook order on a few Adam steps of the tiny BN net."""
    torch.manual_seed(0)
    model = nn.Sequential(Tiny(), nn.Dropout(0.2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = SimpleNamespace(model=model, loss_fn=F.cross_entropy, device=torch.device("cpu"), run_dir=run_dir,
                        epoch=1, global_step=0, is_main=True, autocast=lambda: torch.autocast("cpu", enabled=False))
    for cb in callbacks:
        cb.on_fit_start(t)
        cb.on_epoch_start(t, 1)
    for step in range(steps):
        x, y = tiny_batch(seed=step)
        for cb in callbacks:
            cb.on_batch_start(t, x, y)
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
    probed, opt, row = hand_loop([BNProbeCallback(2, [0.1, 0.01])], run_dir=tmp_path)
    for (k, a), b in zip(ref.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    df = pd.read_csv(tmp_path / "probes.csv")
    assert list(df.columns) == ["step", "epoch", "eta", "loss", "grad_diff", "ratio", "beta", "grad_norm",
                                "train_loss"]
    assert df["step"].tolist() == [0, 0, 2, 2, 4, 4] and df["eta"].tolist() == [0.1, 0.01] * 3
    assert np.allclose(df["ratio"], df["grad_diff"] / (df["eta"] * df["grad_norm"]), rtol=1e-5)
    assert (df.groupby("step")["ratio"].max() == df.groupby("step")["beta"].first()).all()
    assert df["train_loss"].notna().all() and row["probe_beta_median"] > 0


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


def test_speedup_measurement_reports_both_timings():
    batches = landscape_data()(1)
    sp = L.measure_speedup(Tiny, [1e-2, 1e-3], batches, seed=0, warmup=1)
    assert sp["models"] == 2 and sp["steps"] == 3 and sp["sequential_s"] > 0 and sp["concurrent_s"] > 0
    with pytest.raises(ConfigError):
        L.train_landscape("tiny", Tiny, [], landscape_data(), 1)
    with pytest.raises(ConfigError):
        L.train_landscape("tiny", Tiny, [0.1, -1.0], landscape_data(), 1)


# -- the command, figures and report section ----------------------------------------------------
STUDY_ARGS: list[str] = []


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """One small study through the CLI, on the tiny plain / BN pair and 8x8 synthetic images."""
    from cifarlab.cli import main

    out = tmp_path_factory.mktemp("bn") / "study"
    STUDY_ARGS[:] = args = ["bn", "--models", "bntest,bntest_bn", "--dataset", "synthetic:1x8x8:4", "--train-subset", "48",
            "--test-subset", "16", "--batch-size", "16", "--epochs", "2", "--lrs", "1e-3,1e-2,1e30",
            "--probe-interval", "2", "--probe-steps", "0.1,0.01", "--device", "cpu", "--progress", "off",
            "--speedup-steps", "1", "--run-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        register_tiny_pair(mp)
        assert main(args) == 0
    return out


def test_bn_command_writes_the_study(study_dir):
    s = json.loads((study_dir / "summary.json").read_text())
    assert s["finished"] is True and s["study"] == "bn" and s["models"] == ["bntest", "bntest_bn"]
    for name in ("config.yaml", "log.txt", "landscape_losses.csv", "landscape_band.csv", "landscape.png",
                 "probe_loss.png", "probe_grad_diff.png", "probe_beta.png", "probes/bntest_bn/probes.csv"):
        assert (study_dir / name).is_file(), name
    runs = pd.read_csv(study_dir / L.RUNS_CSV)
    assert runs.groupby("model")["diverged"].apply(list).to_dict() == {"bntest": [False, False, True],
                                                                        "bntest_bn": [False, False, True]}
    assert s["speedup"]["steps"] == 1 and s["speedup"]["speedup"] > 0
    assert set(s["probe_overhead_pct"]) == {"bntest", "bntest_bn"}
    assert s["landscape"]["bntest_bn"]["diverged"] and s["probes"]["bntest_bn"]["probes"] == 3  # steps 0, 2, 4


def test_bn_command_refuses_bad_input_and_finished_runs(study_dir, tmp_path, capsys):
    from cifarlab.cli import main

    common = ["--dataset", "synthetic:1x8x8:4", "--run-dir", str(tmp_path / "x")]
    assert main(["bn", "--models", "nope"] + common) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bn", "--lrs", "1e-3,abc"] + common) == 2
    assert main(["bn", "--lrs", "0"] + common) == 2
    assert main(["bn", "--no-probes", "--no-landscape"] + common) == 2
    assert main(["bn", "--models", "vgg_a_light", "--run-dir", str(study_dir)]) == 2
    assert "finished" in capsys.readouterr().err


def test_resume_keeps_finished_stages(study_dir, tmp_path):
    """An interrupted study (no summary.json yet) resumed: finished stages are kept, not redone."""
    import shutil

    from cifarlab.cli import main

    run = tmp_path / "study"
    shutil.copytree(study_dir, run)
    (run / "summary.json").unlink()
    landscape = (run / L.LOSSES_CSV).read_bytes()
    args = [a if a != str(study_dir) else str(run) for a in STUDY_ARGS]
    assert main(args) == 2  # without --resume the folder is refused
    with pytest.MonkeyPatch.context() as mp:
        register_tiny_pair(mp)
        assert main(args + ["--resume"]) == 0
    assert (run / L.LOSSES_CSV).read_bytes() == landscape
    log = (run / "log.txt").read_text()
    assert "landscape: finished earlier, kept" in log and log.count("finished earlier, kept (") == 2
    assert json.loads((run / "summary.json").read_text())["finished"] is True


def test_report_section_states_the_comparison(study_dir, tmp_path):
    import shutil

    from cifarlab.batchnorm.report_section import bn_section

    assert bn_section(tmp_path / "nothing", tmp_path / "img") is None
    log_root = tmp_path / "log"
    shutil.copytree(study_dir, log_root / "bn" / "tiny", ignore=shutil.ignore_patterns("checkpoints"))
    md = bn_section(log_root, tmp_path / "img")
    assert "img/bn_tiny_landscape.png" in md and (tmp_path / "img" / "bn_tiny_landscape.png").is_file()
    for verdict in ("Loss landscape: the band of **bntest_bn** is", "narrower", "smaller", "predictive"):
        assert verdict in md  # the three verdicts, with numbers
    assert "1e+30 (step" in md  # the diverged rate is named in the table
    assert md == bn_section(log_root, tmp_path / "img")  # deterministic


def test_report_section_tables_the_probe_overhead(tmp_path):
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
