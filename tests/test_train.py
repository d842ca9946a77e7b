"""The training engine: run directory contract, resume after SIGKILL, bad input, divergence, DDP."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cifarlab.cli import main
from cifarlab.config import make_config
from cifarlab.train import Callback, Trainer

REPO = Path(__file__).resolve().parents[1]
# A tiny job: LeNet-5 on seeded synthetic images, a few hundred of them.
TINY = ["--model", "lenet5", "--dataset", "synthetic", "--train-subset", "256", "--test-subset", "128",
        "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--progress", "off"]
# A tiny dropout network: its masks come from the global RNG, so a resume that does not restore
# the RNG state trains differently from an uninterrupted run (LeNet-5 draws no random numbers).
RANDOM_TINY = ["--model", "preresnet_drop", "--depth", "11", "--arg1", "0.25", "--drop-type", "neuron",
               "--drop-rate", "0.3", "--dataset", "synthetic:3x16x16", "--train-subset", "256",
               "--test-subset", "128", "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--progress", "off"]
SCORE_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc"]


def tiny_config(tmp_path, **kw):
    base = dict(model="lenet5", dataset="synthetic", train_subset=256, test_subset=128, batch_size=64,
                lr=0.05, device="cpu", progress="off", epochs=2, run_dir=str(tmp_path / "run"))
    base.update(kw)
    return make_config(base)


def run_cli(*args, env_extra=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cifarlab", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fit_writes_the_run_directory_contract(tmp_path):
    summary = Trainer(tiny_config(tmp_path)).fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "log.txt", "summary.json", "curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns[:8]) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                                         "epoch_time_s", "images_per_s"]
    assert metrics["epoch"].tolist() == [1, 2]
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("model", "dataset", "params", "flops", "epochs_completed", "best_epoch", "best_val_acc",
                "test_acc", "test_error", "wall_time_s", "diverged"):
        assert key in on_disk, key
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["epochs_completed"] == 2 and on_disk["diverged"] is False and on_disk["finished"] is True
    from cifarlab.machine import hardware_label
    assert on_disk["hardware"] == hardware_label("cpu")  # every run says where it ran
    assert on_disk["best_val_acc"] == pytest.approx(metrics["val_acc"].max(), abs=1e-6)
    assert on_disk["test_error"] == pytest.approx(100 * (1 - on_disk["test_acc"]))
    # LeNet-5, 3 input channels: 456 + 2,416 + 48,120 + 10,164 + 850
    assert on_disk["params"] == 62006
    log_lines = (run / "log.txt").read_text().splitlines()
    assert sum(line.startswith("epoch") for line in log_lines) == 2


def test_training_learns_the_synthetic_task(tmp_path):
    summary = Trainer(tiny_config(tmp_path, epochs=4, train_subset=1024, lr=0.05)).fit()
    assert summary["test_acc"] > 0.5  # 10 classes: chance is 0.1


class _RecordVal(Callback):
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, trainer, epoch, row):
        self.epochs.append(epoch)
        row["extra_column"] = epoch * 10


def test_callbacks_add_columns_and_see_every_epoch(tmp_path):
    cb = _RecordVal()
    Trainer(tiny_config(tmp_path, epochs=3), callbacks=[cb]).fit()
    assert cb.epochs == [1, 2, 3]
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["extra_column"].tolist() == [10, 20, 30]


class _Snapshots(Callback):
    """The model's state at the end of every epoch, to tell afterwards whose weights were scored."""

    def __init__(self):
        self.states = {}

    def on_epoch_end(self, trainer, epoch, row):
        self.states[epoch] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    def epoch_of(self, state, current):
        hits = [e for e, s in self.states.items() if all(torch.equal(s[k], state[k]) for k in s)]
        assert len(hits) <= 1, hits
        return hits[0] if hits else current  # not snapshotted yet: the epoch being trained


