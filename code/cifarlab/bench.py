"""Benchmarks measured side by side in one process: ratios, never absolute promises.

throughput: (a) the classic loop — torchvision dataset + PIL transforms through a DataLoader with
2 workers, fp32, NCHW, eager model, SGD momentum, a host sync per step for the running loss and
accuracy, the way pytorch-cifar's main.py trains — against (b) cifarlab's Trainer with its
defaults (so `--amp auto`: bf16 autocast where the CPU or GPU computes bf16 natively), on the same
model, batch size and augmentation (crop with padding 4, flip, normalise).
optimizer: one optimizer step of each optimizer the package offers, as a ratio to SGD.
Every result records the machine (cifarlab.machine): the machines differ from session to session.
"""
from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifarlab.config import make_config
from cifarlab.machine import describe_machine, machine_line
from cifarlab.train.cpu_heap import heap_tuned, keep_cpu_heap


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def machine_fields(device: torch.device) -> dict[str, Any]:
    """What every result records about where it ran: a one-line "machine" and the "machine_info" dict."""
    info = describe_machine(device)
    return {"machine": machine_line(info), "machine_info": info}


# -- (a) the classic loop ----------------------------------------------------------------------------------
def _classic_datasets(dataset: str, data_root: str, n_train: int, n_test: int):
    import torchvision.transforms as T

    from cifarlab.data import dataset_info, torchvision_dataset

    info = dataset_info(dataset)
    h, w = info.image_size
    train_tf = T.Compose([T.RandomCrop((h, w), padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(info.mean, info.std)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])
    train = torchvision_dataset(dataset, data_root, True, train_tf, download=False)
    test = torchvision_dataset(dataset, data_root, False, test_tf, download=False)
    train = torch.utils.data.Subset(train, range(min(n_train, len(train))))
    test = torch.utils.data.Subset(test, range(min(n_test, len(test))))
    return info, train, test


def classic_loop(model_name: str, dataset: str, device: torch.device, batch_size: int, steps: int,
                 repeats: int, data_root: str) -> dict[str, Any]:
    from cifarlab.models import build_model

    torch.manual_seed(0)
    info, train, test = _classic_datasets(dataset, data_root, batch_size * steps, 1024)
    model = build_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=2,
                                               drop_last=True, persistent_workers=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=100, shuffle=False, num_workers=2)
    _reset_peak(device)

    def one_epoch():
        model.train()
        train_loss, correct, total = 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            train_loss += loss.item()  # pytorch-cifar's per-step host syncs
            correct += out.argmax(1).eq(y).sum().item()
            total += y.size(0)
        return total

    def evaluate():
        model.eval()
        correct, n = 0, 0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(device), y.to(device)
                correct += model(x).argmax(1).eq(y).sum().item()
                n += y.size(0)
        return n

    # fp32 NCHW on purpose: the baseline is how pytorch-cifar trains, whatever the machine offers
    return {**_time_phases(one_epoch, evaluate, device, repeats), "amp": "off", "amp_reason": "classic loop: fp32",
            "channels_last": False}


# -- (b) cifarlab's Trainer with its defaults --------------------------------------------------------------
def cifarlab_loop(model_name: str, dataset: str, device: torch.device, batch_size: int, steps: int,
                  repeats: int, data_root: str, compile: bool = False, **overrides) -> dict[str, Any]:
    from cifarlab.train import Trainer

    cfg = make_config(model=model_name, dataset=dataset, batch_size=batch_size, device=str(device),
                      train_subset=batch_size * steps, test_subset=1024, val_fraction=0.0, data_root=data_root,
                      progress="off", compile=compile, download=False, epochs=1, **overrides)
    trainer = Trainer(cfg, write=False)
    trainer._setup()
    _reset_peak(device)
    epoch = [0]

    def one_epoch():
        epoch[0] += 1
        _, _, n = trainer._train_epoch(epoch[0])
        return n

    def evaluate():
        trainer.evaluate(trainer.data.test)
        return trainer.data.test.num_samples

    return {**_time_phases(one_epoch, evaluate, device, repeats), "amp": trainer.precision.amp,
            "amp_reason": trainer.precision.reason, "channels_last": trainer.channels_last}


