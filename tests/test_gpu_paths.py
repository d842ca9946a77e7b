"""The CUDA paths, proved on the CPU where they can be (issue 18), plus tests that need a GPU
(named test_cuda_*: skipped without one; `make gpu-check` runs them on a GPU machine).

- resume: a checkpoint is read onto the CPU whatever device the model lives on (here: meta), so
  RNG states stay CPU ByteTensors and SLBIAdam's step counters stay on the CPU;
- the fused SLBI step hands its compiled graph only tensors on the parameters' device;
- no host synchronisation inside a training step (SGD, SLBI eager and fused);
- --compile: one training batch shape per epoch (the ragged last batch is dropped);
- DDP/CUDA set-up: set_device before init_process_group(device_id=...), --device cuda:N,
  --sync-bn, SLBI's analysis accuracies summed across ranks, fewer GPUs than saved RNG states;
- fork_rng + seeding touches only the CPU generator; `cam --device`;
- scripts/gpu_check.py: its CPU dry run (the plumbing of every step).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cifarlab.cli import main
from cifarlab.config import make_config
from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.optim import build_optimizer
from cifarlab.optim import slbi as slbi_module
from cifarlab.train import Trainer
from cifarlab.train.build import model_from_config
from cifarlab.train.checkpoint import capture_rng, load_checkpoint, load_resume_state, restore_rng
from cifarlab.train.distributed import DistInfo, init_distributed, maybe_sync_batchnorm, training_device
from cifarlab.train.host_sync import count_host_syncs
from cifarlab.train.trainer import train_step

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (make gpu-check)")


def tiny_cfg(tmp_path=None, **kw):
    base = dict(model="lenet5", dataset="synthetic", train_subset=256, test_subset=64, batch_size=64, lr=0.05,
                device="cpu", progress="off", epochs=1)
    if tmp_path is not None:
        base["run_dir"] = str(tmp_path / "run")
    base.update(kw)
    return make_config(base)


def draws():
    """One draw from each global generator a resumed run continues."""
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random()


# -- 1. resume: read onto the CPU, whatever the model's device -----------------------------------

@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_onto_another_device_restores_rng_exactly_and_keeps_step_counters_on_cpu(tmp_path):
    cfg = tiny_cfg(tmp_path, optimizer="slbi_adam", lr=1e-3)
    Trainer(cfg).fit()
    last = tmp_path / "run/checkpoints/last.pt"
    expected_rng = load_checkpoint(last)["rng"]
    restore_rng(expected_rng)
    expected = draws()

    # the model on another device (meta stands in for a GPU): the file is read onto the CPU and
    # each tensor follows its parameter
    model = model_from_config(cfg, 10, 3).to("meta")
    opt = build_optimizer(cfg, model)
    ckpt = load_resume_state(last, model, opt, None, model_name="lenet5")
    assert all(p.device.type == "meta" for p in model.parameters())
    steps = [st["step"] for st in opt.state.values() if "step" in st]
    assert steps and all(s.device.type == "cpu" and float(s) > 0 for s in steps)  # SLBIAdam's counters
    assert all(st["exp_avg"].device.type == "meta" for st in opt.state.values() if "exp_avg" in st)
    assert ckpt["rng"]["torch"].device.type == "cpu" and ckpt["rng"]["torch"].dtype == torch.uint8

    torch.manual_seed(12345)  # scramble, then restore: the same stream as the saved one
    np.random.seed(1)
    random.seed(2)
    restore_rng(ckpt["rng"])
    assert draws() == expected

    # what the old code did (map the whole file to the model's device) cannot be restored
    mapped = load_checkpoint(last, map_location="meta")
    assert mapped["rng"]["torch"].device.type == "meta"
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):
        restore_rng(mapped["rng"])
    with pytest.raises(CheckpointError, match="made for model 'lenet5', not 'resnet20'"):
        load_resume_state(last, model, opt, None, model_name="resnet20")


def test_restore_rng_with_fewer_gpus_visible_than_saved_states(monkeypatch):
    state = capture_rng()
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # saved on 4 GPUs
    state["cuda"] = saved
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # resumed with 2 visible
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s, device)))
    restore_rng(state)
    assert [d for _, d in calls] == [0, 1]
    assert all(torch.equal(s, saved[d]) and s.device.type == "cpu" for s, d in calls)


# -- 2. the fused SLBI step's operands -------------------------------------------------------------

def _recording_pointwise(monkeypatch):
    """Replace the compiled pointwise function by its eager body, recording the arguments."""
    calls = []

    def fake():
        def run(*args):
            calls.append(args)
            return slbi_module._sparse_pointwise(*args)
        return run

    monkeypatch.setattr(slbi_module, "_compiled_pointwise", fake)
    return calls


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def test_fused_slbi_step_hands_the_graph_only_tensors_on_the_parameters_device(monkeypatch):
    calls = _recording_pointwise(monkeypatch)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to("meta")  # a GPU stand-in
    opt = slbi_module.SLBI(slbi_module.slbi_param_groups(net, lam=0.1), lr=0.1, mu=10.0, weight_decay=5e-4,
                           compiled=True)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # first step: momentum buffers are made (eager)
    opt.step()  # fused: one call per penalty kind (group, elementwise)
    assert len(calls) == 2
    devices = {t.device.type for args in calls for t in _tensors(args)}
    assert devices == {"meta"}, devices  # the hyper-parameters too: no CPU operand in the graph


def test_fused_slbi_hyperparameters_follow_the_learning_rate_without_new_uploads(monkeypatch):
    calls = _recording_pointwise(monkeypatch)
    net = nn.Sequential(nn.Linear(5, 3))
    opt = slbi_module.SLBI(slbi_module.slbi_param_groups(net, lam=0.1), lr=0.1, kappa=2.0, mu=10.0,
                           weight_decay=5e-4, compiled=True)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    for _ in range(3):
        opt.step()
    hp = [args[5] for args in calls]
    assert hp[0] is hp[1]  # cached: no new tensor (no host->device copy on a GPU) per step
    assert hp[0].tolist() == pytest.approx([0.2, 0.01, 0.02, 0.9, 5e-4])
    opt.param_groups[0]["lr"] = 0.05  # the scheduler's once-per-epoch change
    opt.step()
    assert calls[-1][5].tolist() == pytest.approx([0.1, 0.005, 0.01, 0.9, 5e-4])


# -- host synchronisations per training step -------------------------------------------------------

def _setup_trainer(**kw):
    tr = Trainer(tiny_cfg(**kw), write=False)
    tr._setup()
    return tr


@pytest.mark.parametrize("optimizer,fused", [("sgd", "off"), ("slbi", "off"), ("slbi", "on")])
def test_a_training_step_and_the_epoch_loop_never_read_back_to_the_host(monkeypatch, optimizer, fused):
    if fused == "on":  # the fused path with its compiled graph run eagerly (the CUDA check compiles it)
        _recording_pointwise(monkeypatch)
        monkeypatch.setattr(slbi_module, "fused_step_available", lambda device: True)
    tr = _setup_trainer(optimizer=optimizer, slbi_fused=fused)
    x, y = next(iter(tr.data.train))
    for _ in range(2):  # warm: optimizer state exists, the fused path is taken from now on
        train_step(tr, x, y)
    with count_host_syncs() as c:
        for _ in range(3):
            train_step(tr, x, y)
    assert c.syncs == 0, c.where
    # the Trainer's epoch loop body (batches, step, device-side sums); on the CPU its one
    # end-of-epoch read (.tolist of a CPU tensor) needs no dispatch, so the whole epoch counts 0
    assert len(tr.data.train) >= 4
    with count_host_syncs() as c:
        tr._train_epoch(1)
    assert c.syncs == 0, c.where
    if fused == "on":
        assert tr.optimizer.compiled is True


def test_the_sync_counter_sees_a_read_back_in_the_loop():
    # the counter has teeth: one .item() per batch in a callback is one sync per step
    from cifarlab.train.callbacks import Callback

    class Reads(Callback):
        def on_batch_end(self, trainer, loss):
            loss.item()

    tr = Trainer(tiny_cfg(), callbacks=[Reads()], write=False)
    tr._setup()
    with count_host_syncs() as c:
        tr._train_epoch(1)
    assert c.syncs == len(tr.data.train)
    assert "test_gpu_paths.py" in c.where[0]


# -- 5. --compile: one batch shape per epoch -------------------------------------------------------

def _shapes_per_epoch(loader, epochs=(1, 2)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append({tuple(x.shape) for x, _ in loader} | {tuple(y.shape) for _, y in loader})
    return out


def test_compile_mode_drops_the_ragged_last_batch():
    from cifarlab.data import build_loaders
    from cifarlab.data.device_loader import ragged_trim

    # 270 training images = 4 batches of 64 + a ragged 14
    cfg = tiny_cfg(train_subset=270, compile=True)
    data = build_loaders(cfg, "cpu")
    assert len(data.train.images) == 270
    for shapes in _shapes_per_epoch(data.train):
        assert shapes == {(64, 3, 32, 32), (64,)}
    assert data.train.num_samples == 256 and len(data.train) == 4
    plain = build_loaders(tiny_cfg(train_subset=270), "cpu").train
    assert _shapes_per_epoch(plain, (1,))[0] == {(64, 3, 32, 32), (14, 3, 32, 32), (64,), (14,)}
    # evaluation keeps every image (the compiled model only trains)
    assert data.val.num_samples == len(data.val.images)
    # the rule, by hand
    assert ragged_trim(270, 64, shuffle=True, drop_last=True) == 256
    assert ragged_trim(40, 64, shuffle=True, drop_last=True) == 40  # under one batch: kept whole
    assert ragged_trim(129, 64, shuffle=True, drop_last=False) == 128  # a 1-image batch always goes
    assert ragged_trim(130, 64, shuffle=True, drop_last=False) == 130
    assert ragged_trim(130, 64, shuffle=False, drop_last=True) == 130


def test_compile_mode_under_ddp_shards_have_one_shape():
    from cifarlab.data.device_loader import DeviceLoader

    x = torch.zeros(270, 1, 4, 4, dtype=torch.uint8)
    y = torch.zeros(270, dtype=torch.long)
    for rank in (0, 1):
        ld = DeviceLoader(x, y, 32, (0.5,), (0.2,), shuffle=True, rank=rank, world_size=2, drop_last=True)
        assert {tuple(b.shape) for b, _ in ld} == {(32, 1, 4, 4)} and ld.num_samples == 128


def test_torch_loader_drops_the_ragged_batch_too():
    from cifarlab.data.torch_loader import TorchLoader

    ld = TorchLoader([None] * 270, torch.arange(270), None, 64, shuffle=True, drop_last=True)
    assert ld.num_samples == 256 and len(ld) == 4


# -- 6. DDP and CUDA set-up ------------------------------------------------------------------------

def test_ddp_sets_the_cuda_device_before_joining_with_device_id(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    info = init_distributed("auto")
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert calls == [("set_device", 1), ("init", {"backend": "nccl", "device_id": torch.device("cuda", 1)})]
    calls.clear()
    init_distributed("cpu")  # gloo on the CPU, no device
    assert calls == [("init", {"backend": "gloo"})]


def test_device_cuda_n_is_made_current_and_checked(monkeypatch):
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(d))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert training_device("cuda:1", DistInfo()) == torch.device("cuda", 1)
    assert set_to == [1] and torch.backends.cudnn.benchmark is True
    assert training_device("auto", DistInfo(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        training_device("cuda:2", DistInfo())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        training_device("cuda", DistInfo())
    assert training_device("auto", DistInfo()) == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_train_and_cam_on_cuda_without_a_gpu_is_one_error_line(capsys, tmp_path):
    assert main(["train", "--model", "lenet5", "--dataset", "synthetic", "--device", "cuda:0", "--epochs", "1",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda:0': CUDA is not available") and err.count("\n") == 1
    assert main(["cam", "--run-dir", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["cam", "--run-dir", str(tmp_path / "r"), "--device", "gpu"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


def test_sync_bn_converts_batchnorm_under_ddp_on_cuda_only():
    from cifarlab.models import build_model

    assert make_config(sync_bn=True).sync_bn is True and make_config().sync_bn is False
    model = build_model("resnet20")
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())  # 19 on the path + 2 shortcuts
    params = list(model.parameters())
    keys = list(model.state_dict())
    ddp = DistInfo(rank=0, world_size=2)
    synced = maybe_sync_batchnorm(model, True, ddp, torch.device("cuda", 0))
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn == 21
    assert all(a is b for a, b in zip(params, synced.parameters()))  # the optimizer's tensors
    assert list(synced.state_dict()) == keys  # checkpoints load into the plain model
    plain = build_model("resnet20")
    assert maybe_sync_batchnorm(plain, True, DistInfo(), torch.device("cuda", 0)) is plain  # one process
    assert maybe_sync_batchnorm(plain, False, ddp, torch.device("cuda", 0)) is plain
    with pytest.raises(ConfigError, match="sync-bn needs CUDA"):
        maybe_sync_batchnorm(plain, True, ddp, torch.device("cpu"))


_ACCURACY_SCRIPT = """
import json, os, sys, contextlib, types
import torch
from cifarlab.dessilbi.callbacks import accuracy
from cifarlab.train.distributed import init_distributed, shutdown