def script_evaluation(monkeypatch, snaps, val=None, test=None):
    """Replace Trainer.evaluate: validation accuracy scripted per epoch; test accuracy scripted per
    epoch *of the weights scored* (None: the real evaluation). Records every call."""
    real = Trainer.evaluate
    calls = []

    def evaluate(self, loader):
        if loader is self.data.val and val is not None:
            calls.append(("val", self.epoch))
            return 1.0 - val[self.epoch - 1], val[self.epoch - 1]
        if loader is self.data.test:
            weights_of = snaps.epoch_of(self.model.state_dict(), self.epoch)
            calls.append(("test", weights_of))
            if test is not None:
                return 1.0 - test[weights_of - 1], test[weights_of - 1]
        return real(self, loader)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return calls


def test_best_checkpoint_is_the_first_validation_peak_and_test_is_scored_once(tmp_path, monkeypatch):
    # validation peaks at epoch 2 and ties at 4; the test set would prefer epoch 3. Model selection
    # must follow validation, keep the first of equal peaks, and look at the test set once, at the end.
    val = [0.50, 0.80, 0.60, 0.80, 0.70]
    test = [0.40, 0.60, 0.90, 0.50, 0.55]
    snaps = _Snapshots()
    calls = script_evaluation(monkeypatch, snaps, val, test)
    summary = Trainer(tiny_config(tmp_path, epochs=5, train_subset=64, test_subset=32, batch_size=32),
                      callbacks=[snaps]).fit()
    assert [c for c in calls if c[0] == "test"] == [("test", 2)]
    assert summary["best_epoch"] == 2 and summary["best_val_acc"] == 0.80
    assert summary["test_acc"] == 0.60 and summary["test_error"] == pytest.approx(40.0)
    best = torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == 2 and snaps.epoch_of(best["model"], None) == 2
    assert pd.read_csv(tmp_path / "run/metrics.csv")["val_acc"].tolist() == val
    assert "(best-validation checkpoint, epoch 2)" in (tmp_path / "run/log.txt").read_text()


def test_test_set_is_scored_with_the_best_validation_checkpoint(tmp_path, monkeypatch):
    # validation (scripted) is best after epoch 1 of 3, so best.pt is not the last weights; the
    # test set is scored for real: its loss must be that of epoch 1's weights, re-scored by hand
    cfg = tiny_config(tmp_path, epochs=3)
    real_evaluate = Trainer.evaluate
    snaps = _Snapshots()
    calls = script_evaluation(monkeypatch, snaps, val=[0.9, 0.5, 0.7])
    summary = Trainer(cfg, callbacks=[snaps]).fit()
    assert summary["best_epoch"] == 1 and calls[-1] == ("test", 1)
    best = torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == 1 and snaps.epoch_of(best["model"], None) == 1
    t = Trainer(cfg, write=False)
    t._setup()
    scores = {}
    for epoch in (1, 3):
        t.model.load_state_dict(snaps.states[epoch])
        scores[epoch] = real_evaluate(t, t.data.test)
    assert scores[1] != scores[3]  # the two candidates are distinguishable
    assert (summary["test_loss"], summary["test_acc"]) == pytest.approx(scores[1], abs=1e-9)