def _time_phases(train_epoch, evaluate, device, repeats: int) -> dict[str, Any]:
    train_epoch()  # warm-up: workers, allocator, cuDNN autotune, compilation
    evaluate()
    train_rates, step_times, eval_rates = [], [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        n = train_epoch()
        _sync(device)
        dt = time.perf_counter() - t0
        train_rates.append(n / dt)
        step_times.append(dt / max(1, n) * 1000)
        _sync(device)
        t0 = time.perf_counter()
        m = evaluate()
        _sync(device)
        eval_rates.append(m / (time.perf_counter() - t0))
    return {"cpu_heap_tuned": device.type == "cpu" and heap_tuned(),
            "train_images_per_s": statistics.median(train_rates),
            "eval_images_per_s": statistics.median(eval_rates),
            "ms_per_image": statistics.median(step_times),
            "peak_memory_mb": _peak_mb(device),
            "train_images_per_s_all": train_rates}


def bench_throughput(model: str = "resnet18", device: str = "cpu", batch_size: int = 128, steps: int = 10,
                     repeats: int = 3, dataset: str = "synthetic", data_root: str = "data",
                     compile: bool = False, out_dir: str | Path = "bench/results") -> dict[str, Any]:
    dev = torch.device(device)
    # (a) first: the Trainer tunes glibc's heap for the whole process (train/cpu_heap.py, no undo),
    # so the classic loop must run before it; its result records whether the heap was untouched
    classic = classic_loop(model, dataset, dev, batch_size, steps, repeats, data_root)
    ours = cifarlab_loop(model, dataset, dev, batch_size, steps, repeats, data_root, compile=compile)
    result = {
        "bench": "throughput", "model": model, "device": str(dev), **machine_fields(dev),
        "dataset": dataset, "batch_size": batch_size, "steps": steps, "repeats": repeats, "compile": compile,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "classic": classic, "cifarlab": ours,
        "ratio": ours["train_images_per_s"] / classic["train_images_per_s"],
        "eval_ratio": ours["eval_images_per_s"] / classic["eval_images_per_s"],
    }
    _save(result, out_dir, f"throughput-{model}-{dev.type}")
    return result


def format_throughput(r: dict[str, Any]) -> str:
    def mem(v):
        return "n/a" if v is None else f"{v:,.0f} MB"

    rows = [("classic loop (pytorch-cifar)", r["classic"]), ("cifarlab Trainer", r["cifarlab"])]
    def precision(m):
        return "bf16" if m.get("amp") == "bf16" else "fp32"

    lines = [f"machine: {r['machine']}",
             f"{r['model']} on {r['device']} ({r['dataset']}, batch {r['batch_size']}, {r['steps']} steps x "
             f"{r['repeats']} repeats, medians)",
             f"{'loop':<30} {'precision':>9} {'train img/s':>12} {'eval img/s':>12} {'peak mem':>10} {'ms/step':>9}"]
    for name, m in rows:
        lines.append(f"{name:<30} {precision(m):>9} {m['train_images_per_s']:>12,.1f} {m['eval_images_per_s']:>12,.1f} "
                     f"{mem(m['peak_memory_mb']):>10} {m['ms_per_image'] * r['batch_size']:>9.1f}")
    if r["cifarlab"].get("amp_reason"):
        lines.append(f"cifarlab precision: {precision(r['cifarlab'])} ({r['cifarlab']['amp_reason']})")
    if r["classic"].get("cpu_heap_tuned"):
        lines.append("note: the classic loop ran on a heap this process had already tuned (it trained "
                     "before); `python -m cifarlab bench throughput` in a fresh process gives the honest ratio")
    lines.append(f"ratio cifarlab/classic (train images/s): {r['ratio']:.2f}x")
    return "\n".join(lines)


# -- optimizer step cost -----------------------------------------------------------------------------------
def bench_optimizer(model: str = "resnet18", device: str = "cpu", repeats: int = 20,
                    optimizers: list[str] | None = None, out_dir: str | Path = "bench/results") -> dict[str, Any]:
    from cifarlab.config import OPTIMIZERS
    from cifarlab.models import build_model
    from cifarlab.optim import build_optimizer

    dev = torch.device(device)
    names = optimizers or list(OPTIMIZERS)
    if dev.type == "cpu":
        keep_cpu_heap()  # as the Trainer runs on the CPU
    opts = {}
    for name in names:
        torch.manual_seed(0)
        net = build_model(model).to(dev)
        for p in net.parameters():  # the same fixed gradients for every optimizer
            p.grad = torch.randn_like(p) * 1e-3
        opts[name] = build_optimizer(make_config(model=model, optimizer=name, lr=0.01), net)
        for _ in range(3):  # warm-up: state allocated, caches hot
            opts[name].step()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):  # interleaved, so that load on a shared machine hits all alike
        for name, opt in opts.items():
            _sync(dev)
            t0 = time.perf_counter()
            opt.step()
            _sync(dev)
            samples[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(v) * 1000 for name, v in samples.items()}
    base = times.get("sgd") or next(iter(times.values()))
    result = {"bench": "optimizer", "model": model, "device": str(dev), **machine_fields(dev),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "repeats": repeats,
              "ms_per_step": times, "ratio_to_sgd": {k: v / base for k, v in times.items()}}
    _save(result, out_dir, f"optimizer-{model}-{dev.type}")
    return result


def format_optimizer(r: dict[str, Any]) -> str:
    lines = [f"machine: {r['machine']}",
             f"one optimizer step on {r['model']} ({r['device']}, median of {r['repeats']})",
             f"{'optimizer':<12} {'ms/step':>9} {'x SGD':>7}"]
    for k, v in r["ms_per_step"].items():
        lines.append(f"{k:<12} {v:>9.2f} {r['ratio_to_sgd'][k]:>7.2f}")
    return "\n".join(lines)


def _save(result: dict[str, Any], out_dir, stem: str) -> Path:
    from cifarlab.utils import atomic_write_text

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = Path(out_dir) / f"{stem}-{stamp}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    result["saved_to"] = str(path)
    return path