info = init_distributed("cpu")
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
with torch.no_grad():
    full = (model(x).argmax(1) == y).float().mean().item()
share = slice(0, 7) if info.rank == 0 else slice(7, 10)  # unequal shares, as evaluation shards are
loader = [(x[share][:4], y[share][:4]), (x[share][4:], y[share][4:])]
trainer = types.SimpleNamespace(dist=info, autocast=contextlib.nullcontext)
got = accuracy(model, [b for b in loader if len(b[1])], trainer)
local = accuracy(model, [b for b in loader if len(b[1])])
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
    json.dump({"full": full, "reduced": got, "local": local}, f)
shutdown(info)
"""


def test_slbi_analysis_accuracy_is_summed_across_ranks(tmp_path):
    # two gloo ranks started directly (the environment torchrun would give them; no launcher to import)
    import socket

    script = tmp_path / "acc.py"
    script.write_text(textwrap.dedent(_ACCURACY_SCRIPT))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["reduced"] == r1["reduced"] == pytest.approx(r0["full"])
    # each rank alone saw a different share: without the reduction they disagree with the whole
    assert (r0["local"], r1["local"]) != (r0["full"], r0["full"])


# -- 7. RNG forks touch the CPU generator only -----------------------------------------------------

def test_seeded_transforms_and_road_never_reseed_the_gpu_generators(monkeypatch):
    from cifarlab.data.torch_loader import _SeededTransform

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    ds = _SeededTransform([("img", 3)], lambda img: torch.rand(3))
    before = torch.get_rng_state()
    a, b = ds[(0, 7)], ds[(0, 7)]
    assert torch.equal(a[0], b[0]) and a[1] == 3
    assert not torch.equal(a[0], ds[(0, 8)][0])
    assert torch.equal(torch.get_rng_state(), before)  # the global CPU stream is untouched

    from cifarlab.interpret.gradcam import road_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    reseeded.clear()
    images = torch.randn(1, 3, 8, 8)
    cams = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    before = torch.get_rng_state()
    s1 = road_scores(model, images, cams, [1], percentiles=(50,), seed=3)
    s2 = road_scores(model, images, cams, [1], percentiles=(50,), seed=3)
    assert np.array_equal(s1, s2)
    assert torch.equal(torch.get_rng_state(), before)
    assert reseeded == []


# -- on a GPU (make gpu-check) ---------------------------------------------------------------------

@needs_cuda
def test_cuda_resume_restores_rng_and_keeps_counters_on_cpu(tmp_path):
    cfg = tiny_cfg(tmp_path, device="cuda", optimizer="slbi_adam", lr=1e-3, epochs=1)
    Trainer(cfg).fit()
    saved = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["rng"]
    (tmp_path / "run/summary.json").unlink()  # as if killed after epoch 1
    tr = Trainer(make_config({**cfg.to_dict(), "epochs": 2, "resume": True}))
    summary = tr.fit()  # crashed before the fix: RNG state must be a torch.ByteTensor
    assert summary["epochs_completed"] == 2
    steps = [st["step"] for st in tr.optimizer.state.values() if "step" in st]
    assert steps and all(s.device.type == "cpu" for s in steps)
    restore_rng(saved)
    assert torch.equal(torch.cuda.get_rng_state(), saved["cuda"][torch.cuda.current_device()])


@needs_cuda
def test_cuda_fused_slbi_matches_eager_with_weight_decay():
    from cifarlab.models import build_model

    if not slbi_module.fused_step_available(torch.device("cuda")):
        pytest.skip("no Triton")
    nets, opts = [], []
    g = torch.Generator().manual_seed(0)
    grads = None
    for compiled in (False, True):
        torch.manual_seed(0)
        net = build_model("resnet20").cuda()
        if grads is None:
            grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in net.parameters()]
        opt = slbi_module.SLBI(slbi_module.slbi_param_groups(net, lam=1e-3), lr=0.1, mu=10.0, weight_decay=5e-4,
                               compiled=compiled)
        for _ in range(4):
            for p, gr in zip(net.parameters(), grads):
                p.grad = gr.cuda()
            opt.step()
        nets.append(net)
        opts.append(opt)
    assert opts[1].compiled is True  # "on": compiling must not have fallen back
    diff = max((p - q).abs().max().item() for p, q in zip(nets[0].parameters(), nets[1].parameters()))
    assert diff < 1e-5


@needs_cuda
@pytest.mark.parametrize("optimizer,fused", [("sgd", "off"), ("slbi", "off"), ("slbi", "on")])
def test_cuda_training_step_has_no_host_sync(optimizer, fused):
    if fused == "on" and not slbi_module.fused_step_available(torch.device("cuda")):
        pytest.skip("no Triton")
    tr = _setup_trainer(device="cuda", optimizer=optimizer, slbi_fused=fused)
    x, y = next(iter(tr.data.train))
    for _ in range(3):
        train_step(tr, x, y)
    torch.cuda.synchronize()
    with count_host_syncs("cuda") as c:
        for _ in range(3):
            train_step(tr, x, y)
    assert c.syncs == 0, c.where
    with count_host_syncs("cuda") as c:
        tr._train_epoch(1)
    assert c.syncs <= 1, c.where  # the epoch's one read of its sums


# -- scripts/gpu_check.py: the CPU dry run -------------------------------------------------------------

def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_parses_recompiles_and_lists_every_step():
    gc = _gpu_check_module()
    log = ("V1203 [0/1] torch/_dynamo/guards.py] Recompiling function forward in /x/resnet.py:40\n"
           "V1203 [0/1] torch/_dynamo/guards.py]     triggered by the following guard failure(s):\n"
           "V1203 [0/2] torch/_dynamo/guards.py] Recompiling function forward in /x/resnet.py:40\n")
    assert gc.count_recompiles(log) == 2
    assert gc.count_recompiles("") == 0
    assert gc.count_cudagraph_rerecords("[0/0] Re-recording function=forward, mode=..., reason=...\n") == 1
    assert [s.name for s in gc.STEPS] == ["env", "cuda_tests", "train_eager", "train_compile", "bench_throughput",
                                          "host_syncs", "slbi_fused", "kill_resume", "edropout", "cam"]


def test_gpu_check_cpu_dry_run_writes_its_summary(tmp_path):
    # the driver, a training run, the host-sync worker and Grad-CAM at toy size; the other steps
    # (compiling ones cost ~20-40 s of inductor per process on one core) run in `make gpu-check-dry`
    out = tmp_path / "gc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu", "--out", str(out), "--work",
                          str(tmp_path / "work"), "--only", "env,train_eager,host_syncs,cam"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    ran = {"env", "train_eager", "host_syncs", "cam"}
    assert status == {name: "ok" if name in ran else "skipped" for name in status} and len(status) == 10, status
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["train_eager"]["result"]["images_per_s"] > 0 and steps["train_eager"]["result"]["epochs"] == 2
    assert steps["host_syncs"]["result"]["syncs_per_step"] == {"sgd": 0, "slbi_eager": 0}
    assert steps["cam"]["result"]["layer"] and (out / "gradcam.png").is_file()
    assert (tmp_path / "work/train_eager/checkpoints/best.pt").is_file()  # cam explained that run
    md = (out / "summary.md").read_text()
    assert "| train_eager | ok |" in md and summary["device"] == "cpu"
    assert (out / "logs/train_eager.log").read_text().startswith("$ ")