@pytest.mark.parametrize("val, halved_from", [
    # flat validation: epoch 1 sets the best, epochs 2 and 3 are bad (2 > patience 1), so the rate
    # is halved after epoch 3 (training loss still falls, so a schedule on it would not halve)
    ([0.5, 0.5, 0.5, 0.5], 4),
    # tiny gains: validation *error* falls by 5e-4 relative each epoch, above the 1e-4 threshold,
    # so it never halves (on 2 - acc, or 1 + acc, the gains would be too small or losses)
    ([0.9, 0.90005, 0.9001, 0.90015], None),
])
def test_plateau_schedule_is_stepped_each_epoch_on_validation_error(tmp_path, monkeypatch, val, halved_from):
    snaps = _Snapshots()
    script_evaluation(monkeypatch, snaps, val)
    Trainer(tiny_config(tmp_path, epochs=4, scheduler="plateau", plateau_patience=1, plateau_factor=0.5,
                        train_subset=128, test_subset=32), callbacks=[snaps]).fit()
    lrs = pd.read_csv(tmp_path / "run/metrics.csv")["lr"].tolist()
    expected = [0.05 if halved_from is None or e < halved_from else 0.025 for e in range(1, 5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_is_stepped_each_epoch(tmp_path):
    Trainer(tiny_config(tmp_path, epochs=3, scheduler="cosine", train_subset=64, test_subset=32)).fit()
    lrs = pd.read_csv(tmp_path / "run/metrics.csv")["lr"].tolist()
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)], rel=1e-9)


@pytest.mark.parametrize("kill", ["after-epoch", "during-save"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, kill):
    args = [*RANDOM_TINY, "--epochs", "4", "--scheduler", "cosine"]
    ref = run_cli("train", *args, "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    if kill == "during-save":
        # the 4th checkpoint save (epoch 2's best.pt or last.pt) dies halfway through its write
        died = run_cli("train", *args, "--run-dir", str(run), env_extra={"CIFARLAB_KILL_DURING_SAVE": "4"})
        assert died.returncode == -signal.SIGKILL
    else:
        proc = subprocess.Popen([sys.executable, "-m", "cifarlab", "train", *args, "--run-dir", str(run)],
                                cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "checkpoints/last.pt").exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "summary.json").exists()
    resumed = run_cli("train", *args, "--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = pd.read_csv(tmp_path / "ref/metrics.csv")[SCORE_COLUMNS]
    b = pd.read_csv(run / "metrics.csv")[SCORE_COLUMNS]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa = json.loads((tmp_path / "ref/summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    for key in ("test_acc", "test_loss", "best_epoch", "best_val_acc", "epochs_completed"):
        assert sa[key] == sb[key], key
    wa = torch.load(tmp_path / "ref/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(run / "checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _Killed(BaseException):
    """Stands in for SIGKILL inside one process: nothing after the raise runs."""


class _CountEpochs(Callback):
    """A callback with state: how many epochs it has seen, carried through last.pt."""

    def __init__(self):
        self.seen = 0

    def on_epoch_end(self, trainer, epoch, row):
        self.seen += 1
        row["epochs_seen"] = self.seen

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class _KillAtEpochStart(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise _Killed


def test_in_process_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    # The SIGKILL tests above run the CLI in a child process, which mutation testing cannot trace;
    # this one resumes in-process: a dropout network (masks from the global RNG), momentum and a
    # cosine schedule, so the epoch counter, optimizer, scheduler, RNG and the best-epoch
    # bookkeeping must all come back from last.pt for the run to match, weight for weight.
    # Validation is scripted to peak at epoch 2, before the interruption, and never again.
    script_evaluation(monkeypatch, _Snapshots(), val=[0.50, 0.90, 0.60, 0.70])
    kw = dict(model="preresnet_drop", depth=11, arg1=0.25, drop_type="neuron", drop_rate=0.3,
              dataset="synthetic:3x16x16", epochs=4, scheduler="cosine")
    ref = Trainer(tiny_config(tmp_path / "a", **kw), callbacks=[_CountEpochs()]).fit()
    assert ref["best_epoch"] == 2
    cfg = tiny_config(tmp_path / "b", **kw)
    with pytest.raises(_Killed):
        Trainer(cfg, callbacks=[_CountEpochs(), _KillAtEpochStart(3)]).fit()
    run = tmp_path / "b/run"
    last = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert last["epoch"] == 2 and not (run / "summary.json").exists()
    best_before = tree_digest(run / "checkpoints")["best.pt"]
    last["wall_time_s"] = 1000.0  # as if the first part had run for 1,000 s: the total must include it
    torch.save(last, run / "checkpoints/last.pt")
    torch.manual_seed(12345)  # whatever ran in between, the resumed run must not see it
    counter = _CountEpochs()
    resumed = Trainer(tiny_config(tmp_path / "b", resume=True, **kw), callbacks=[counter]).fit()
    assert counter.seen == 4  # 2 restored from last.pt + 2 after the resume
    a = pd.read_csv(tmp_path / "a/run/metrics.csv")[[*SCORE_COLUMNS, "epochs_seen"]]
    b = pd.read_csv(run / "metrics.csv")[[*SCORE_COLUMNS, "epochs_seen"]]
    assert b["epoch"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for key in ("test_acc", "test_loss", "best_epoch", "best_val_acc", "epochs_completed"):
        assert ref[key] == resumed[key], key
    assert tree_digest(run / "checkpoints")["best.pt"] == best_before  # epoch 2 stays the best
    assert 1000.0 < resumed["wall_time_s"] < 1000.0 + 600
    wa = torch.load(tmp_path / "a/run/checkpoints/last.pt", weights_only=True)
    wb = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wa["global_step"] == wb["global_step"] and wa["scheduler"] == wb["scheduler"]
    assert sum(line.startswith("epoch") for line in (run / "log.txt").read_text().splitlines()) == 4


def test_non_finite_loss_stops_cleanly_as_diverged(tmp_path):
    summary = Trainer(tiny_config(tmp_path, lr=1e12, optimizer="sgd", epochs=5, scheduler="none")).fit()
    on_disk = json.loads((tmp_path / "run/summary.json").read_text())
    assert on_disk["diverged"] is True and summary["diverged"] is True
    assert on_disk["epochs_completed"] < 5
    assert "diverged" in (tmp_path / "run/log.txt").read_text()


# -- the epoch loop with training and evaluation scripted: selection, schedule, summary, log, plots ----------
def script_training(monkeypatch, losses, accs, n=100, seconds=0.0):
    """Replace Trainer._train_epoch: (loss, accuracy, images) of epoch e from the lists; no weights change."""
    def train_epoch(self, epoch):
        if seconds:
            time.sleep(seconds)
        return losses[epoch - 1], accs[epoch - 1], n

    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)


class _SummarySeen(Callback):
    def on_fit_end(self, trainer, summary):
        self.summary = dict(summary)


def test_divergence_names_its_epoch_and_reports_no_best(tmp_path, monkeypatch):
    # epoch 1 is finite, epoch 2 is not: the log names epoch 2; nothing ever improved on epoch 1
    script_training(monkeypatch, losses=[1.0, float("nan"), 1.0], accs=[0.3, 0.3, 0.3])
    snaps = _Snapshots()
    script_evaluation(monkeypatch, snaps, val=[0.4, 0.5, 0.6])
    summary = Trainer(tiny_config(tmp_path, epochs=3), callbacks=[snaps]).fit()
    assert summary["diverged"] and summary["epochs_completed"] == 1 and summary["best_epoch"] == 1
    assert "# diverged in epoch 2: non-finite training loss" in (tmp_path / "run/log.txt").read_text()
    # diverged in the first epoch, not writing: no best weights, so no test score and no best accuracy
    script_training(monkeypatch, losses=[float("nan")], accs=[0.3])
    summary = Trainer(tiny_config(tmp_path, epochs=2), write=False).fit()
    assert summary["best_epoch"] == 0 and summary["best_val_acc"] is None and summary["test_acc"] is None


def test_summary_log_and_metrics_carry_what_the_report_reads(tmp_path, monkeypatch):
    script_training(monkeypatch, losses=[2.0, 1.5], accs=[0.2, 0.4], n=100, seconds=0.05)
    seen = _SummarySeen()
    t0 = time.time()
    summary = Trainer(tiny_config(tmp_path, amp="off", train_subset=200, val_fraction=0.1), callbacks=[seen]).fit()
    elapsed = time.time() - t0
    assert seen.summary == summary
    assert summary["epochs"] == 2 and summary["epochs_completed"] == 2
    assert summary["device"] == "cpu" and summary["world_size"] == 1
    assert (summary["amp"], summary["amp_reason"]) == ("off", "--amp off")
    assert summary["train_images"] == 200  # the training subset (validation is split off the rest)
    assert 0.1 <= summary["wall_time_s"] <= elapsed
    on_disk = json.loads((tmp_path / "run/summary.json").read_text())
    assert {k: on_disk[k] for k in summary} == pytest.approx(summary)
    m = pd.read_csv(tmp_path / "run/metrics.csv")
    assert (m["epoch_time_s"] >= 0.05).all() and (m["epoch_time_s"] < elapsed).all()
    assert m["images_per_s"].tolist() == pytest.approx((100 / m["epoch_time_s"]).tolist(), rel=1e-4)  # csv rounds
    log = (tmp_path / "run/log.txt").read_text().splitlines()
    assert log[0] == (f"# lenet5 on synthetic: {summary['params']:,} params, {summary['flops'] / 1e6:.1f} MFLOPs, "
                      "device cpu, world size 1, fp32 (--amp off)")
    # the weights never change (training is scripted), so validation is flat and epoch 1 is the best
    assert summary["best_epoch"] == 1
    assert f"# test acc {100 * summary['test_acc']:.2f}% (best-validation checkpoint, epoch 1)" in log
    last = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)
    assert m["epoch_time_s"].sum() <= last["wall_time_s"] <= summary["wall_time_s"]
    assert last["callbacks"] == [{}]  # one entry per callback, in order (_SummarySeen has no state)
    bf16 = Trainer(tiny_config(tmp_path / "bf16", amp="bf16", epochs=1)).fit()
    assert (bf16["amp"], bf16["amp_reason"]) == ("bf16", "--amp bf16")
    assert (tmp_path / "bf16/run/log.txt").read_text().splitlines()[0].endswith("bf16 autocast (--amp bf16)")


@pytest.mark.parametrize("scheduler", ["plateau", "none"])
def test_without_a_validation_split_training_accuracy_selects_and_training_loss_schedules(
        tmp_path, monkeypatch, scheduler):
    # training loss flat for epochs 1-3 (plateau, patience 1: halve after epoch 3); training accuracy
    # peaks at epoch 2 and ties at 4: the first peak is the best checkpoint
    script_training(monkeypatch, losses=[1.0, 1.0, 1.0, 0.5], accs=[0.3, 0.6, 0.5, 0.6])
    summary = Trainer(tiny_config(tmp_path, epochs=4, val_fraction=0.0, scheduler=scheduler,
                                  plateau_patience=1, plateau_factor=0.5)).fit()
    assert summary["best_epoch"] == 2 and summary["best_val_acc"] == 0.6
    assert torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)["epoch"] == 2
    m = pd.read_csv(tmp_path / "run/metrics.csv")
    assert m["val_acc"].isna().all()
    assert m["lr"].tolist() == ([0.05, 0.05, 0.05, 0.025] if scheduler == "plateau" else [0.05] * 4)


def test_scoring_without_a_run_directory_uses_the_final_weights(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1, train_subset=64, test_subset=32)
    t = Trainer(cfg, write=False)
    summary = t.fit()
    assert summary["best_epoch"] == 1 and not (tmp_path / "run").exists()
    assert (summary["test_loss"], summary["test_acc"]) == pytest.approx(t.evaluate(t.data.test), abs=1e-12)


@pytest.mark.parametrize("epochs, plotted", [
    (3, [1, 2, 3]),                    # under 20 epochs: every epoch
    (30, list(range(1, 31))),          # 30 // 20 = 1: every epoch
    (40, list(range(2, 41, 2))),       # every second epoch: about 20 redraws a run
])
def test_curves_are_redrawn_about_twenty_times_a_run(tmp_path, monkeypatch, epochs, plotted):
    script_training(monkeypatch, losses=[1.0] * epochs, accs=[0.5] * epochs)
    snaps = _Snapshots()
    script_evaluation(monkeypatch, snaps, val=[0.5] * epochs, test=[0.5] * epochs)
    drawn = []
    monkeypatch.setattr(Trainer, "_plot", lambda self: drawn.append(len(self.history)))
    Trainer(tiny_config(tmp_path, epochs=epochs, scheduler="none", train_subset=64, test_subset=32)).fit()
    assert drawn == [*plotted, epochs]  # and once more with the summary


def test_tensorboard_gets_every_numeric_column_per_epoch(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script_training(monkeypatch, losses=[2.0, 1.5], accs=[0.2, 0.4])
    Trainer(tiny_config(tmp_path, tensorboard=True, scheduler="none")).fit()
    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "images_per_s"}
    loss = events.Scalars("train_loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.0), (2, 1.5)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.05, 0.05])


# -- bad input: one line "error: ...", exit 2, nothing on disk lost ----------------------------------------
BAD_INPUT = [
    (["--model", "resnet9000"], "unknown model"),
    (["--dataset", "imagenet"], "dataset"),
    (["--optimizer", "lion"], "unknown optimizer"),
    (["--scheduler", "warm"], "unknown scheduler"),
    (["--loss", "hinge2"], "unknown loss"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--batch-size", "-3"], "batch_size must be a positive integer"),
    (["--lr", "0"], "lr must be positive"),
    (["--lr", "-0.1"], "lr must be positive"),
    (["--drop-rate", "1.5"], "drop_rate must be in [0, 1)"),
    (["--momentum", "1.2"], "momentum must be in [0, 1)"),
    (["--epochs", "two"], "invalid int value"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUT)
def test_bad_input_is_one_error_line(tmp_path, capsys, extra, message):
    code = main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_unknown_config_key_and_bad_yaml(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochs: 1\nbogus: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown config key(s): bogus" in capsys.readouterr().err
    (tmp_path / "d.yaml").write_text("epochs: [1\n")
    assert main(["train", "--config", str(tmp_path / "d.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_config_file_is_overridden_by_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("model: lenet5\ndataset: synthetic\nepochs: 7\nlr: 0.3\n")
    from cifarlab.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.01"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.model) == (7, 0.01, "lenet5")


def test_finished_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    before = tree_digest(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run), "--resume"]) == 2
    assert tree_digest(run) == before


def test_resume_without_a_run(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "none"), "--resume"]) == 2
    assert "no run to resume" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "foreign", "other-model"])
def test_damaged_checkpoint_on_resume(tmp_path, capsys, damage):
    run = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    (run / "summary.json").unlink()  # pretend it was killed before finishing
    last = run / "checkpoints/last.pt"
    if damage == "truncated":
        data = last.read_bytes()
        last.write_bytes(data[: len(data) // 3])
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, last)
    elif damage == "other-model":  # a last.pt copied in from another run: its weights would even load
        ckpt = torch.load(last, weights_only=False)
        ckpt["config"]["model"] = "resnet20"
        torch.save(ckpt, last)
    before = tree_digest(run)
    capsys.readouterr()
    code = main(["train", *TINY, "--epochs", "2", "--run-dir", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    expected = {"truncated": "truncated", "foreign": "not a cifarlab checkpoint",
                "other-model": "was made for model 'resnet20', not 'lenet5'"}[damage]
    assert expected in err, err
    assert tree_digest(run) == before


def test_resume_of_a_run_killed_before_its_first_checkpoint_restarts_it(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    (run / "summary.json").unlink()
    (run / "checkpoints/last.pt").unlink()
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run), "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 1


def test_a_recipe_run_resumes_twice_and_keeps_its_recipe(tmp_path, capsys):
    # a run cut off by two session ends: each resume rewrites config.yaml, which must still name
    # the recipe, or the grid's second `--recipe dropout ... --resume` is refused
    run = tmp_path / "r"
    args = ["train", *TINY, "--recipe", "dropout", "--run-dir", str(run)]
    assert main([*args, "--epochs", "1"]) == 0
    for epochs in (2, 3):
        (run / "summary.json").unlink()  # pretend it was killed before finishing
        assert main([*args, "--epochs", str(epochs), "--resume"]) == 0, capsys.readouterr().err
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["recipe"] == "dropout" and saved["lr"] == 0.05 and saved["weight_decay"] == 1e-4
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 3
    # a recipe that contradicts the run is refused
    (run / "summary.json").unlink()
    capsys.readouterr()
    other = ["train", *TINY, "--recipe", "edropout", "--run-dir", str(run), "--epochs", "4", "--resume"]
    assert main(other) == 2
    assert "--recipe 'edropout' differs from the run's 'dropout'" in capsys.readouterr().err
    # a config.yaml rewritten by the older resume (recipe: null, the preset's values in its fields):
    # the same recipe resumes it and names itself again; one whose preset disagrees is refused
    legacy = {**saved, "recipe": None}
    (run / "config.yaml").write_text(yaml.safe_dump(legacy))
    assert main(other) == 2
    assert "--recipe 'edropout' sets optimizer 'adadelta', which differs from the run's 'sgd'" in \
        capsys.readouterr().err
    assert main([*args, "--epochs", "4", "--resume"]) == 0, capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["recipe"] == "dropout"


def test_resume_refuses_a_different_model(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(run), "--resume", "--model", "resnet20"]) == 2
    assert "differs from the run's" in capsys.readouterr().err


def test_resume_of_a_last_checkpoint_without_callback_state(tmp_path):
    # a last.pt written before checkpoints carried callback state still resumes (the callbacks start fresh)
    cfg = dict(epochs=2, train_subset=64, test_subset=32)
    Trainer(tiny_config(tmp_path, **cfg)).fit()
    last_path = tmp_path / "run/checkpoints/last.pt"
    last = torch.load(last_path, weights_only=False)
    last["epoch"], last["history"] = 1, last["history"][:1]  # as if cut off after epoch 1
    del last["callbacks"]
    torch.save(last, last_path)
    (tmp_path / "run/summary.json").unlink()
    counter = _CountEpochs()
    summary = Trainer(tiny_config(tmp_path, resume=True, **cfg), callbacks=[counter]).fit()
    assert summary["epochs_completed"] == 2 and counter.seen == 1


def test_ddp_two_processes_on_cpu_match_one_process(tmp_path):
    args = ["--model", "lenet5", "--dataset", "synthetic", "--train-subset", "512", "--test-subset", "256",
            "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--progress", "off", "--epochs", "2",
            "--no-augment", "--scheduler", "none", "--amp", "off"]  # DDP's equivalence, in fp32 on any CPU
    single = run_cli("train", *args, "--run-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "cifarlab", "train", *args, "--run-dir", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = pd.read_csv(tmp_path / "one/metrics.csv")
    b = pd.read_csv(tmp_path / "two/metrics.csv")
    for col in ("train_loss", "train_acc", "val_loss", "val_acc"):
        # gradients agree to rounding (mean of per-rank means = full-batch mean); accuracies may
        # flip a few borderline images
        assert b[col].tolist() == pytest.approx(a[col].tolist(), abs=2e-2), col
    sb = json.loads((tmp_path / "two/summary.json").read_text())
    sa = json.loads((tmp_path / "one/summary.json").read_text())
    assert sb["world_size"] == 2
    assert sb["train_images"] == sa["train_images"] == 512  # both ranks' shards together
    assert sb["test_acc"] == pytest.approx(sa["test_acc"], abs=5e-3)
